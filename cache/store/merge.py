"""The merge of a format-2 cache: which segment slot holds each row of each teacher, as virtual datasets.

Rebuilt from the segments themselves at every fold (`cache.store.writer.fold`), so it is idempotent and a kill
anywhere only delays it: for each teacher, the segments of runs since the teacher's group started (`since_run`;
a recreated group never takes an old segment's rows), in run order, each committed slot it needed overriding what
earlier runs gave that row (a retried bad row); runs of consecutive rows in consecutive slots of one segment
become one mapping (one per process and run for a fresh run: processes get contiguous chunks). The statistics
add each segment's saved sums and correct them by reading only rows the sums must not count.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import h5py
import numpy as np

import cache.store.layout as L
from cache.store.segment_writer import read_sums
from cache.store.segments import SegmentInfo, SegTeacher
from cache.store.stats import TeacherSums, sums_of_rows
from teachers.kernel.modality import MODALITIES, Modality


@dataclass
class TeacherPlan:
    """Teacher NAME's rows as the segments give them: owner segment (index into `segs`, -1: none), its slot, done."""

    name: str
    segs: list[SegmentInfo]
    owner: np.ndarray
    slot: np.ndarray
    done: np.ndarray
    bad: dict[int, str] = field(default_factory=dict)

    @property
    def folded(self) -> dict[str, int]:
        """{segment file: committed chunks} this plan takes in (the group's `folded` attr)."""
        return {os.path.basename(s.path): len(s.committed) for s in self.segs if s.committed}


def relevant(segs: list[SegmentInfo], name: str, since: int) -> list[SegmentInfo]:
    return [s for s in segs if name in s.teachers and s.run >= since and s.committed]


def plan_teacher(n: int, segs: list[SegmentInfo], name: str) -> TeacherPlan:
    """Latest committed slot per row; done where that slot was stored; bad rows (not done) with why."""
    owner, slot = np.full(n, -1, np.int32), np.zeros(n, np.int64)
    done, bad = np.zeros(n, bool), {}
    for i, s in enumerate(segs):
        slots, ok = s.written(name)
        rows = s.rows[slots]
        owner[rows], slot[rows], done[rows] = i, slots, ok
        bad.update(s.bad.get(name, {}))
    return TeacherPlan(name, segs, owner, slot, done, {r: w for r, w in bad.items() if not done[r]})


def pending_chunks(folded: dict[str, int], segs: list[SegmentInfo]) -> int:
    """Committed chunks of `segs` that a group with attr `folded` has not taken in yet."""
    return sum(max(0, len(s.committed) - int(folded.get(os.path.basename(s.path), 0))) for s in segs)


def read_folded(g) -> dict[str, int]:
    return json.loads(g.attrs.get(L.FOLDED, "{}")) if g is not None else {}


# -- virtual datasets -----------------------------------------------------------------------------------------
def row_runs(owner: np.ndarray, slot: np.ndarray) -> list[tuple[int, int, int, int]]:
    """(first row, end row, segment index, first slot) of each run of rows mapped to consecutive slots."""
    n = len(owner)
    if n == 0:
        return []
    brk = np.r_[True, (owner[1:] != owner[:-1]) | (slot[1:] != slot[:-1] + 1)]
    starts = np.flatnonzero(brk)
    ends = np.r_[starts[1:], n]
    return [(int(a), int(b), int(owner[a]), int(slot[a])) for a, b in zip(starts, ends) if owner[a] >= 0]


