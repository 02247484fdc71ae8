"""Writing the feature cache so that a kill -9 at any instant loses at most the chunks in flight.

The scheme (known-safe because it leans only on POSIX rename, never on HDF5's own crash behaviour):

1. **Parts.** Workers never touch FEATURES.h5. Each finished chunk of rows becomes one small `.npz` file in
   `FEATURES.h5.parts/NAME/` (rows, image and text embeddings, bad samples), written to a temporary name,
   fsynced, then renamed: a part either exists complete or not at all. That rename is the commit. The builder
   commits a chunk in a background thread (`PartWriter`) while it embeds the next one, so a kill loses at most
   two chunks per process: the one being written and the one being embedded.
2. **Fold.** Only the lock holder changes FEATURES.h5, and only by copy-on-write: copy it to `FEATURES.h5.tmp`,
   write the parts' rows and `done` flags (and statistics, bad-sample records) into the copy, fsync, then
   `os.replace` it over the original. Parts are deleted only after the rename, so a kill anywhere leaves the old
   complete file or the new one, and the parts not yet folded; folding a part twice writes the same values.

So a killed run leaves a file that opens and keeps every committed row (in the file, or in parts that the next
run folds in first). The cost is one file copy per fold (once per teacher per run), small next to embedding.
Multi-process runs write parts from every process (one file each, never two writers on one file) and the
lock holder folds them: that is the shard-then-merge step.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import shutil
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable

import h5py
import numpy as np

from teachers.modality import MODALITIES

from . import layout as L
from .schema import FORMAT, VERSION, CacheError, created_by, storage_dtype, str_dtype

STATS_BLOCK_ROWS = 4096

# errno -> (what happened, what to do); the committed rows stay either way
_DISK_ERRORS = {
    errno.ENOSPC: ("no space left on device writing {}", "free space and rerun the same command"),
    errno.EDQUOT: ("disk quota exceeded writing {}", "free space (or raise the quota) and rerun the same command"),
    errno.EROFS: ("read-only file system: cannot write {}", "write --out to a writable folder, or remount it"),
    errno.EACCES: ("permission denied writing {}", "fix the folder's permissions or choose another --out"),
    errno.EPERM: ("operation not permitted writing {}", "fix the folder's permissions or choose another --out"),
}


def _disk_errno(e: OSError) -> int | None:
    """The errno of a full/read-only/forbidden disk, also when HDF5 reports it only in its message."""
    if e.errno in _DISK_ERRORS:
        return e.errno
    text = str(e)
    for code in _DISK_ERRORS:
        if os.strerror(code) in text or f"errno = {code}," in text:
            return code
    return None


@contextlib.contextmanager
def disk_errors(path: str):
    """Turn a full disk, quota, read-only or permission OSError while writing `path` into a CacheError."""
    try:
        yield
    except OSError as e:
        code = _disk_errno(e)
        if code is None:
            raise
        what, fix = _DISK_ERRORS[code]
        raise CacheError(f"{what.format(path)}; {fix}: committed rows are kept and the next run resumes") from e


# -- atomic file replacement ------------------------------------------------------------------------------
def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    try:
        _fsync_path(os.path.dirname(os.path.abspath(path)) or ".")
    except OSError:  # some filesystems refuse fsync on directories; rename is still atomic
        pass


def atomic_update(path: str, fn: Callable[[h5py.File], None]) -> None:
    """Apply `fn` to a copy of `path` (or a new file) and rename it over `path`: all of fn's changes or none."""
    tmp = path + ".tmp"
    if os.path.exists(tmp):
        os.remove(tmp)
    exists = os.path.exists(path)
    with disk_errors(tmp):
        try:
            if exists:
                shutil.copyfile(path, tmp)
            with h5py.File(tmp, "r+" if exists else "w") as f:
                fn(f)
            _fsync_path(tmp)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        os.replace(tmp, path)
    _fsync_dir(path)


def create_file(path: str, keys: list[str], fingerprint: str, source: str) -> None:
    """A new, empty cache: root attrs and /keys; teachers arrive with their first fold."""
    def fn(f: h5py.File) -> None:
        f.attrs.update({L.Root.FORMAT: FORMAT, L.Root.VERSION: VERSION, L.Root.FINGERPRINT: fingerprint,
                        L.Root.CREATED_BY: created_by(), L.Root.NUM_ROWS: len(keys), L.Root.SOURCE: str(source)})
        f.create_dataset(L.KEYS, data=np.array(keys, dtype=object), dtype=str_dtype())
        f.create_group(L.TEACHERS)
    atomic_update(path, fn)


