"""The training step as a public API: `Trainer.step` is what `distill.train` runs for every batch.

Why a class of its own: the loop in `distill.train` adds checkpoints, logs, resumption and the batch schedule
around it; benchmarks and notebooks need the step alone (the same forward, loss, GradCache, backward, clipping,
optimizer and scheduler steps, logit-scale clamp) without copying it. Without an `accelerator` the step runs on
plain PyTorch (`Tensor.backward`, `torch.nn.utils.clip_grad_norm_`), on whatever device the model and batch are.

    trainer = Trainer.from_run(run, optimizer, cfg)           # run = build_run(cfg, accelerator)
    losses = trainer.step(batch, step=0)                      # {term: value, ..., "loss": total}, detached
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from distill.config.train_config import Config
from distill.data.loader import TrainBatch
from distill.losses import DistillLoss, StudentOutput, TeacherBatch, teacher_logit_bias
from distill.training.build_run import Run, teacher_batch
from distill.training.grad_cache import grad_cache_step, no_sync_of


def step_generator(seed: int, step: int, micro_index: int = 0) -> torch.Generator:
    """The generator of a step's random loss draws (teacher choice, dropping): the same on every rank, and a
    function of (seed, optimizer step, accumulated batch) only, so a resumed run draws what an uninterrupted one
    would."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step * 1009 + micro_index)


class Trainer:
    """One optimizer step (or one accumulated micro-step) of the student, as `distill.train` runs it.

    teacher_attrs: {teacher: cache attrs} (`RunPlan.teacher_attrs`): each teacher's logit scale and bias.
    micro_batch_size: GradCache chunks (`data.micro_batch_size`): the whole batch's gradients, M rows of
        activations at a time (`distill.training.grad_cache`); None: one forward of the whole batch.
    accelerator: an `accelerate.Accelerator` whose `prepare` wrapped model and optimizer: its backward (loss
        scaling, accumulation), clipping, `accumulate` context and DDP `no_sync`; None: plain PyTorch.
    scheduler: stepped after each real optimizer step (not one fp16 skipped); None: no scheduler.
    """

    def __init__(
        self,
        model: nn.Module,
        loss: DistillLoss,
        optimizer: torch.optim.Optimizer,
        *,
        teacher_attrs: Mapping[str, Mapping[str, Any]] | None = None,
        seed: int = 0,
        micro_batch_size: int | None = None,
        max_grad_norm: float | None = None,
        logit_scale_max: float = 100.0,
        scheduler: Any = None,
        accelerator: Any = None,
    ):
        self.model, self.loss, self.optimizer, self.scheduler = model, loss, optimizer, scheduler
        self.accelerator = accelerator
        attrs = dict(teacher_attrs or {})
        self.scales = {t: float(a["logit_scale"]) for t, a in attrs.items()}
        self.biases = {t: b for t, a in attrs.items() if (b := teacher_logit_bias(a)) is not None}
        self.seed, self.micro_batch_size = int(seed), micro_batch_size or None
        self.max_grad_norm, self.logit_scale_max = max_grad_norm, float(logit_scale_max)
        self.unwrapped = model if accelerator is None else accelerator.unwrap_model(model)
        self._no_sync: Callable[[], contextlib.AbstractContextManager] = (
            contextlib.nullcontext if accelerator is None else no_sync_of(accelerator, model)
        )

    @classmethod
    def from_run(
        cls,
        run: Run,
        optimizer: torch.optim.Optimizer,
        cfg: Config,
        *,
        accelerator: Any = None,
        model: nn.Module | None = None,
        scheduler: Any = None,
    ) -> Trainer:
        """The step of `build_run`'s Run under `cfg`; `model`: the prepared (wrapped) model, default `run.model`."""
        return cls(
            run.model if model is None else model,
            run.loss,
            optimizer,
            teacher_attrs=run.plan.teacher_attrs,
            seed=cfg.train.seed,
            micro_batch_size=cfg.data.micro_batch_size,
            max_grad_norm=cfg.optim.max_grad_norm,
            logit_scale_max=cfg.optim.logit_scale_max,
            scheduler=scheduler,
            accelerator=accelerator,
        )

    @property
    def sync(self) -> bool:
        """Whether this micro-step ends an optimizer step (always, without Accelerate's accumulation)."""
        return True if self.accelerator is None else bool(self.accelerator.sync_gradients)

    def generator(self, step: int, micro_index: int = 0) -> torch.Generator:
        return step_generator(self.seed, step, micro_index)

    def teacher_batch(self, batch: TrainBatch) -> TeacherBatch | None:
        """The loss's teacher side of `batch` (None: the batch carries no teacher features)."""
        return teacher_batch(batch, self.scales, self.loss.teacher_names, self.biases)

    def forward(self, batch: TrainBatch) -> StudentOutput:
        return self.model(batch.images, batch.tokens)

    def loss_of(
        self, out: StudentOutput, batch: TrainBatch, teachers: TeacherBatch | None, generator: torch.Generator | None
    ) -> dict[str, Tensor]:
        """The loss terms of the student's outputs for `batch` (its caption ids and named inputs included)."""
        return self.loss(out, teachers, generator, caption_ids=batch.caption_ids, inputs=batch.inputs)

    def backward(self, value: Tensor) -> None:
        if self.accelerator is None:
            value.backward()
        else:
            self.accelerator.backward(value)

    def forward_backward(self, batch: TrainBatch, generator: torch.Generator | None) -> dict[str, Tensor]:
        """Forward, loss and backward of the whole batch (by GradCache chunks with `micro_batch_size`)."""
        teachers = self.teacher_batch(batch)
        if self.micro_batch_size:  # GradCache: the same gradients, activations of M rows at a time
            return grad_cache_step(
                self.model,
                batch.images,
                batch.tokens,
                self.micro_batch_size,
                lambda s: self.loss_of(s, batch, teachers, generator),
                self.backward,
                self._no_sync,
            )
        losses = self.loss_of(self.forward(batch), batch, teachers, generator)
        self.backward(losses["loss"])
        return losses

    def optimizer_step(self, sync: bool | None = None) -> None:
        """Clip, step and zero the gradients; after a real optimizer step (`sync`) also step the scheduler (unless
        fp16 skipped the step) and clamp the student's logit scale. Accelerate's optimizer skips its step itself
        while gradients accumulate."""
        sync = self.sync if sync is None else sync
        if sync and self.max_grad_norm:
            params = self.model.parameters()
            if self.accelerator is None:
                torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
            else:
                self.accelerator.clip_grad_norm_(params, self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if not sync:
            return
        if self.scheduler is not None and not getattr(self.optimizer, "step_was_skipped", False):
            self.scheduler.step()  # fp16 overflow: keep lr where it was
        clamp = getattr(self.unwrapped, "clamp_logit_scale", None)  # DistillModel's; absent on a bare module
        if clamp is not None:
            clamp(self.logit_scale_max)

    def step(self, batch: TrainBatch, step: int, micro_index: int = 0) -> dict[str, Tensor]:
        """One micro-step: forward, loss, backward and the optimizer step, inside Accelerate's `accumulate` when
        there is an accelerator. Returns the loss terms (detached under GradCache, attached otherwise)."""
        ctx = contextlib.nullcontext() if self.accelerator is None else self.accelerator.accumulate(self.model)
        with ctx:
            losses = self.forward_backward(batch, self.generator(step, micro_index))
            sync = self.sync
            self.optimizer_step(sync)
        return losses


__all__ = ["Trainer", "step_generator"]
