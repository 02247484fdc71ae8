"""`distill cache`: every teacher embeds every (image, caption) pair once, into the HDF5 feature cache.

Flow (one process or many under torchrun / accelerate launch): the lock holder (rank 0) checks the file against
the corpus and the teachers, creates it or folds leftovers of a killed run. Then every teacher with rows still
to do is loaded (complete ones are not), and one pass over the rows that any of them needs (a contiguous share
of the chunks per process, `cache.build.commit`) decodes each image once (`cache.build.image_rows`, which also
tokenises the captions in the workers): each teacher embeds the rows its own `done` mask lacks, and at the end
of each chunk every teacher's rows go into this process's segment file and the chunk is committed, in a
background thread while the next chunk is embedded. Rank 0 folds the segments into the file, copying no feature
data (see `cache.store.writer` for why this is kill-safe).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from functools import partial
from typing import cast

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

import cache.store.layout as L
import cache.store.segments as S
import cache.store.writer as W
from cache.build.commit import add_sums, commit_chunk, deal, discard_if_empty, open_segment, plan_chunks
from cache.build.dist import DistEnv, dist_env
from cache.build.image_rows import CollateRows, ImageRows, teacher_inputs
from cache.build.job import CacheJob, CacheSummary, EmbedCfg, Storage, TeacherSummary
from cache.build.stream import finish, note_unlisted, open_for_cache, stream_plan
from cache.build.tokens import check_token_size, embed_images, token_dims
from cache.build.views import read_view_dist
from cache.sources.corpus import BadSampleError, Corpus, StreamCorpus
from cache.sources.shard_listing import SHARD_UNREADABLE
from cache.store.lock import WriterLock
from cache.store.schema import CacheError, attrs_to_dict, check_root, check_teacher, storage_dtype, teacher_attrs
from cache.store.verify import bad_row_mask, raise_damaged, row_problem
from teachers import load_teacher

log = logging.getLogger(__name__)


def _resolve_device(device: str, env: DistEnv) -> str:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise CacheError("device cuda asked but CUDA is not available; use --device cpu")
        device = f"cuda:{env.local_rank % torch.cuda.device_count()}"
    if device.startswith("cuda:"):
        torch.cuda.set_device(torch.device(device))
    return device


# -- preparing the file (lock holder only) ------------------------------------------------------------------
def _prepare(job: CacheJob, corpus: Corpus, fp: str) -> None:
    """Check `job.out` (and leftover parts) against the corpus, the teachers and the view flags, then create it,
    draw its views (`job.view_dist`) and fold a killed run's parts; `job.data` is recorded as the corpus path."""
    store, teachers = job.storage, job.teachers
    out, n = store.out, len(corpus)
    W.clean_temporaries(out)
    existing: dict[str, dict] = {}
    views_k = stored = None
    if os.path.exists(out):
        try:
            with h5py.File(out, "r") as f:
                check_root(f, out, fp, n)
                existing = {k: attrs_to_dict(g.attrs) for k, g in f[L.TEACHERS].items()}
                stored = read_view_dist(f)
                views_k = stored.views if stored else None
        except OSError as e:  # truncated or overwritten: never build on top of it
            raise_damaged(out, e, "; or choose another --out")
    for name in W.pending_teachers(out):
        meta = W.read_meta(out, name)
        if meta is not None and meta.get("fingerprint") != fp:
            raise CacheError(
                f"{W.teacher_parts_dir(out, name)} holds chunks computed from another corpus; "
                "delete that folder (or choose another --out) and rerun"
            )
    for name, spec in teachers.items():
        if name in existing:
            check_teacher(out, name, existing[name], spec, store.views, store.dtype, store.tokens)
        meta = W.read_meta(out, name)
        if meta is not None:
            check_teacher(
                out, name, {**meta["attrs"], "dtype": meta["dtype"]}, spec, store.views, store.dtype, store.tokens
            )
    if store.views and views_k is not None and views_k != store.views:
        raise CacheError(
            f"{out} stores {views_k} views per image; this run asks {store.views}: rerun with "
            f"--views {views_k}, or write another file"
        )
    asked = stored.differences(job.view_flags) if store.views and stored else []
    if asked and stored:  # the stored views are replayed for every teacher: other flags would be silently ignored
        raise CacheError(
            f"{out} stores views {stored.describe()}; this run asks {' '.join(asked)}: rerun with "
            f"{stored.flags()} (or without --view-* flags), or write another file"
        )
    if not os.path.exists(out):
        W.create_file(out, corpus.keys, fp, job.data)
    if store.views and views_k is None:
        dist = job.view_dist
        W.add_views(out, dist.draw(n), dist.to_attrs(), store.h5_chunk_rows)
    W.fold(out)  # chunks committed by a killed run


