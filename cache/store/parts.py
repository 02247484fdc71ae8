"""What a running `distill cache` keeps beside FEATURES.h5 besides its segments: `FEATURES.h5.parts/NAME/meta.json`.

A teacher's meta (attrs, dtype, the run it started in) is written when a run starts it, so that a fold can create
its group without loading the model, and is removed by the fold that takes the run in; a teacher with a meta is
*pending*. The committed rows themselves live in segment files (`cache.store.segments`, `cache.store.segment_writer`).
Also here: the background thread that commits chunks while the next one is embedded (`PartWriter`), and turning
a full disk or a read-only folder into a one-line CacheError, for the segments and the fold alike.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from cache.store.schema import CacheError

# errno -> (what happened, what to do); the committed rows stay either way
_DISK_ERRORS = {
    errno.ENOSPC: ("no space left on device writing {}", "free space and rerun the same command"),
    errno.EDQUOT: ("disk quota exceeded writing {}", "free space (or raise the quota) and rerun the same command"),
    errno.EROFS: ("read-only file system: cannot write {}", "write --out to a writable folder, or remount it"),
    errno.EFBIG: ("file too large writing {}", "raise the file-size limit (ulimit -f) or write --out elsewhere"),
    errno.EACCES: ("permission denied writing {}", "fix the folder's permissions or choose another --out"),
    errno.EPERM: ("operation not permitted writing {}", "fix the folder's permissions or choose another --out"),
}


def _disk_errno(e: BaseException) -> int | None:
    """The errno of a full/read-only/forbidden disk, also when HDF5 reports it only in its message (h5py raises
    OSError or RuntimeError, e.g. "Can't decrement id ref count (... errno = 28, ...)")."""
    known = getattr(e, "errno", None)
    if known in _DISK_ERRORS:
        return known
    text = str(e)
    for code in _DISK_ERRORS:
        if os.strerror(code) in text or f"errno = {code}," in text:
            return code
    return None


@contextlib.contextmanager
def disk_errors(path: str):
    """Turn a full disk, quota, read-only or permission error while writing `path` into a CacheError."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        code = _disk_errno(e)
        if code is None:
            raise
        what, fix = _DISK_ERRORS[code]
        raise CacheError(f"{what.format(path)}; {fix}: committed rows are kept and the next run resumes") from e


# -- parts ------------------------------------------------------------------------------------------------
def parts_root(out: str) -> str:
    return out + ".parts"


def teacher_parts_dir(out: str, name: str) -> str:
    return os.path.join(parts_root(out), name)


def write_meta(out: str, name: str, meta: dict) -> None:
    """What a fold needs to create teacher NAME's group without loading the model (attrs, dtype, shapes)."""
    d = teacher_parts_dir(out, name)
    os.makedirs(d, exist_ok=True)
    _atomic_write_bytes(os.path.join(d, "meta.json"), json.dumps(meta, indent=1).encode())


def read_meta(out: str, name: str) -> dict | None:
    p = os.path.join(teacher_parts_dir(out, name), "meta.json")
    if not os.path.isfile(p):
        return None
    with open(p) as f:
        return json.load(f)


def _atomic_write_bytes(path: str, data: bytes) -> None:
    tmp = os.path.join(os.path.dirname(path), f".tmp-{os.getpid()}-{os.path.basename(path)}")
    with disk_errors(path), removed_on_error(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


@contextlib.contextmanager
def removed_on_error(tmp: str):
    """Delete a half-written temporary at once (a full disk gets its space back), then re-raise."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


class PartWriter:
    """Commits chunks (each a function writing its parts) in order in one background thread, so fsync overlaps
    the next chunk's forward passes; `submit` blocks while `depth` commits are pending. A commit's error is
    raised in the caller's thread (next `submit` or `join`) with its own message, and no later commit runs."""

    def __init__(self, depth: int = 1):
        self.depth = depth
        self._pending: deque[Future[None]] = deque()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache-parts")
        self._failed = threading.Event()

    def _run(self, commit: Callable[[], None]) -> None:
        if not self._failed.is_set():  # after a failed chunk nothing is written: the parts stay a prefix
            try:
                commit()
            except BaseException:
                self._failed.set()
                raise

    def submit(self, commit: Callable[[], None]) -> None:
        while len(self._pending) >= self.depth:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(self._run, commit))

    def join(self) -> None:
        """Wait for every submitted commit; raise the first error."""
        while self._pending:
            self._pending.popleft().result()

    def close(self) -> None:
        """Let submitted (complete) chunks finish, dropping their errors: the caller is raising its own."""
        for f in self._pending:
            with contextlib.suppress(BaseException):
                f.result()
        self._pending.clear()
        self._pool.shutdown(wait=True)


def pending_teachers(out: str) -> list[str]:
    """Teachers with a parts folder (committed chunks not yet folded, or a run in progress)."""
    root = parts_root(out)
    if not os.path.isdir(root):
        return []
    return sorted(n for n in os.listdir(root) if os.path.isdir(os.path.join(root, n)))


def clean_temporaries(out: str) -> None:
    """Remove half-written files of killed runs (never a committed chunk)."""
    for p in [out + ".tmp", *glob.glob(os.path.join(parts_root(out), "*", ".tmp-*"))]:
        try:
            os.remove(p)
        except FileNotFoundError:
            pass
