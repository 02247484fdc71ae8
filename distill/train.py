"""The Accelerate training loop: `accelerate launch -m distill.train --config C.yaml [section.key=value ...]`.

One `prepare`, `accumulate` for the global batch schedule, `backward`, `save_state` checkpoints plus our own
`train_state.json` and RNG file. No teacher runs here: teacher features come from the cache inside the batches.
Builders live in `distill.training.build_run`, the step itself (forward, loss, backward, optimizer) in
`distill.training.step`, the optimizer recipe in `distill.training.optim`, checkpoints in
`distill.training.checkpoint` (resumed by `distill.training.checkpoint_load`, which unpickles nothing), logs in
`distill.training.log`. One training per run folder (`distill.training.run_lock`); a non-finite loss stops the run
before it can reach a checkpoint. `data.micro_batch_size` trains each step's whole batch by gradient caching
(`distill.training.grad_cache`).
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, set_seed
from tqdm.auto import tqdm

from distill.config.train_config import Config, ConfigError
from distill.config.usage import config_help
from distill.data.domains import DomainCounter, scheduled_counts
from distill.data.loader import PairDataset
from distill.errors import describe, exit_code
from distill.launch_check import process_mismatch
from distill.logs import setup_logging
from distill.training.build_run import build_run, resolve_threads
from distill.training.checkpoint import (
    TrainState,
    install_unwrapped_state_hooks,
    list_checkpoints,
    resolve_resume,
    save_checkpoint,
)
from distill.training.checkpoint_load import load_checkpoint
from distill.training.ema import Ema
from distill.training.eval_hook import EvalHook
from distill.training.grad_cache import merge_batches
from distill.training.log import RunLogger, plot_loss_curves
from distill.training.optim import build_optimizer, build_scheduler
from distill.training.run_lock import run_lock
from distill.training.step import Trainer
from student import run_files
from student.run_files import CorpusRecord, RunMeta, TeacherRecord

log = logging.getLogger("distill.train")  # not __name__: run as `-m distill.train` it is "__main__"


class NonFiniteLossError(ValueError):
    """A loss term became NaN or inf: training stops before that state can be saved."""


def check_finite_losses(step: int, losses: dict[str, float], out: Path, features: str | None) -> None:
    """Raise NonFiniteLossError naming the step, the non-finite terms and the checkpoint that stays usable."""
    bad = {k: v for k, v in losses.items() if not math.isfinite(v)}
    if not bad:
        return
    kept = list_checkpoints(out)
    kept_text = f"{kept[-1]} is the newest checkpoint and stays usable" if kept else "no checkpoint was written yet"
    verify = f"`distill info --verify {features}`" if features else "`distill info --verify FEATURES`"
    raise NonFiniteLossError(
        f"step {step}: non-finite loss ({', '.join(f'{k}={v}' for k, v in sorted(bad.items()))})"
        f"; training stopped before saving it ({kept_text}); check the teacher features with "
        f"{verify}, or lower optim.lr / set optim.max_grad_norm if they are fine"
    )


class LossWatch:
    """Each step's losses stay on the device; the host reads them (one gather, one copy) only at `read`.

    Why: `.tolist()` every step makes the host wait for the accelerator, so it cannot queue the next step. The first
    non-finite step is remembered on the device (its number and local losses), so the check at the next read still
    names it, and `read` runs before every checkpoint: a non-finite loss never reaches one.
    """

    def __init__(self, step: int, device: torch.device):
        self.count = torch.tensor(step, dtype=torch.int64, device=device)  # steps, counted on the device
        self.keys: list[str] = []
        self.last = self.bad = torch.zeros(0, device=device)
        self.bad_step = torch.zeros((), dtype=torch.int64, device=device)  # 0: every step so far was finite

    def add(self, losses: dict[str, torch.Tensor]) -> None:
        """Record one optimizer step's losses (this process's mean over its accumulated batches); no host sync."""
        self.keys = sorted(losses)
        vals = torch.stack([losses[k].float() for k in self.keys])
        self.count += 1
        if self.bad.shape != vals.shape:
            self.bad = torch.zeros_like(vals)
        first = ~torch.isfinite(vals).all() & (self.bad_step == 0)
        self.bad, self.bad_step = torch.where(first, vals, self.bad), torch.where(first, self.count, self.bad_step)
        self.last = vals

    def read(self, accelerator) -> tuple[dict[str, float], int, dict[str, float]]:
        """(last step's losses averaged over processes, first non-finite step or 0, that step's losses)."""
        packed = torch.cat([self.last, self.bad, self.bad_step.float().reshape(1)])
        rows = accelerator.gather(packed.reshape(1, -1)).cpu().double()  # (processes, 2K + 1): the host sync
        n = len(self.keys)
        mean = {k: float(v) for k, v in zip(self.keys, rows[:, :n].mean(0).tolist())}
        bad_rows = [r for r in rows.tolist() if r[-1] > 0]
        if not bad_rows:
            return mean, 0, {}
        first = min(bad_rows, key=lambda r: r[-1])
        return mean, int(first[-1]), dict(zip(self.keys, first[n : 2 * n]))


def make_accelerator(cfg: Config):
    # AcceleratorState is a process-wide singleton that refuses another mixed_precision; a second run in the same
    # process (the demo, a notebook, tests) starts from a clean one. PartialState (the process group) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)

    # The scheduler counts optimizer steps (we step it ourselves after each real optimizer step), so it does not
    # depend on the number of processes. build_run freezes every parameter no loss term reaches (the logit scale
    # under a feature-only loss, unread heads), so DDP needs no per-step search for unused parameters.
    # non_blocking: batches come pinned on CUDA (build_run), so their copy to the GPU overlaps the host's work.
    return Accelerator(
        mixed_precision=cfg.train.mixed_precision,
        step_scheduler_with_optimizer=False,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
        dataloader_config=DataLoaderConfiguration(non_blocking=True),
        dynamo_backend="inductor" if cfg.train.compile else None,
    )  # train.compile


def write_run_meta(cfg: Config, run, out: Path, resumed_from: Path | None) -> None:
    plan = run.plan
    teachers = {
        t: TeacherRecord(
            weight=w,
            embed_dim=int(plan.teacher_attrs[t]["embed_dim"]),
            spec=plan.teacher_attrs[t].get("spec"),
            logit_scale=plan.teacher_attrs[t].get("logit_scale"),
        )
        for t, w in plan.teachers.items()
    }
    run_files.write_run_meta(
        out,
        RunMeta(
            mode=cfg.mode,
            student=cfg.student.preset,
            teachers=teachers,
            student_dir=str(run.student_dir),
            corpus=CorpusRecord(
                path=cfg.data.corpus,
                size=len(run.corpus),
                rows_used=plan.num_rows,
                fingerprint=run.corpus.fingerprint(),
            ),
            features=cfg.data.features,
            loss=str(run.loss),
            total_steps=plan.total_steps,
            num_processes=plan.num_processes,
            global_batch_epoch0=plan.global_batch(0),
            routing=plan.routing,
            stored_views=plan.stored_views,
            augmentation=plan.augmentation,
            resumed_from=str(resumed_from) if resumed_from else None,
            config=cfg.to_dict(),
        ),
    )


def make_ema(cfg: Config, accelerator, model) -> Ema | None:
    """train.ema's average of the student's weights on the main process (None without train.ema, and elsewhere)."""
    if cfg.train.ema is None:
        return None
    if accelerator.distributed_type == "FSDP":
        raise ConfigError(
            "train.ema is not supported with FSDP yet (each process holds a shard of the weights); remove "
            "train.ema, or train with DDP"
        )
    if not accelerator.is_main_process:
        return None
    return Ema(cfg.train.ema, accelerator.unwrap_model(model).student)


def check_resume_teachers(out: Path, attrs: dict[str, dict]) -> None:
    """Refuse to resume when the cache's teachers differ (name or dimension) from those the run was trained with:
    the projection heads in the checkpoint would not fit, and loading would fail with a bare size mismatch."""
    meta = run_files.read_run_meta(out)
    if meta is None:
        return
    before = {t: r.embed_dim for t, r in meta.teachers.items()}
    now = {t: int(a["embed_dim"]) for t, a in attrs.items()}
    if before != now:
        diff = ", ".join(
            f"{t}: {before.get(t, 'absent')} -> {now.get(t, 'absent')}"
            for t in sorted(set(before) | set(now))
            if before.get(t) != now.get(t)
        )
        raise ValueError(
            f"cannot resume {out}: its teachers (name: embedding dim) were {before}, the cache now gives "
            f"{now} ({diff}); use the cache the run started with, or a new train.output_dir"
        )


def domain_counter(run, state: TrainState, device):
    """Rows seen per domain (`distill.data.domains.DomainCounter`), started at a resumed run's scheduled counts; None
    when the corpus has no data.domain_column."""
    if run.domains is None:
        return None
    sampler, ids = run.loader.sampler, run.domains.ids[run.loader.dataset.corpus_rows]
    done = state.batches_in_epoch * run.plan.per_device_batch * run.plan.num_processes  # items of this epoch
    base = scheduled_counts(sampler, ids, state.epoch, done, len(run.domains.names)) if state.step else None
    return DomainCounter(run.domains, device, base)


def train(cfg: Config) -> dict:
    """Train as configured; returns {"output_dir", "step", "losses", "checkpoint"}."""
    threads, why = resolve_threads(cfg.train.threads)  # before anything heavy (per process)
    torch.set_num_threads(threads)
    log.info("torch intra-op threads per process: %d (%s)", threads, why)
    accelerator = make_accelerator(cfg)
    mismatch = process_mismatch(accelerator.num_processes)  # accelerate launch --cpu --num_processes 2: one
    if mismatch and accelerator.is_main_process:
        log.warning(mismatch)
    out = Path(cfg.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with run_lock(accelerator, out):  # before anything else is written into the folder
        return _train_locked(cfg, accelerator, out)


def _train_locked(cfg: Config, accelerator, out: Path) -> dict:
    # before build_run, which writes RUN/student-config and RUN/tokenizer; the main process sets broken ones aside
    resume = resolve_resume(cfg.train.resume, out, set_aside=accelerator.is_main_process)
    set_seed(cfg.train.seed)
    run = build_run(cfg, accelerator)
    plan = run.plan
    if accelerator.distributed_type == "FSDP":  # FSDP 1 and 2 reject 0-dim parameters (the logit scale)
        log.info("FSDP: 1-element instead of 0-dim parameters: %s", ", ".join(run.model.unsqueeze_scalar_params()))
    optimizer = build_optimizer(run.model, cfg.optim, device=accelerator.device)
    scheduler = build_scheduler(optimizer, plan.total_steps, cfg.optim)
    model, optimizer, loader, scheduler = accelerator.prepare(run.model, optimizer, run.loader, scheduler)
    state = TrainState()
    install_unwrapped_state_hooks(accelerator)
    ema = make_ema(cfg, accelerator, model)  # train.ema: on the main process only (None elsewhere)
    hook = None if cfg.train.eval is None else EvalHook(cfg.train.eval, out, run.student_dir, plan.total_steps)
    if hook is not None and accelerator.is_main_process:
        hook.check_tasks()  # a wrong task fails now, not after hours of training
    if resume is not None:
        check_resume_teachers(out, plan.teacher_attrs)
        state = load_checkpoint(accelerator, resume, model, optimizer, scheduler)
        if ema is not None:
            ema.load(resume)
        accelerator.print(f"Resuming from {resume} at step {state.step} (epoch {state.epoch})")
    if accelerator.is_main_process:
        write_run_meta(cfg, run, out, resume)
        accelerator.print(str(run.loss))
    logger = RunLogger(out, enabled=accelerator.is_main_process, tensorboard=cfg.train.tensorboard)
    counter = domain_counter(run, state, accelerator.device)  # rows_per_domain (None: no data.domain_column)
    logger.truncate_after(state.step)
    if hook is not None and accelerator.is_main_process:
        hook.truncate_after(state.step)
    trainer = Trainer.from_run(run, optimizer, cfg, accelerator=accelerator, model=model, scheduler=scheduler)
    sums: dict[str, torch.Tensor] = {}
    last_ckpt, t_step, t_samples = None, time.perf_counter(), 0
    watch = LossWatch(state.step, accelerator.device)
    interpolation = cast(PairDataset, run.loader.dataset).preprocess.interpolation  # for data.decode=device
    pad_id = getattr(run.loader.collate_fn, "pad_id", None)  # to merge caption batches trimmed to their longest
    skipped, skipped_total = 0, 0  # (teacher, row) pairs dropped: this process since the last log, all processes
    # a context manager, so the bar is closed on an error too and the message is not printed on the bar's line
    with tqdm(total=plan.total_steps, initial=state.step, disable=not accelerator.is_main_process, unit="step") as bar:
        while state.step < plan.total_steps:
            accum = plan.accum(state.epoch)
            merge = bool(cfg.data.micro_batch_size) and accum > 1  # one contrastive batch per step (grad_cache)
            accelerator.gradient_accumulation_steps, pending = 1 if merge else accum, []
            loader.set_epoch(state.epoch)
            batches = (
                accelerator.skip_first_batches(loader, state.batches_in_epoch) if state.batches_in_epoch else loader
            )
            for batch in batches:
                batch = batch.decoded(interpolation)  # data.decode=device: JPEGs decoded here, on the device
                if merge:
                    pending.append(batch)
                    if len(pending) < accum:
                        continue
                    batch, pending = merge_batches(pending, pad_id), []
                losses = trainer.step(batch, state.step, state.batches_in_epoch % accum)  # distill.training.step
                state.batches_in_epoch += accum if merge else 1
                if counter is not None:
                    counter.add(batch.rows)
                skipped += batch.skipped_features
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + v.detach().float() / accelerator.gradient_accumulation_steps
                if not accelerator.sync_gradients:  # the scheduler and the logit-scale clamp ran in trainer.step
                    continue
                state.step += 1
                if ema is not None:
                    ema.update(state.step)
                state.samples_seen += plan.global_batch(state.epoch)
                watch.add(sums)
                sums, t_samples = {}, t_samples + plan.global_batch(state.epoch)
                bar.update(1)
                logging_step = state.step % cfg.train.log_every == 0 or state.step == plan.total_steps
                checkpoint_step = bool(cfg.train.checkpoint_every) and state.step % cfg.train.checkpoint_every == 0
                eval_step = hook is not None and hook.due(state.step)
                if not (logging_step or checkpoint_step or eval_step):
                    continue  # no host sync: the host queues the next step while this one runs
                state.last_losses, bad_step, bad = watch.read(accelerator)
                if bad_step:  # the first non-finite step on any process since the start (LossWatch)
                    check_finite_losses(bad_step, bad, out, cfg.data.features)
                now = time.perf_counter()  # samples/s over the steps since the last read (each read syncs)
                rate, t_step, t_samples = t_samples / max(now - t_step, 1e-9), now, 0
                bar.set_postfix(loss=f"{state.last_losses['loss']:.4f}", samples_s=f"{rate:.1f}")
                if logging_step:
                    extra = {}
                    if cfg.data.bad_features == "skip":  # a collective: every process logs at the same steps
                        n = accelerator.reduce(torch.tensor(skipped, device=accelerator.device), "sum")
                        skipped_total, skipped = skipped_total + int(n), 0
                        extra = {"skipped_features": skipped_total}
                    if counter is not None:  # a collective too
                        extra["rows_per_domain"] = counter.read(accelerator)
                    logger.log(
                        state.step,
                        {
                            **state.last_losses,
                            "lr": scheduler.get_last_lr()[0],
                            "samples_per_s": rate,
                            "epoch": state.epoch,
                            **extra,
                        },
                    )
                if eval_step and hook is not None:  # train.eval, before the checkpoint: a kill after it finds it done
                    if accelerator.is_main_process:
                        hook.run(accelerator.unwrap_model(model).student, ema, state.step)
                    accelerator.wait_for_everyone()
                if checkpoint_step:
                    last_ckpt = save_checkpoint(accelerator, out, state, cfg.train.keep_last, ema=ema)
                if state.step >= plan.total_steps:
                    break
            else:  # the epoch ran out: the next one starts from its first batch
                if state.batches_in_epoch == 0:
                    raise RuntimeError(
                        f"epoch {state.epoch} has no batches: {plan.num_rows} rows are fewer than its "
                        f"global batch {plan.global_batch(state.epoch)}; shorten train.batch_schedule"
                    )
                state.epoch, state.batches_in_epoch = state.epoch + 1, 0
    if last_ckpt is None or not last_ckpt.name.endswith(f"-{state.step}"):
        last_ckpt = save_checkpoint(accelerator, out, state, cfg.train.keep_last, ema=ema)
    if accelerator.is_main_process:
        logger.close()
        plot_loss_curves(out / "log.jsonl", out / "loss_curves.png")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return {
        "output_dir": str(out),
        "step": state.step,
        "losses": dict(state.last_losses),
        "checkpoint": str(last_ckpt),
        "skipped_features": skipped_total,
    }


def full_config(config: Config, source: str | None = None) -> Config:
    """`config` (checked before torch was imported, `static=True`) checked in full, from its values: the command
    line and the file are not read again. `source` (the config file) prefixes an error, as `Config.from_yaml` does."""
    try:
        return Config.from_dict(config.to_dict())
    except ConfigError as e:
        raise type(e)(f"{Path(source)}: {e}" if source else str(e)) from None


def main(argv: Sequence[str] | None = None, config: Config | None = None, source: str | None = None) -> int:
    """`python -m distill.train --config C.yaml [key=value ...]`; `distill train` passes the `config` it parsed
    (and its file as `source`) instead of a command line, so the command line is parsed once."""
    setup_logging(verbose=False)  # a no-op under `distill [-v] train`, which set it up already
    if config is None:
        argv = sys.argv[1:] if argv is None else list(argv)
        if "-h" in argv or "--help" in argv:  # `python -m distill.train --help`: usage and every config key
            print(config_help(Config), end="")
            return 0
        config = Config.from_argv(argv)
    else:
        config = full_config(config, source)
    result = train(config)
    if PartialState().is_main_process:
        print(json.dumps(result))
    return 0


def module_main() -> int:
    """`python -m distill.train` / `accelerate launch -m distill.train`: main() with the `distill` CLI's one-line
    messages and exit codes (distill.errors: 1 environment, 2 bad input); an unexpected error keeps its traceback.
    `distill -v train ...` shows the traceback of an expected one too."""
    try:
        return main()
    except Exception as e:
        failure = describe(e)
        if failure is None:
            raise
        log.debug("traceback", exc_info=True)
        print(f"distill.train: error: {failure.message}", file=sys.stderr)
        return exit_code(failure)


if __name__ == "__main__":
    sys.exit(module_main())
