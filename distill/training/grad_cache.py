"""Gradient caching (GradCache, Gao et al. 2021): the whole contrastive batch in every loss term, in chunks of memory.

Why: InfoNCE, ICL and affinity need every row of the step's batch as negatives, but activations for a large batch do
not fit. `data.micro_batch_size: M` embeds the per-process batch in chunks of M rows without a graph, computes every
loss term on the whole batch (gathered across processes as usual) with the embeddings as leaf tensors, caches the
gradient of the loss with respect to them, then re-embeds each chunk with a graph under the chunk's saved RNG state
(dropout and patch dropout draw the same masks) and back-propagates the cached gradient. The parameter gradients equal
those of one forward over the whole batch; the price is one extra forward (4/3 of the compute).

The whole `DistillModel` forward is chunked, projection heads and logit scale included, so every `StudentOutput`
field is a leaf. Under DDP only the last chunk's backward all-reduces (`no_sync` for the others).

With micro batches the trainer merges the loader batches of one optimizer step (`train.grad_accum`, or as many as
`train.batch_schedule`'s global batch needs) into one contrastive batch (`merge_batches`): the schedule then grows
the batch every term sees, not only the accumulation, at the memory of M rows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast, overload

import torch
from torch import Tensor, nn

from distill.data.inputs import concat_inputs
from distill.data.loader import TrainBatch
from distill.losses import StudentOutput
from teachers.kernel.modality import Pair

LossFn = Callable[[StudentOutput], dict[str, Tensor]]
SCALARS = ("logit_scale", "logit_bias")  # one value for the whole batch, not per row


@dataclass(frozen=True)
class RngSnapshot:
    """The torch CPU state and, for a CUDA batch, that device's state: what dropout and patch dropout draw from."""

    cpu: Tensor
    cuda: Tensor | None
    device: torch.device

    @classmethod
    def take(cls, device: torch.device) -> RngSnapshot:
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return cls(torch.get_rng_state(), cuda, device)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


def _flat(out: StudentOutput) -> dict[str, Tensor]:
    """{"image", "text", "logit_scale", ["logit_bias",] "projected.T.image", "projected.T.text", ["tokens.T"]}: every
    tensor the loss may read."""
    flat = {"image": out.image, "text": out.text, "logit_scale": out.logit_scale}
    if out.logit_bias is not None:
        flat["logit_bias"] = out.logit_bias
    for t, pair in out.projected.items():
        flat[f"projected.{t}.image"], flat[f"projected.{t}.text"] = pair.image, pair.text
    for t, x in out.tokens.items():  # a spatial term's adapted patch tokens, (B, G*G, Dt)
        flat[f"tokens.{t}"] = x
    return flat


def _unflat(flat: dict[str, Tensor], teachers: list[str]) -> StudentOutput:
    return StudentOutput(
        image=flat["image"],
        text=flat["text"],
        logit_scale=flat["logit_scale"],
        projected={t: Pair(flat[f"projected.{t}.image"], flat[f"projected.{t}.text"]) for t in teachers},
        logit_bias=flat.get("logit_bias"),
        tokens={k.split(".", 1)[1]: v for k, v in flat.items() if k.startswith("tokens.")},
    )


def _wide(x: Tensor) -> Tensor:
    """float16/bfloat16/float32 as float32, float64 as it is (a float64 model is checked to float64's precision)."""
    return x if x.dtype == torch.float64 else x.float()


def chunk_slices(batch_size: int, micro: int) -> list[slice]:
    """Row ranges of the chunks: M rows each, the last one shorter when M does not divide the batch."""
    if micro <= 0:
        raise ValueError(f"micro batch size must be > 0, got {micro}")
    return [slice(s, min(s + micro, batch_size)) for s in range(0, batch_size, micro)]


@overload
def _cat(ts: Sequence[Tensor]) -> Tensor: ...
@overload
def _cat(ts: Sequence[Tensor | None]) -> Tensor | None: ...
def _cat(ts: Sequence[Tensor | None]) -> Tensor | None:
    """The batches' tensors concatenated by row; None where the batches carry none (an optional field: then every
    batch of the step lacks it, as they come from one loader)."""
    return None if ts[0] is None else torch.cat(cast("list[Tensor]", list(ts)))


