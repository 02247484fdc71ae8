"""Segment files of a format-2 feature cache (`cache.store.layout`): naming, creation, reading back what they hold.

A segment is created complete and empty (`create_segment`: every HDF5 chunk allocated, the file sparse, written
to a temporary name and renamed), then filled in place by one process (`cache.store.segment_writer`), which commits each
finished chunk of rows by a line in the segment's log (`run-...log`, JSON lines with a CRC, fsynced): a slot is
committed when its chunk's line is complete, whatever else the file holds. `SegmentInfo` reads a segment's header
and log for the merge; `copy_cache` copies a cache with its folder under a new name.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import zlib
from dataclasses import dataclass, field

import h5py
import numpy as np
from h5py import h5d, h5p

import cache.store.layout as L
from cache.store.disk import h5_on_disk, pwrite_all
from cache.store.parts import disk_errors, removed_on_error
from cache.store.schema import storage_dtype
from cache.store.shard_record import record_path
from teachers.kernel.modality import MODALITIES, Modality

SEGMENT_FORMAT = "biomed-distill-segment"
_NAME = re.compile(r"^run-(\d{6})-(rank-\d{4}-\d+|keys|views)\.h5$")


def segment_dir(out: str) -> str:
    """The segment folder of cache file `out`: as the file records it, else `OUT.segments` beside it."""
    name = os.path.basename(out) + L.SEGMENTS_SUFFIX
    try:
        with h5py.File(out, "r") as f:
            name = str(f.attrs.get(L.Root.SEGMENTS, name))
    except OSError:  # not there yet, or damaged (its readers name it)
        pass
    return os.path.join(os.path.dirname(os.path.abspath(out)), name)


def segment_name(run: int, rank: int, pid: int | None = None) -> str:
    return f"run-{run:06d}-rank-{rank:04d}-{os.getpid() if pid is None else pid}.h5"


def log_path(path: str) -> str:
    return path[: -len(".h5")] + ".log"


def sums_path(path: str) -> str:
    return path[: -len(".h5")] + ".sums.h5"


def run_of(path: str) -> int:
    m = _NAME.match(os.path.basename(path))
    return int(m.group(1)) if m else -1


def list_segments(folder: str) -> list[str]:
    """Segment files (not keys/views files) in run, rank order."""
    if not os.path.isdir(folder):
        return []
    names = [n for n in os.listdir(folder) if _NAME.match(n) and "-rank-" in n]
    return [os.path.join(folder, n) for n in sorted(names)]


def next_run(folder: str) -> int:
    """A run number above every file in the folder: later runs override earlier ones row by row."""
    runs = [int(m.group(1)) for n in (os.listdir(folder) if os.path.isdir(folder) else ()) if (m := _NAME.match(n))]
    return max(runs, default=0) + 1


# -- creation ---------------------------------------------------------------------------------------------
_pwrite_all = pwrite_all  # the segment writer's raw chunk writes (tests simulate a full disk here)


@dataclass(frozen=True)
class SegTeacher:
    """One teacher's datasets in a segment: as its group in the cache (`meta`: attrs, dtype) says."""

    attrs: dict
    dtype: str

    def datasets(self, rows: int, chunk: int) -> dict[str, dict]:
        """{dataset path tail: create_dataset args} for image, text and (with --tokens) tokens."""
        d, k, dt = int(self.attrs["embed_dim"]), int(self.attrs.get("views", 0)), storage_dtype(self.dtype)
        out = {m.value: L.feature_dataset_args(rows, d, k, dt, chunk, m) for m in MODALITIES}
        grid = int(self.attrs.get("tokens", 0))
        if grid:
            out[L.TOKENS] = L.feature_dataset_args(
                rows, int(self.attrs["token_dim"]), k, dt, chunk, Modality.IMAGE, tokens=grid * grid
            )
        return out


