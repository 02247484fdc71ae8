"""`all_ok`: every process learns whether every process succeeded, so a failure on one rank never leaves the
others waiting forever at the next barrier (a lock refused, a checkpoint write that failed on rank 0 only)."""

from __future__ import annotations

import torch


def all_ok(accelerator, ok: bool) -> bool:
    """True when `ok` is true on every process (a collective: every process must call it)."""
    if accelerator.num_processes == 1:
        return ok
    flags = accelerator.gather(torch.tensor([1 if ok else 0], device=accelerator.device))
    return bool(flags.min().item())