def merge_batches(batches: Sequence[TrainBatch], pad_id: int | None) -> TrainBatch:
    """One optimizer step's loader batches as one batch; captions padded with `pad_id` to the longest.

    Why the padding is harmless: the token batches were trimmed to their own longest caption (`data.trim_captions`),
    and an HF text tower masks `pad_id` positions, so re-padding changes no embedding.
    """
    if len(batches) == 1:
        return batches[0]
    width = max(b.tokens.shape[1] for b in batches)
    if pad_id is None and any(b.tokens.shape[1] != width for b in batches):
        raise ValueError(
            f"cannot merge caption batches of lengths {[b.tokens.shape[1] for b in batches]} without "
            f"a pad token id; set data.trim_captions=false"
        )
    pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]), value=pad_id or 0)  # noqa: E731
    first = batches[0]
    feats = {
        t: Pair(_cat([b.teacher_feats[t].image for b in batches]), _cat([b.teacher_feats[t].text for b in batches]))
        for t in first.teacher_feats
    }
    return TrainBatch(
        _cat([b.images for b in batches]),
        _cat([pad(b.tokens) for b in batches]),
        _cat([b.rows for b in batches]),
        _cat([b.views for b in batches]),
        feats,
        _cat([b.route for b in batches]),
        _cat([b.caption_ids for b in batches]),
        sum(b.skipped_features for b in batches),
        teacher_tokens={t: _cat([b.teacher_tokens[t] for b in batches]) for t in first.teacher_tokens},
        domains=_cat([b.domains for b in batches]),
        row_weights=_cat([b.row_weights for b in batches]),
        inputs=concat_inputs([b.inputs for b in batches]),
    )


def no_sync_of(accelerator, model: nn.Module) -> Callable[[], contextlib.AbstractContextManager]:
    """A context without the gradient all-reduce: DDP's own `no_sync` whenever the model is DDP-wrapped.

    Why not only `accelerator.no_sync`: it is a no-op for one process, but `torchrun --nproc_per_node=1` still wraps
    the model in DDP, whose reducer then refuses a second forward before the first backward was reduced.
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync
    return lambda: accelerator.no_sync(model)


def grad_cache_step(
    model: nn.Module,
    images: Tensor,
    tokens: Tensor,
    micro: int,
    loss_fn: LossFn,
    backward: Callable[[Tensor], None],
    no_sync: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> dict[str, Tensor]:
    """One step's forward and backward in chunks of `micro` rows; returns the loss terms (detached).

    loss_fn: the whole batch's StudentOutput -> {term: value, "loss": total}, as `DistillLoss` returns.
    backward: how a scalar is back-propagated (`accelerator.backward`: it divides by the accumulation steps and
        scales fp16 losses). It is called once per chunk on sum(output * cached gradient), whose parameter gradient
        is that chunk's share of d loss / d parameters.
    no_sync: a context without DDP's gradient all-reduce (`no_sync_of(accelerator, model)`), used for every chunk
        but the last, so gradients cross the network once per step.
    """
    parts = chunk_slices(images.shape[0], micro)
    snapshots, outs = [], []
    with torch.no_grad():
        for s in parts:
            snapshots.append(RngSnapshot.take(images.device))
            outs.append(_flat(model(images[s], tokens[s])))
    teachers = [k.split(".")[1] for k in outs[0] if k.endswith(".image") and k.startswith("projected.")]
    # float32 leaves (float64 stays): the cached gradients do not underflow under fp16, the loss runs at full precision
    leaves = {
        k: _wide(v.detach() if k in SCALARS else torch.cat([o[k] for o in outs])).requires_grad_()
        for k, v in outs[0].items()
    }
    del outs
    with torch.enable_grad():
        losses = loss_fn(_unflat(leaves, teachers))
        keys = list(leaves)
        grads = dict(zip(keys, torch.autograd.grad(losses["loss"], [leaves[k] for k in keys], allow_unused=True)))
    after = RngSnapshot.take(images.device)
    for i, (s, snap) in enumerate(zip(parts, snapshots)):
        last = i == len(parts) - 1
        snap.restore()
        with contextlib.nullcontext() if last else no_sync():
            out = _flat(model(images[s], tokens[s]))
            # the logit scale and bias are one value for the whole batch: their gradient goes in once, with the last
            # chunk
            terms = [
                (_wide(out[k]) * (g if k in SCALARS else g[s])).sum()
                for k, g in grads.items()
                if g is not None and out[k].requires_grad and (last or k not in SCALARS)
            ]
            if terms:
                backward(torch.stack(terms).sum())
    after.restore()  # as if the batch had been embedded once: later draws do not depend on the chunking
    return {k: v.detach() for k, v in losses.items()}


__all__ = ["RngSnapshot", "chunk_slices", "grad_cache_step", "merge_batches", "no_sync_of"]
