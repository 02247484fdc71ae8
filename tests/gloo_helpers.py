"""A gloo process group for spawned CPU test workers that counts its all_gathers (the collectives a step sends)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist


@contextmanager
def counting_gloo_group(rank: int, world: int, init_file: str) -> Iterator[list[int]]:
    """Join a gloo group through `init_file` (one thread per process); yields [all_gather calls so far], reset it
    to 0 before the step to count; the group is destroyed on exit."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    calls, all_gather = [0], dist.all_gather

    def counted(*args, **kwargs):
        calls[0] += 1
        return all_gather(*args, **kwargs)

    dist.all_gather = counted  # a spawned process: the patch dies with it (and is undone below)
    try:
        yield calls
    finally:
        dist.all_gather = all_gather
        dist.destroy_process_group()
