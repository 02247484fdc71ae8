"""How `distill cache` commits its chunks: which rows each process gets, its segment, one commit per chunk.

Why contiguous chunks per process (rank r gets chunks [r*C/W, (r+1)*C/W)), not round-robin: a process's segment
then covers one run of rows, which the merge maps with one virtual-dataset mapping per teacher and modality
(round-robin would need one per chunk: thousands at 24M rows, each searched on every read). Streamed corpora
keep their own dealing (whole shards per rank, `cache.build.stream`); their chunks are read off that plan.
"""

from __future__ import annotations

import os
import shutil

import h5py
import numpy as np
import torch

import cache.store.layout as L
import cache.store.segments as S
import cache.store.writer as W
from cache.build.dist import DistEnv
from cache.store.segment_writer import SegmentWriter, seg_teachers


def deal(chunks: list[np.ndarray], env: DistEnv) -> list[np.ndarray]:
    """This process's chunks: a contiguous share, the first processes taking one more when they do not divide."""
    n = len(chunks)
    return chunks[env.rank * n // env.world : (env.rank + 1) * n // env.world]


def plan_chunks(plan: tuple) -> list[np.ndarray]:
    """The chunks of a streamed plan (rows, batches as positions into rows, batches that end a chunk)."""
    rows, batches, ends = plan
    out, cur = [], []
    for b, batch in enumerate(batches):
        cur.extend(batch)
        if b in ends:
            out.append(rows[np.asarray(cur, np.int64)] if cur else np.zeros(0, np.int64))
            cur = []
    return out  # one per chunk end, empty ones too: the builder numbers its commits the same way


def open_segment(
    out: str,
    run: int,
    env: DistEnv,
    chunks: list[np.ndarray],
    need: np.ndarray,
    metas: dict,
    chunk_rows: int,
    h5_chunk_rows: int,
    fingerprint: str,
) -> SegmentWriter | None:
    """This process's segment of run `run` over `chunks` (None without rows): `need` (N, T) in `metas`' order."""
    if not any(len(c) for c in chunks):
        return None
    return SegmentWriter(
        S.segment_dir(out),
        run,
        env.rank,
        chunks,
        lambda rows: need[rows],
        seg_teachers(metas),
        chunk_rows,
        h5_chunk_rows,
        fingerprint,
    )


def commit_chunk(out: str, parts: list[tuple], segment: SegmentWriter, j: int) -> None:
    """Every teacher's rows of chunk j into the segment (`W.write_part`), then the chunk's commit."""
    for name, rows, image, text, bad_rows, bad_reasons, tokens in parts:
        W.write_part(
            out,
            name,
            rows,
            image,
            text,
            bad_rows,
            bad_reasons,
            **({} if tokens is None else {"tokens": tokens}),
            segment=segment,
        )
    segment.commit(j)


def add_sums(
    segment: SegmentWriter | None, name: str, images: list, texts: list, order: np.ndarray, keep: np.ndarray, dtype: str
) -> None:
    """Count a chunk's stored rows of teacher NAME in the segment's statistics, on the device the embeddings are
    on, from the values as stored (`dtype`): the rows `order[keep]` of the concatenated batches."""
    if segment is None or not images:
        return
    img, txt = torch.cat(images), torch.cat(texts)
    idx = torch.from_numpy(np.asarray(order)[keep]).to(img.device)
    stored = getattr(torch, dtype)
    with torch.no_grad():
        segment.add_sums(name, img[idx].to(stored), txt[idx].to(stored))


def discard_if_empty(out: str) -> bool:
    """Remove a cache file this run created when it holds nothing yet (no teacher group, no pending teacher):
    a refused run (a teacher that would not load) leaves no empty FEATURES.h5 and segment folder behind, so the
    next command is not told about a file the user never got. True when removed."""
    if W.pending_teachers(out):
        return False
    try:
        with h5py.File(out, "r") as f:
            if len(f.get(L.TEACHERS, ())):
                return False
            folder = S.segment_dir(out)
    except OSError:  # damaged or gone: nothing of ours to judge
        return False
    os.remove(out)
    shutil.rmtree(W.parts_root(out), ignore_errors=True)
    shutil.rmtree(folder, ignore_errors=True)
    return True