def _read_state(out: str):
    with h5py.File(out, "r") as f:
        done = {k: g[L.DONE][:] for k, g in f[L.TEACHERS].items()}
        attrs = {k: attrs_to_dict(g.attrs) for k, g in f[L.TEACHERS].items()}
        bad = W.read_bad(f)
        params = f[L.VIEW_PARAMS][:] if L.VIEW_PARAMS in f else None
        dist = read_view_dist(f)
    return done, attrs, bad, (params, dist)


# -- the pass over the rows: one decode per image, every pending teacher embeds it --------------------------
def _batches(chunks: list[np.ndarray], batch_size: int) -> tuple[list[list[int]], set[int]]:
    """Batch indices into the concatenated rows, never straddling a chunk; and which batches end a chunk."""
    batches, ends, offset = [], set(), 0
    for c in chunks:
        for i in range(0, len(c), batch_size):
            batches.append(list(range(offset + i, offset + min(i + batch_size, len(c)))))
        ends.add(len(batches) - 1)
        offset += len(c)
    return batches, ends


@dataclass
class _ChunkBuffer:
    """One teacher's share of the chunk in flight: embedded rows (still on the device) and bad rows."""

    rows: list[int] = field(default_factory=list)
    images: list[torch.Tensor] = field(default_factory=list)
    texts: list[torch.Tensor] = field(default_factory=list)
    tokens: list[torch.Tensor] = field(default_factory=list)  # pooled patch tokens (--tokens), storage dtype
    bad: list[tuple[int, str]] = field(default_factory=list)


