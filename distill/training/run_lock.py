"""One training per run folder: `RUN/.lock` holds the main process's pid and host while it trains.

Why: two trainings into one folder both wrote checkpoints and log.jsonl (the same steps twice), or one crashed on
the other's `checkpoint-N.tmp`. The lock is cache/store/lock.py's WriterLock (O_EXCL, stale-lock takeover with a
warning); only the main process takes it, and every process learns whether it did.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cache.store.lock import WriterLock
from distill.training.collective import all_ok

LOCK_NAME = ".lock"


class RunInUseError(ValueError):
    """Another training (pid and host named) writes into this train.output_dir."""


@contextmanager
def run_lock(accelerator, out: Path) -> Iterator[None]:
    """Hold `out/.lock` (main process) for the body; released on success and on error."""
    lock = WriterLock(str(out), lock_path=str(out / LOCK_NAME), error=RunInUseError)
    refused: RunInUseError | None = None
    if accelerator.is_main_process:
        try:
            lock.acquire()
        except RunInUseError as e:
            refused = e
    try:
        if not all_ok(accelerator, refused is None):
            raise refused or RunInUseError(
                f"{out}: the main process could not take {out / LOCK_NAME} (see its message)"
            )
        yield
    finally:
        lock.release()
