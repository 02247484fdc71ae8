"""The few collective steps a multi-process cache build needs: who am I, wait for all, share one message.

Detected from the launcher's environment (`torchrun` and `accelerate launch` both set RANK and WORLD_SIZE).
When no process group exists yet we create a gloo one (CPU, works beside CUDA) and destroy it at the end;
an existing group (for example from accelerate's PartialState) is reused and left alone.
`lost_peer` names the failure the other processes see when one process of a job dies (killed, out of memory).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch.distributed as dist


@dataclass
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False
    local_world: int = 1  # processes on this machine (they share its cores)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather(self, obj) -> list:
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def dist_env() -> DistEnv:
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
        return DistEnv(
            dist.get_rank(),
            world,
            int(os.environ.get("LOCAL_RANK", 0)),
            local_world=int(os.environ.get("LOCAL_WORLD_SIZE", world)),
        )
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world <= 1:
        return DistEnv()
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    return DistEnv(
        rank,
        world,
        int(os.environ.get("LOCAL_RANK", rank)),
        owns_group=True,
        local_world=int(os.environ.get("LOCAL_WORLD_SIZE", world)),
    )


# What gloo, NCCL and the c10d store say when the process at the other end is gone.
_PEER_GONE = re.compile(
    r"Connection (?:closed|reset) by peer|Broken pipe|Socket closed|remote process exited|"
    r"failed to recv, got 0 bytes"
)
_COLLECTIVE = re.compile(r"gloo|nccl|c10d|TCPStore", re.IGNORECASE)


def lost_peer(e: BaseException) -> str | None:
    """One line for a collective that failed because another process of the job stopped; None for anything else.

    Why: when one rank is killed, the others fail at their next collective; they should say so and exit as an
    environment failure (rerun the same command: committed work is kept), not print a gloo traceback and ask for
    a bug report.
    """
    text = str(e)
    gone = _PEER_GONE.search(text)
    is_dist = isinstance(e, getattr(dist, "DistError", ())) or _COLLECTIVE.search(text) is not None
    if not isinstance(e, RuntimeError) or gone is None or not is_dist:
        return None
    return (
        f"another process of this distributed job stopped ({gone.group(0)} in a collective): its own output "
        "says why (killed, out of memory, a crash); rerun the same command: work already committed is kept"
    )