def chunk_layout(chunks: list[np.ndarray], align: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows per slot, (J, 2) slot start and length per chunk): each chunk's rows sorted, each chunk starting at a
    multiple of `align` (the HDF5 chunk rows), so that no HDF5 chunk holds rows of two commits."""
    starts, slots, pos = [], [], 0
    for c in chunks:
        start = -(-pos // align) * align
        if start > pos:
            slots.append(np.full(start - pos, -1, np.int64))
        slots.append(np.sort(np.asarray(c, np.int64)))
        starts.append((start, len(c)))
        pos = start + len(c)
    rows = np.concatenate(slots) if slots else np.zeros(0, np.int64)
    return rows, np.asarray(starts, np.int64).reshape(-1, 2)


def create_segment(
    path: str,
    rows: np.ndarray,
    chunks: np.ndarray,
    need: np.ndarray,
    teachers: dict[str, SegTeacher],
    chunk: int,
    attrs: dict,
) -> None:
    """Write segment `path` (atomically): its slots' rows, chunks, need (M, T), and per teacher its datasets,
    every chunk allocated (sparse) so that filling it later never changes the file's structure."""
    tmp = os.path.join(os.path.dirname(path), f".tmp-{os.path.basename(path)}")
    with disk_errors(path), removed_on_error(tmp):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with h5_on_disk(tmp, "w", sparse=True) as f:
            f.attrs.update({"format": SEGMENT_FORMAT, **attrs})
            f.create_dataset(L.SEG_ROWS, data=rows, compression="gzip", shuffle=True)
            f.create_dataset(L.SEG_CHUNKS, data=chunks)
            f.create_dataset(L.SEG_NEED, data=need, compression="gzip")
            f[L.SEG_NEED].attrs["teachers"] = list(teachers)
            for name, t in teachers.items():
                g = f.create_group(L.teacher(name))
                g.attrs["meta"] = json.dumps({"attrs": t.attrs, "dtype": t.dtype})
                for what, args in t.datasets(len(rows), chunk).items():
                    dcpl = h5p.create(h5p.DATASET_CREATE)
                    dcpl.set_alloc_time(h5d.ALLOC_TIME_EARLY)
                    g.create_dataset(what, dcpl=dcpl, **args)
        os.replace(tmp, path)


def write_small(path: str, name: str, data: np.ndarray, attrs: dict | None = None, **kw) -> None:
    """A one-dataset file written once (keys, view parameters), atomically; a full disk leaves no temporary."""
    tmp = os.path.join(os.path.dirname(path), f".tmp-{os.path.basename(path)}")
    with disk_errors(path), removed_on_error(tmp):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with h5_on_disk(tmp, "w") as f:  # fsynced on close
            ds = f.create_dataset(name, data=data, **kw)
            ds.attrs.update(attrs or {})
        os.replace(tmp, path)


# -- reading back -------------------------------------------------------------------------------------------
def read_log(path: str) -> list[dict]:
    """The complete, intact records of a segment's log, in order; a torn last line (a kill mid-append) is not."""
    out = []
    try:
        with open(log_path(path), "rb") as fh:
            lines = fh.read().split(b"\n")
    except FileNotFoundError:
        return []
    for line in lines[:-1]:  # the part after the last newline is never complete
        try:
            rec = json.loads(line)
            crc = rec.pop("crc")
        except (ValueError, KeyError):
            break
        if zlib.crc32(json.dumps(rec, sort_keys=True).encode()) != crc:
            break
        out.append(rec)
    return out


def log_line(rec: dict) -> bytes:
    return (json.dumps({**rec, "crc": zlib.crc32(json.dumps(rec, sort_keys=True).encode())}) + "\n").encode()