def _embed_rows(
    cfg: EmbedCfg,
    store: Storage,
    corpus: Corpus,
    teachers: dict,
    chunks: list[np.ndarray],
    need: np.ndarray,
    views: tuple,
    env: DistEnv,
    plan: tuple | None = None,
    segment=None,
) -> dict[str, str]:
    """Decode each row of `chunks` once; each teacher embeds the rows its column of `need` (N, T) flags.
    `plan`: (rows, batches, chunk-ending batches) instead of `chunks`, for streamed shards (`stream_plan`); the
    streamed shards that could not be read are returned (URL -> why): their rows stay missing, not bad.

    With num_workers >= 1 the workers decode, transform and tokenise the next batches while this process runs
    the forward passes; on CUDA, batches arrive pinned, are copied without blocking, and embeddings stay on the
    device until the chunk is committed (one sync per chunk, not per batch); each chunk is written into this
    process's `segment` (`cache.build.commit`) in a background thread (`W.PartWriter`) while the next chunk is
    embedded.
    """
    names = list(teachers)
    if plan is None:
        rows = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)
        batches, ends = _batches(chunks, cfg.batch_size)
    else:
        rows, batches, ends = plan
    unread: dict[str, str] = {}
    params, dist = views  # the stored views (N, K, F) and their ViewDist, both None without views
    inputs = teacher_inputs(teachers, dist if store.views else False)
    ds = ImageRows(corpus, rows, need[rows], inputs, params if store.views else None, max_pixels=cfg.max_pixels)
    cuda = any(t.device.type == "cuda" for t in teachers.values())
    loader = DataLoader(
        ds, batch_sampler=batches, num_workers=cfg.num_workers, collate_fn=CollateRows(inputs), pin_memory=cuda
    )
    suffix = f" (rank 0 of {env.world})" if env.world > 1 else ""
    col = {name: i for i, name in enumerate(names)}
    # one bar per teacher (its own rows, its own samples/s), all advanced by the same decoding pass
    bars = {
        name: tqdm(
            total=int(need[rows, col[name]].sum()),
            desc=f"cache {name}{suffix}",
            unit="sample",
            dynamic_ncols=True,
            position=i,
            leave=True,
            disable=not (env.main and cfg.progress),
        )
        for i, name in enumerate(names)
    }
    buf = {name: _ChunkBuffer() for name in names}
    writer, committed = W.PartWriter(), 0
    try:  # closed on error too, so a message printed after it starts on its own line
        for b, batch in enumerate(loader):
            for row, reason, where in batch.bad:
                if reason.startswith(SHARD_UNREADABLE):  # its rows stay missing, so a rerun retries them
                    unread[where] = reason
                    for name in names:
                        bars[name].update(int(need[row, col[name]]))
                    continue
                if cfg.on_bad_sample == "fail":
                    raise BadSampleError(
                        corpus.keys[row],
                        reason + " (rerun with --on-bad-sample skip to skip and record bad samples)",
                        where,
                    )
                for name in names:  # a bad image is bad for every teacher that needed it
                    if need[row, col[name]]:
                        buf[name].bad.append((row, reason))
                        bars[name].update(1)
            for name, (batch_rows, x) in batch.inputs.items():
                t = teachers[name]
                x = x.to(t.device, non_blocking=cuda)
                emb, tok = embed_images(t, x.flatten(0, 1) if store.views else x, store.tokens, store.dtype)
                if store.views:  # (B*K, ...) back to (B, K, ...)
                    emb = emb.reshape(*x.shape[:2], -1)
                    tok = None if tok is None else tok.reshape(*x.shape[:2], *tok.shape[1:])
                if tok is not None:
                    buf[name].tokens.append(tok)
                _check_dim(store.out, name, t, emb, "image")
                txt = t.encode_text(batch.tokens[name])  # tokenised in the worker, one caption per row
                _check_dim(store.out, name, t, txt, "text")
                buf[name].images.append(emb)
                buf[name].texts.append(txt)
                buf[name].rows.extend(batch_rows)
                bars[name].update(len(batch_rows))
            if b in ends:
                parts = [_chunk_part(store, name, teachers[name].embed_dim, buf[name], segment) for name in names]
                writer.submit(partial(commit_chunk, store.out, [p for p in parts if p is not None], segment, committed))
                committed += 1
                buf = {name: _ChunkBuffer() for name in names}
        writer.join()  # every committed chunk is on disk (or its error raised here) before the fold
        return unread
    finally:
        writer.close()
        for bar in bars.values():
            bar.close()


def _chunk_part(store: Storage, name: str, d: int, buf: _ChunkBuffer, segment=None) -> tuple | None:
    """One teacher's chunk as host arrays for one commit (None when it needed no row of the chunk); its stored
    rows are counted in the segment's statistics on the device (`build_commit.add_sums`).

    Rows whose image or text embedding is non-finite, zero or not unit-norm are never stored as done: they are
    recorded as bad samples naming the teacher (a teacher bug or an fp16 overflow would otherwise train silently).
    """
    if not buf.rows and not buf.bad:
        return None
    order = np.argsort(buf.rows, kind="stable")
    rows = np.asarray(buf.rows, dtype=np.int64)[order]
    if buf.images:  # the chunk's one host sync
        img = torch.cat(buf.images).float().cpu().numpy()[order]
        txt = torch.cat(buf.texts).float().cpu().numpy()[order]
    else:
        img = np.zeros((0, *((store.views,) if store.views else ()), d), np.float32)
        txt = np.zeros((0, d), np.float32)
    tok = torch.cat(buf.tokens).cpu().numpy()[order] if buf.tokens else None  # a chunk of bad rows only: none
    bad = list(buf.bad)
    bad_img, bad_txt = bad_row_mask(img), bad_row_mask(txt)
    bad_tok = np.zeros(len(rows), bool) if tok is None else ~np.isfinite(tok.reshape(len(tok), -1)).all(1)
    for i in np.flatnonzero(bad_img | bad_txt | bad_tok).tolist():
        if bad_img[i] or bad_txt[i]:
            what, x = ("image", img[i]) if bad_img[i] else ("text", txt[i])
            bad.append((int(rows[i]), f"teacher {name!r} gave a {row_problem(x)} {what} embedding"))
        else:  # tokens are not unit vectors: only finiteness is theirs to fail
            bad.append((int(rows[i]), f"teacher {name!r} gave non-finite patch tokens"))
    keep = ~(bad_img | bad_txt | bad_tok)
    add_sums(segment, name, buf.images, buf.texts, order, keep, store.dtype)
    dtype = storage_dtype(store.dtype)
    return (
        name,
        rows[keep],
        img[keep].astype(dtype),
        txt[keep].astype(dtype),
        [r for r, _ in bad],
        [s for _, s in bad],
        None if tok is None else tok[keep],
    )