def make_virtual(
    g,
    what: str,
    shape: tuple,
    dtype,
    maps: list[tuple[int, int, str, str, tuple, int]],
    chunk_rows: int,
    fill=np.nan,
    checksummed: bool = False,
) -> None:
    """Replace g[what] by a virtual dataset: each map (row0, row1, source file, source dataset, its shape, slot0)
    gives rows [row0, row1) from slots [slot0, ...) of the source; other rows read `fill`."""
    layout = h5py.VirtualLayout(shape=shape, dtype=dtype)
    for r0, r1, src, dset, src_shape, s0 in maps:
        layout[r0:r1] = h5py.VirtualSource(src, dset, shape=src_shape)[s0 : s0 + (r1 - r0)]
    if what in g:
        del g[what]
    ds = g.create_virtual_dataset(what, layout, fillvalue=fill)
    ds.attrs[L.CHUNK_ROWS] = int(chunk_rows)
    ds.attrs[L.CHECKSUMMED] = bool(checksummed)


def map_teacher(g, plan: TeacherPlan, meta: dict, folder: str) -> None:
    """Teacher group `g`'s image, text (and tokens) as virtual datasets over its plan's segments."""
    n = len(plan.owner)
    runs = row_runs(plan.owner, plan.slot)
    chunk = max([plan.segs[i].chunk for _, _, i, _ in runs] or [1])
    for what, args in SegTeacher(meta["attrs"], meta["dtype"]).datasets(n, chunk).items():
        inner = tuple(args["shape"][1:])
        dset = f"{L.teacher(plan.name)}/{what}"
        maps = [
            (a, b, f"{folder}/{os.path.basename(plan.segs[i].path)}", dset, (len(plan.segs[i].rows), *inner), s)
            for a, b, i, s in runs
        ]
        make_virtual(g, what, (n, *inner), args["dtype"], maps, chunk, checksummed=args["fletcher32"])


# -- statistics ------------------------------------------------------------------------------------------------
def plan_sums(plan: TeacherPlan, usable: np.ndarray) -> TeacherSums:
    """Sums over the usable rows: each segment's saved sums, less the rows it summed that are not usable from it
    now; a segment without saved sums (a killed run's) has its usable rows read."""
    total = TeacherSums()
    for i, s in enumerate(plan.segs):
        own = usable & (plan.owner == i)
        slots, ok = s.written(plan.name)
        saved = read_sums(s.path, len(s.committed))
        with h5py.File(s.path, "r") as f:
            img, txt = f[L.feature(plan.name, Modality.IMAGE)], f[L.feature(plan.name, Modality.TEXT)]
            if saved is not None and plan.name in saved:
                total.merge(saved[plan.name])
                stored = slots[ok]
                extra = stored[~own[s.rows[stored]]]
                if len(extra):
                    total.merge(sums_of_rows(img, txt, extra, sign=-1))
            elif own.any():
                total.merge(sums_of_rows(img, txt, np.sort(plan.slot[own])))
    return total


def dims_of(meta: dict) -> dict[str, int]:
    d = int(meta["attrs"]["embed_dim"])
    return {m.value: d for m in MODALITIES}


def copy_into(g, plan: TeacherPlan, folded: dict[str, int]) -> np.ndarray:
    """A format-1 teacher (real datasets, `g`): copy its rows of chunks committed since `folded` into them;
    returns the rows now done (resuming an old file keeps its layout; new teachers get segments)."""
    rows_done = []
    for s in plan.segs:
        new = s.committed[int(folded.get(os.path.basename(s.path), 0)) :]
        if not new:
            continue
        slots_all, ok = s.written(plan.name)
        keep = np.isin(slots_all, np.concatenate([np.arange(st, st + k) for st, k in s.chunks[new]]))
        slots = slots_all[keep & ok]
        if not len(slots):
            continue
        rows = s.rows[slots]
        order = np.argsort(rows)
        with h5py.File(s.path, "r") as f:
            for what in [m.value for m in MODALITIES] + ([L.TOKENS] if L.TOKENS in g else []):
                src = f[f"{L.teacher(plan.name)}/{what}"]
                lo, hi = int(slots.min()), int(slots.max()) + 1
                g[what][rows[order]] = src[lo:hi][slots[order] - lo]
        rows_done.append(rows)
    return np.concatenate(rows_done) if rows_done else np.zeros(0, np.int64)