@dataclass
class SegmentInfo:
    """What one segment holds: its slots' rows, which teacher needed which slot, the committed chunks and, per
    teacher, the needed slots of committed chunks it did not store (bad or unread: `skip`) and its bad rows."""

    path: str
    run: int
    fingerprint: str
    rows: np.ndarray
    chunks: np.ndarray
    need: np.ndarray
    teachers: list[str]
    metas: dict[str, dict]
    committed: list[int]
    skip: dict[str, set[int]] = field(default_factory=dict)
    bad: dict[str, dict[int, str]] = field(default_factory=dict)
    chunk: int = 1

    @classmethod
    def read(cls, path: str) -> SegmentInfo:
        recs = read_log(path)
        with h5py.File(path, "r") as f:
            names = [str(n) for n in f[L.SEG_NEED].attrs["teachers"]]
            metas = {n: json.loads(f[L.teacher(n)].attrs["meta"]) for n in names}
            chunk = max([L.chunk_rows_of(f[L.feature(n, Modality.TEXT)]) for n in names] or [1])
            info = cls(
                path,
                run_of(path),
                str(f.attrs.get("fingerprint", "")),
                f[L.SEG_ROWS][:],
                f[L.SEG_CHUNKS][:],
                f[L.SEG_NEED][:],
                names,
                metas,
                [],
                chunk=chunk,
            )
        for rec in recs:
            info.committed.append(int(rec["chunk"]))
            for n, rows in rec.get("skip", {}).items():
                info.skip.setdefault(n, set()).update(int(r) for r in rows)
            for n, pairs in rec.get("bad", {}).items():
                info.bad.setdefault(n, {}).update((int(r), str(why)) for r, why in pairs)
        return info

    def committed_slots(self) -> np.ndarray:
        """(M,) bool: slots of committed chunks."""
        mask = np.zeros(len(self.rows), dtype=bool)
        for j in self.committed:
            start, n = self.chunks[j]
            mask[start : start + n] = True
        return mask

    def written(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(slots, done) of teacher NAME: the committed slots it needed, and which of them it stored."""
        if name not in self.teachers:
            return np.zeros(0, np.int64), np.zeros(0, bool)
        slots = np.flatnonzero(self.committed_slots() & self.need[:, self.teachers.index(name)])
        skip = self.skip.get(name, set())
        done = ~np.isin(self.rows[slots], np.fromiter(skip, np.int64, len(skip))) if skip else np.ones(len(slots), bool)
        return slots, done


# -- copying a cache -----------------------------------------------------------------------------------------
def copy_cache(src: str, dst: str) -> str:
    """Copy cache file `src` and its segment folder to `dst` and `DST.segments`, the copy's mappings pointing at
    its own folder (HDF5 stores a source's path in each mapping: they are rewritten, not the data)."""
    shutil.copyfile(src, dst)
    old = segment_dir(src)
    if os.path.isdir(old):
        new = os.path.basename(dst) + L.SEGMENTS_SUFFIX
        shutil.copytree(old, os.path.join(os.path.dirname(os.path.abspath(dst)), new), dirs_exist_ok=True)
        relink(dst, os.path.basename(old), new)
    if os.path.isfile(record_path(src)):  # the bad-shard record of a streamed corpus
        shutil.copyfile(record_path(src), record_path(dst))
    return dst


def relink(path: str, old: str, new: str) -> None:
    """Point every virtual dataset of `path` mapping files in folder `old` at folder `new` (names relative)."""
    with disk_errors(path), h5_on_disk(path, "r+") as f:
        found = []
        f.visititems(lambda n, o: found.append(n) if isinstance(o, h5py.Dataset) and o.is_virtual else None)
        for name in found:
            ds = f[name]
            src, attrs = ds.id.get_create_plist(), dict(ds.attrs)
            dcpl = h5p.create(h5p.DATASET_CREATE)
            dcpl.set_fill_value(np.array(ds.fillvalue, dtype=ds.dtype))
            for i in range(src.get_virtual_count()):
                fname = src.get_virtual_filename(i)
                if fname.startswith(old + "/"):
                    fname = new + fname[len(old) :]
                dcpl.set_virtual(
                    src.get_virtual_vspace(i),
                    fname.encode(),
                    src.get_virtual_dsetname(i).encode(),
                    src.get_virtual_srcspace(i),
                )
            tid, sid = ds.id.get_type(), ds.id.get_space()
            del f[name]
            h5py.Dataset(h5d.create(f.id, name.encode(), tid, sid, dcpl=dcpl)).attrs.update(attrs)
        f.attrs[L.Root.SEGMENTS] = new
