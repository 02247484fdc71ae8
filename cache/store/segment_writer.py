"""Filling one segment file in place, so that a kill -9 at any instant loses at most the chunks in flight.

Why this is safe without trusting HDF5's crash behaviour: after `create_segment` (complete, renamed into place)
HDF5 never opens the file for writing again. A committed chunk of rows is written as finished HDF5 chunks (the
bytes HDF5 itself produces, data + fletcher32, taken from an in-memory twin of the dataset with
`read_direct_chunk`) at the byte offsets the file allocated for them (`chunk_iter`), with `os.pwrite`; then the
file is fsynced and one line naming the chunk is appended to the segment's log and fsynced. The line is the
commit: a kill before it leaves bytes nobody maps, a kill during it a torn line the reader drops
(`segments.read_log`), and no HDF5 chunk holds rows of two commits (chunks start at multiples of the HDF5 chunk
rows, `segments.chunk_layout`), so a commit never touches committed bytes. At the end of a run the writer's
running sums (`cache.store.stats`, for the teacher statistics) are saved beside it (`run-...sums.h5`).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field

import h5py
import numpy as np
import torch

import cache.store.layout as L
from cache.store.disk import h5_on_disk
from cache.store.parts import disk_errors
from cache.store.schema import CacheError
from cache.store.segments import (
    SegTeacher,
    _pwrite_all,
    chunk_layout,
    create_segment,
    log_line,
    log_path,
    removed_on_error,
    segment_name,
    sums_path,
)
from cache.store.stats import TeacherSums


@dataclass
class _Dataset:
    """One dataset of the segment: where each HDF5 chunk lives in the file, and an in-memory twin to encode."""

    inner: tuple[int, ...]
    dtype: np.dtype
    chunk: int
    twin: h5py.Dataset
    offsets: dict[int, tuple[int, int]] = field(default_factory=dict)  # chunk index -> (byte offset, size)


class SegmentWriter:
    """This process's segment of one run: `put` each teacher's rows of a chunk, then `commit` the chunk."""

    def __init__(
        self,
        folder: str,
        run: int,
        rank: int,
        chunks: list[np.ndarray],
        need_of,
        teachers: dict,
        chunk_rows: int,
        h5_chunk_rows: int,
        fingerprint: str,
        sums: bool = True,
    ):
        """`chunks`: this process's chunks of rows, in commit order; `need_of(rows) -> (n, T) bool` over
        `teachers` (NAME -> SegTeacher); HDF5 chunks of gcd(chunk_rows, h5_chunk_rows) rows."""
        self.path = os.path.join(folder, segment_name(run, rank))
        self.names = list(teachers)
        self.c = int(np.gcd(int(chunk_rows), int(h5_chunk_rows))) if chunk_rows % h5_chunk_rows else h5_chunk_rows
        self.rows, self.chunks = chunk_layout(chunks, self.c)
        need = np.zeros((len(self.rows), len(self.names)), dtype=bool)
        used = self.rows >= 0
        if used.any():
            need[used] = need_of(self.rows[used])
        self.need = need
        create_segment(
            self.path,
            self.rows,
            self.chunks,
            need,
            teachers,
            self.c,
            {"fingerprint": fingerprint, "run": run, "rank": rank, "chunk_rows": int(chunk_rows)},
        )
        self._sets: dict[str, _Dataset] = {}
        self._mem = h5py.File(io.BytesIO(), "w")
        longest = int(self.chunks[:, 1].max()) if len(self.chunks) else 1
        with h5py.File(self.path, "r") as f:
            for name in self.names:
                for what, ds in f[L.teacher(name)].items():
                    inner, chunk = ds.shape[1:], ds.chunks[0]
                    span = -(-longest // chunk) * chunk + chunk  # a chunk's rows may start mid-twin: + 1
                    twin = self._mem.create_dataset(
                        f"{name}/{what}",
                        shape=(span, *inner),
                        dtype=ds.dtype,
                        chunks=(chunk, *inner),
                        fletcher32=True,
                    )
                    d = _Dataset(inner, ds.dtype, chunk, twin)
                    for i in _chunks(ds):
                        d.offsets[i.chunk_offset[0] // d.chunk] = (i.byte_offset, i.size)
                    self._sets[f"{name}/{what}"] = d
        self._fd = os.open(self.path, os.O_RDWR)
        self._log = os.open(log_path(self.path), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._slot = {int(r): i for i, r in enumerate(self.rows.tolist()) if r >= 0}
        self._bad: dict[str, list] = {}
        self._put: dict[str, set[int]] = {}
        self.sums = {n: TeacherSums() for n in self.names} if sums else None
        self.committed = 0

    # -- one chunk ----------------------------------------------------------------------------------------
    def chunk_of(self, rows) -> int:
        """The chunk holding all of `rows` (the builder's chunks never straddle)."""
        slot = self._slot[int(rows[0])]
        return int(np.searchsorted(self.chunks[:, 0], slot, side="right") - 1)

    def put(self, name: str, rows: np.ndarray, arrays: dict[str, np.ndarray], bad_rows=(), bad_reasons=()) -> None:
        """Write teacher NAME's stored rows (`arrays`: image, text[, tokens], in storage dtype) of one chunk into
        the file (not yet committed); `bad_rows` are its rows that could not be embedded, with why."""
        rows = np.asarray(rows, np.int64)
        some = rows if len(rows) else np.asarray(list(bad_rows), np.int64)
        if not len(some):
            return
        j = self.chunk_of(some)
        start, n = (int(x) for x in self.chunks[j])
        pos = np.asarray([self._slot[int(r)] for r in rows.tolist()], np.int64) - start
        for what, x in arrays.items():
            self._write(self._sets[f"{name}/{what}"], start, n, pos, x)
        self._put.setdefault(name, set()).update(rows.tolist())
        self._bad.setdefault(name, []).extend([int(r), str(w)] for r, w in zip(bad_rows, bad_reasons))

    def _write(self, d: _Dataset, start: int, n: int, pos: np.ndarray, x: np.ndarray) -> None:
        """Rows `pos` (of the chunk at slot `start`, n slots) as whole HDF5 chunks, unwritten slots NaN."""
        first = start // d.chunk
        count = -(-n // d.chunk)
        buf = np.full((count * d.chunk, *d.inner), np.nan, dtype=d.dtype)
        buf[pos] = np.asarray(x, dtype=d.dtype)
        d.twin[: len(buf)] = buf
        with disk_errors(self.path):
            for k in range(count):
                _, data = d.twin.id.read_direct_chunk((k * d.chunk,) + (0,) * len(d.inner))
                offset, size = d.offsets[first + k]
                if len(data) != size:
                    raise CacheError(f"{self.path}: HDF5 chunk of {len(data)} bytes for a slot of {size}")
                _pwrite_all(self._fd, data, offset)

    def commit(self, j: int) -> None:
        """Make chunk j durable: fsync the data, then append and fsync its log line (the commit)."""
        start, n = (int(x) for x in self.chunks[j])
        rows = self.rows[start : start + n]
        skip = {}
        for t, name in enumerate(self.names):
            needed = rows[self.need[start : start + n, t]]
            missing = np.setdiff1d(needed, np.fromiter(self._put.get(name, ()), np.int64))
            if len(missing):
                skip[name] = missing.tolist()
        bad = {name: pairs for name, pairs in self._bad.items() if pairs}
        with disk_errors(self.path):
            os.fdatasync(self._fd)
            os.write(self._log, log_line({"chunk": j, "skip": skip, "bad": bad}))
            os.fdatasync(self._log)
        self._bad, self._put = {}, {}
        self.committed += 1

    def add_sums(self, name: str, image: torch.Tensor, text: torch.Tensor) -> None:
        """Count a chunk's stored rows of teacher NAME in its statistics (any device)."""
        if self.sums is not None:
            self.sums[name].add(image, text)

    def finish(self) -> None:
        """Save the running sums beside the segment (atomically): the merge's statistics need no re-read."""
        if self.sums is None:
            return
        path = sums_path(self.path)
        tmp = os.path.join(os.path.dirname(path), f".tmp-{os.path.basename(path)}")
        with disk_errors(path), removed_on_error(tmp):
            with h5_on_disk(tmp, "w") as f:  # fsynced on close
                f.attrs["chunks"] = self.committed
                for name, s in self.sums.items():
                    g = f.create_group(name)
                    for k, v in s.to_arrays().items():
                        g.create_dataset(k, data=v)
            os.replace(tmp, path)

    def close(self) -> None:
        for fd in (self._fd, self._log):
            try:
                os.close(fd)
            except OSError:
                pass
        self._fd = self._log = -1
        self._mem.close()


def _chunks(ds: h5py.Dataset) -> list:
    """Every allocated chunk's StoreInfo (offset in the dataset, byte offset in the file, size)."""
    if hasattr(ds.id, "chunk_iter"):  # HDF5 >= 1.13: one pass
        out: list = []
        ds.id.chunk_iter(out.append)
        return out
    return [ds.id.get_chunk_info(i) for i in range(ds.id.get_num_chunks())]


def read_sums(path: str, committed: int) -> dict[str, TeacherSums] | None:
    """A segment's saved sums, when they cover exactly its `committed` chunks (else None: re-read its rows)."""
    p = sums_path(path)
    if not os.path.isfile(p):
        return None
    with h5py.File(p, "r") as f:
        if int(f.attrs["chunks"]) != committed:
            return None
        return {name: TeacherSums.from_arrays({k: v[()] for k, v in g.items()}) for name, g in f.items()}


def seg_teachers(metas: dict[str, dict]) -> dict[str, SegTeacher]:
    """SegTeacher per teacher meta (`h5_parts.write_meta`'s dicts)."""
    return {name: SegTeacher(dict(m["attrs"]), str(m["dtype"])) for name, m in metas.items()}