def _check_dim(out: str, name: str, teacher, emb: torch.Tensor, what: str) -> None:
    """A teacher whose embeddings disagree with its declared embed_dim (a custom `py:` teacher's bug) is refused
    before anything is written, rather than failing deep inside HDF5."""
    if emb.shape[-1] != teacher.embed_dim:
        raise CacheError(
            f"{out}: teacher {name!r} ({teacher.spec}) declares embed_dim {teacher.embed_dim} but "
            f"its {what} embeddings have dimension {emb.shape[-1]}; fix the teacher's embed_dim"
        )


def _load_teacher(
    name: str, spec: str, store: Storage, cached: dict | None, device: str, trust_remote_code: bool = False
):
    """Load one pending teacher and check it against its attrs in the file (`cached`, None when new)."""
    teacher = load_teacher(spec, device, trust_remote_code=trust_remote_code)
    if cached is not None and int(cached["embed_dim"]) != teacher.embed_dim:
        raise CacheError(
            f"{store.out}: teacher {name!r} was cached with embed_dim "
            f"{cached['embed_dim']}, {spec} now gives {teacher.embed_dim}"
        )
    return teacher


def _write_metas(job: CacheJob, teachers: dict, rows: int, fp: str, main: bool, run: int) -> dict[str, dict]:
    """Check the patch tokens (--tokens: every teacher gives them, the grid fits, the size is under --max-gb;
    printed), then record each teacher's meta for the fold, on the main process: a refused run leaves no teacher
    behind (no meta, no segment), so the same command with other flags starts afresh. Returns the metas (every
    process: its segment's teachers); a teacher new to the file takes segments from run `run` on."""
    store, dims = job.storage, {}
    if store.tokens:
        dims = token_dims(teachers, store.tokens, store.out)
        size = check_token_size(dims, store.tokens, rows, store.views, store.dtype, job.max_gb, store.out)
        if main and job.progress:
            print(size, flush=True)
        elif main:
            log.info("%s", size)
    metas = {}
    for name, t in teachers.items():
        described = {**t.describe(), "trust_remote_code": job.trust_remote_code}
        metas[name] = {
            "attrs": teacher_attrs(described, store.views, store.tokens, dims.get(name, 0)),
            "dtype": store.dtype,
            "fingerprint": fp,
            "h5_chunk_rows": store.h5_chunk_rows,
            L.SINCE_RUN: int((W.read_meta(store.out, name) or {}).get(L.SINCE_RUN, run)),
        }
        if main:
            W.write_meta(store.out, name, metas[name])
    return metas


# -- the entry point -----------------------------------------------------------------------------------------
def build_cache(job: CacheJob) -> CacheSummary:
    """Build or complete `job.out` (a CacheJob is valid once made); returns (and prints on the main process) what
    was done."""
    env = dist_env()
    try:
        return _build(job, env)
    finally:
        env.close()