def add_views(path: str, params: np.ndarray, seed: int, h5_chunk_rows: int = L.DEFAULT_CHUNK_ROWS) -> None:
    """Store the (N, K, 5) view parameters once; every teacher with views replays them."""
    from . import views as V

    def fn(f: h5py.File) -> None:
        n, k, _ = params.shape
        ds = f.create_dataset(L.VIEW_PARAMS, data=params.astype(np.float32), chunks=L.view_chunks(n, k, h5_chunk_rows))
        ds.attrs.update({"seed": int(seed), "scale": list(V.SCALE), "ratio": list(V.RATIO), "flip_p": V.FLIP_P,
                         "layout": "x0, y0, w, h (relative crop box), flip"})
    atomic_update(path, fn)


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
    with disk_errors(path), _removed_on_error(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


@contextlib.contextmanager
def _removed_on_error(tmp: str):
    """Delete a half-written temporary at once (a full disk gets its space back), then re-raise."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_part(out: str, name: str, rows: np.ndarray, image: np.ndarray, text: np.ndarray,
               bad_rows: Iterable[int] = (), bad_reasons: Iterable[str] = (), tag: str = "") -> str:
    """Commit one chunk of rows for teacher NAME (atomic rename); returns the part's path."""
    rows = np.asarray(rows, dtype=np.int64)
    bad_rows = np.asarray(list(bad_rows), dtype=np.int64)
    bad_reasons = np.asarray(list(bad_reasons), dtype=str)
    first = int(rows[0]) if len(rows) else (int(bad_rows[0]) if len(bad_rows) else 0)
    d = teacher_parts_dir(out, name)
    path = os.path.join(d, f"part-{first:010d}-{len(rows)}-{os.getpid()}{tag}.npz")
    tmp = os.path.join(d, f".tmp-{os.getpid()}-{os.path.basename(path)}")
    with disk_errors(path), _removed_on_error(tmp):
        os.makedirs(d, exist_ok=True)
        with open(tmp, "wb") as f:
            np.savez(f, rows=rows, image=image, text=text, bad_rows=bad_rows, bad_reasons=bad_reasons)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return path


class PartWriter:
    """Commits chunks (each a function writing its parts) in order in one background thread, so fsync overlaps
    the next chunk's forward passes; `submit` blocks while `depth` commits are pending. A commit's error is
    raised in the caller's thread (next `submit` or `join`) with its own message, and no later commit runs."""

    def __init__(self, depth: int = 1):
        self.depth, self._pending = depth, deque()
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


def list_parts(out: str, name: str) -> list[str]:
    return sorted(glob.glob(os.path.join(teacher_parts_dir(out, name), "part-*.npz")))


def pending_teachers(out: str) -> list[str]:
    """Teachers with a parts folder (committed chunks not yet folded, or a run in progress)."""
    root = parts_root(out)
    if not os.path.isdir(root):
        return []
    return sorted(n for n in os.listdir(root) if os.path.isdir(os.path.join(root, n)))


def clean_temporaries(out: str) -> None:
    """Remove half-written files of killed runs (never a committed part)."""
    for p in [out + ".tmp", *glob.glob(os.path.join(parts_root(out), "*", ".tmp-*"))]:
        try:
            os.remove(p)
        except FileNotFoundError:
            pass


# -- folding parts into the file --------------------------------------------------------------------------
def _ensure_group(f: h5py.File, name: str, meta: dict) -> h5py.Group:
    if L.teacher(name) in f:
        return f[L.teacher(name)]
    n = int(f.attrs[L.Root.NUM_ROWS])
    d, k = int(meta["attrs"]["embed_dim"]), int(meta["attrs"]["views"])
    dtype = storage_dtype(meta["dtype"])
    c = int(meta.get("h5_chunk_rows", L.DEFAULT_CHUNK_ROWS))
    g = f.create_group(L.teacher(name))
    g.attrs.update(meta["attrs"])
    g.attrs["dtype"] = meta["dtype"]
    for m in MODALITIES:
        f.create_dataset(L.feature(name, m), **L.feature_dataset_args(n, d, k, dtype, c, m))
    f.create_dataset(L.done(name), **L.done_dataset_args(n))
    return g


def _write_rows(ds: h5py.Dataset, rows: np.ndarray, values: np.ndarray) -> None:
    if len(rows) == 0:
        return
    if rows[-1] - rows[0] + 1 == len(rows):  # contiguous: one hyperslab
        ds[int(rows[0]):int(rows[-1]) + 1] = values
    else:
        ds[rows] = values


def read_bad(f: h5py.File) -> dict[int, str]:
    if L.BAD not in f:
        return {}
    return dict(zip(f[L.BAD_ROWS][:].tolist(), f[L.BAD_REASONS].asstr()[:].tolist()))


def _write_bad(f: h5py.File, bad: dict[int, str]) -> None:
    if L.BAD in f:
        del f[L.BAD]
    rows = np.array(sorted(bad), dtype=np.int64)
    keys = f[L.KEYS].asstr()[rows] if len(rows) else np.array([], dtype=object)
    f.create_group(L.BAD)
    f.create_dataset(L.BAD_ROWS, data=rows, dtype=np.int64)
    f.create_dataset(L.BAD_KEYS, data=np.asarray(keys, dtype=object), dtype=str_dtype())
    f.create_dataset(L.BAD_REASONS, data=np.array([bad[int(r)] for r in rows], dtype=object), dtype=str_dtype())


def compute_stats(g: h5py.Group, usable: np.ndarray, block: int = STATS_BLOCK_ROWS) -> None:
    """Mean and covariance of the usable rows' image (all views) and text embeddings, into NAME/stats/."""
    if L.STATS in g:
        del g[L.STATS]
    s = g.create_group(L.STATS)
    for what in MODALITIES:
        ds = g[what]
        d = ds.shape[-1]
        total, outer, n = np.zeros(d), np.zeros((d, d)), 0
        for start in range(0, ds.shape[0], block):
            m = usable[start:start + block]
            if not m.any():
                continue
            x = ds[start:start + block][m].astype(np.float64).reshape(-1, d)
            total += x.sum(0)
            outer += x.T @ x
            n += len(x)
        mean = total / max(n, 1)
        cov = (outer - n * np.outer(mean, mean)) / max(n - 1, 1)
        s.create_dataset(f"{what}_mean", data=mean.astype(np.float32))
        s.create_dataset(f"{what}_cov", data=cov.astype(np.float32))
        s.attrs[f"{what}_count"] = n
    s.attrs["count"] = int(usable.sum())


def fold(out: str, names: Iterable[str] | None = None) -> dict[str, int]:
    """Fold committed parts of the named teachers (default: all pending) into `out`, atomically.

    Returns the number of rows folded per teacher. Statistics are (re)written for a teacher once every row is
    either done or recorded as bad.
    """
    names = pending_teachers(out) if names is None else [n for n in names if n in pending_teachers(out)]
    plan = {n: (read_meta(out, n), list_parts(out, n)) for n in names}
    plan = {n: (m, p) for n, (m, p) in plan.items() if m is not None}
    if not plan:
        return {}
    folded: dict[str, int] = {}

    def fn(f: h5py.File) -> None:
        bad = read_bad(f)
        bad_before = dict(bad)
        groups, new_bad, new_done = {}, {}, set()
        for name, (meta, parts) in plan.items():
            g = groups[name] = _ensure_group(f, name, meta)
            done = g[L.DONE][:]
            count = 0
            for p in parts:
                with np.load(p, allow_pickle=False) as z:
                    rows = z["rows"]
                    if len(rows):
                        for m in MODALITIES:
                            _write_rows(g[m], rows, z[m])
                        done[rows] = True
                        count += len(rows)
                        new_done.update(rows.tolist())
                    for r, reason in zip(z["bad_rows"].tolist(), z["bad_reasons"].tolist()):
                        if not done[r]:
                            new_bad[int(r)] = str(reason)
            g[L.DONE][...] = done
            folded[name] = count
        # A bad record is per row (a bad image is bad for every teacher; a teacher's NaN row is dropped for all):
        # it is lifted only once a retried row is done for EVERY teacher in the file, so one teacher succeeding
        # on a row never hides another teacher's failure on it.
        all_done = np.ones(int(f.attrs[L.Root.NUM_ROWS]), dtype=bool)
        for g in f[L.TEACHERS].values():
            all_done &= g[L.DONE][:]
        for r in new_done:
            if all_done[r] and r not in new_bad:
                bad.pop(r, None)
        bad.update(new_bad)
        _write_bad(f, bad)
        bad_mask = np.zeros(int(f.attrs[L.Root.NUM_ROWS]), dtype=bool)
        bad_mask[list(bad)] = True
        # statistics cover the usable rows (done, not bad): a teacher that completed earlier is recomputed when
        # another teacher's failures changed the bad rows since
        for name, g in f[L.TEACHERS].items():
            if name not in groups and bad == bad_before:
                continue
            done = g[L.DONE][:]
            if (done | bad_mask).all():
                compute_stats(g, done & ~bad_mask)

    atomic_update(out, fn)
    for name, (_, parts) in plan.items():  # only now: the rows are safe in the file
        for p in parts:
            os.remove(p)
        d = teacher_parts_dir(out, name)
        if not list_parts(out, name):
            shutil.rmtree(d, ignore_errors=True)
    root = parts_root(out)
    if os.path.isdir(root) and not os.listdir(root):
        os.rmdir(root)
    return folded


def ensure_writable_target(out: str) -> None:
    d = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(d):
        raise CacheError(f"output folder {d} does not exist; create it first")
