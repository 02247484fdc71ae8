"""Gathering rows across processes for the sharded contrastive terms.

Each process scores its own B rows against the global batch (world_size * B columns), as open_clip's
`ClipLoss(local_loss=True, gather_with_grad=True)` and BiomedCLIP do: memory grows with B * global batch, not
global batch squared. Student features are gathered WITH gradients (`_AllGatherWithGrad`: its backward sums every
rank's gradient into the rows' owner), so with DDP's gradient averaging the step equals the one-process loss over the
whole global batch. Cached teacher features are constants: gathered without autograd.

All processes must call with the same local batch size (use drop_last or Accelerate's even_batches).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
import torch.distributed as dist
from torch import Tensor


class GatherFn(Protocol):
    def __call__(self, x: Tensor, with_grad: bool) -> tuple[Tensor, int]:
        """(B, D) local rows -> ((world_size * B, D) global rows, index of this process's first row)."""


def world_and_rank() -> tuple[int, int]:
    """(world size, rank) of the default process group, (1, 0) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def all_gather_rows(x: Tensor, with_grad: bool = True) -> tuple[Tensor, int]:
    """Gather `x` from every process of the default group; identity when not distributed."""
    world, rank = world_and_rank()
    if world == 1:
        return x, 0
    if with_grad:
        return _gather_with_grad(x.contiguous(), dist.group.WORLD), rank * x.shape[0]
    with torch.no_grad():
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts, dim=0), rank * x.shape[0]


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient and hands each rank its own rows.

    Written out (all_gather forward, all_reduce + slice backward) rather than using
    `torch.distributed.nn.functional.all_gather` (deprecated, a FutureWarning on every call) or the private
    `_functional_collectives` (seen to abort at process exit under gloo): plain collectives only.
    """

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group, ctx.rank, ctx.rows = group, dist.get_rank(group), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x, group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows], None


def _gather_with_grad(x: Tensor, group) -> Tensor:
    """(B, D) -> (world * B, D) in rank order; backward sums each rank's gradient into the rows' owner."""
    return _AllGatherWithGrad.apply(x, group)


class StepGather:
    """Memoises gathers for one step so a tensor shared by several terms is sent once.

    Every process builds the same terms in the same order, so the collectives line up across ranks.
    `constants` sends many no-gradient tensors (all teachers' features, caption ids) in ONE collective.
    """

    def __init__(self, fn: GatherFn | Callable[[Tensor, bool], tuple[Tensor, int]] = all_gather_rows):
        self.fn = fn
        self._memo: dict[str, tuple[Tensor, int]] = {}

    def __call__(self, key: str, x: Tensor, with_grad: bool) -> tuple[Tensor, int]:
        if key not in self._memo:
            self._memo[key] = self.fn(x, with_grad)
        return self._memo[key]

    def has(self, key: str) -> bool:
        return key in self._memo

    def constants(self, parts: dict[str, Tensor | None]) -> dict[str, tuple[Tensor, int]]:
        """Gather many (B, D_k) no-gradient tensors in one collective: {key: (global rows, offset)}.

        They are bit-cast to float32 columns (int64 ids become two columns each), concatenated along the feature
        dim into one (B, sum D) tensor, gathered once and split back, so every value is bit-identical to gathering
        each alone. Memoised per key like `__call__`: keys already gathered are not sent again (their value may
        then be None).
        """
        todo: dict[str, Tensor] = {}
        for k, v in parts.items():
            if k not in self._memo:
                if v is None:
                    raise ValueError(f"{k!r} is not gathered yet: its value cannot be None")
                todo[k] = v.detach()
        if todo:
            cols = [
                v.contiguous().view(torch.float32) if v.element_size() in (4, 8) and v.dtype != torch.float32 else v
                for v in todo.values()
            ]
            if any(c.dtype != torch.float32 for c in cols):
                raise TypeError(f"constants gathers 4- and 8-byte dtypes; got {[v.dtype for v in todo.values()]}")
            with torch.no_grad():
                flat, offset = self.fn(torch.cat(cols, dim=1), False)
                pieces = flat.split([c.shape[1] for c in cols], dim=1)
            for (k, v), piece in zip(todo.items(), pieces):
                piece = piece.contiguous()  # contiguous like a lone gather's result: the same kernels downstream
                self._memo[k] = (piece.view(v.dtype) if v.dtype != torch.float32 else piece, offset)
        return {k: self._memo[k] for k in parts}