def _build(job: CacheJob, env: DistEnv) -> CacheSummary:
    t0 = time.time()
    corpus = open_for_cache(job.data, job.out, job.retry, env, job.progress)
    fp, n = corpus.fingerprint(), len(corpus)
    lock = WriterLock(job.out)
    err, created = None, env.main and not os.path.exists(job.out)
    if env.main:
        try:
            W.ensure_writable_target(job.out)
            lock.acquire()
            note_unlisted(job.out, corpus)  # streamed shards left out of the rows, before the file fixes them
            _prepare(job, corpus, fp)
        except Exception as e:
            err = e
    msg = env.broadcast(None if err is None else f"{err}")
    if err is not None:
        lock.release()
        raise err
    if msg is not None:
        raise CacheError(msg)
    run = env.broadcast(S.next_run(S.segment_dir(job.out)) if env.main else None)  # this run's segments
    segment = None
    try:
        device = _resolve_device(job.device, env)
        done, attrs, bad, views = _read_state(job.out)
        names = list(job.teachers)
        need = np.stack([~done.get(name, np.zeros(n, dtype=bool)) for name in names], axis=1)  # (N, T)
        if not job.retry_bad and bad:
            need[list(bad)] = False
        pending = [name for i, name in enumerate(names) if need[:, i].any()]  # complete ones are not loaded
        computed, unread = dict.fromkeys(names, 0), {}
        if pending:
            teachers = {
                name: _load_teacher(
                    name, job.teachers[name], job.storage, attrs.get(name), device, job.trust_remote_code
                )
                for name in pending
            }
            metas = _write_metas(job, teachers, n, fp, env.main, run)
            need = need[:, [names.index(name) for name in pending]]
            rows = np.flatnonzero(need.any(axis=1))  # rows no teacher needs are not even decoded
            chunks = [rows[i : i + job.chunk_rows] for i in range(0, len(rows), job.chunk_rows)]
            cfg = job.embedding(device, env.local_world)
            if env.main:
                log.info(
                    "distill cache: batch size %d, %d decoding worker(s) per process on %s%s",
                    cfg.batch_size,
                    cfg.num_workers,
                    device,
                    " (auto)" if "auto" in (job.batch_size, job.num_workers) else "",
                )
            plan = (
                stream_plan(cast(StreamCorpus, corpus), rows, env, cfg.num_workers, cfg.batch_size, job.chunk_rows)
                if getattr(corpus, "streamed", False)  # StreamCorpus.streamed
                else None
            )  # whole shards per rank and worker
            mine = deal(chunks, env) if plan is None else plan_chunks(plan)
            segment = open_segment(job.out, run, env, mine, need, metas, job.chunk_rows, job.h5_chunk_rows, fp)
            unread = _embed_rows(cfg, job.storage, corpus, teachers, mine, need, views, env, plan, segment)
            if segment is not None:
                segment.finish()  # its statistics' sums, beside it
            del teachers
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
            env.barrier()  # every process's chunks are committed
            if env.main:
                computed.update(W.fold(job.out, pending))
        env.barrier()  # the file is final before anyone returns
        notes = finish(job.out, corpus, unread, env)  # streamed shards that failed: recorded, named
        summary = summarise(job.out, computed, time.time() - t0, notes) if env.main else None
    except BaseException:
        if env.world == 1 and lock.held:  # keep what was committed before the error (e.g. --on-bad-sample fail)
            try:
                W.fold(job.out)
            except (OSError, CacheError):  # e.g. the disk is still full: the segments wait for the next fold
                pass
            if created:  # e.g. a teacher refused to load: no empty file is left behind
                discard_if_empty(job.out)
        raise
    finally:
        if segment is not None:
            segment.close()
        lock.release()
    summary = env.broadcast(summary)
    if env.main and job.progress:
        print(summary, flush=True)
    problem = summary.bad_share_problem(job.max_bad_fraction)
    if problem:  # every rank raises: the rows computed are kept (folded above)
        raise CacheError(problem)
    return summary


def summarise(out: str, computed: dict[str, int], elapsed: float, notes: list[str] | None = None) -> CacheSummary:
    with h5py.File(out, "r") as f:
        n = int(f.attrs[L.Root.NUM_ROWS])
        bad = W.read_bad(f)
        bad_mask = np.zeros(n, dtype=bool)
        bad_mask[list(bad)] = True
        teachers = {}
        for name, g in f[L.TEACHERS].items():
            d = g[L.DONE][:]
            teachers[name] = TeacherSummary(computed.get(name, 0), int(d.sum()), int((bad_mask & ~d).sum()))
        keys = f[L.BAD_KEYS].asstr()[:].tolist() if L.BAD in f else []
        reasons = f[L.BAD_REASONS].asstr()[:].tolist() if L.BAD in f else []
    return CacheSummary(out, n, teachers, list(zip(keys, reasons)), elapsed, list(notes or []))
