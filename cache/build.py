"""`distill cache`: every teacher embeds every (image, caption) pair once, into the HDF5 feature cache.

Flow (one process or many under torchrun / accelerate launch): the lock holder (rank 0) checks the file against
the corpus and the teachers, creates it or folds leftovers of a killed run. Then every teacher with rows still
to do is loaded (complete ones are not), and one pass over the rows that any of them needs (chunks dealt
round-robin over processes) decodes each image once (`cache.image_rows`): each teacher embeds the rows its own
`done` mask lacks, and at the end of each chunk every teacher commits its rows as its own part. Rank 0 folds the
parts into the file (see `cache.h5_writer` for why this is kill-safe).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import h5_writer as W
from .corpus import BadSampleError, Corpus, open_corpus
from .dist import DistEnv, dist_env
from .image_decode import DEFAULT_MAX_PIXELS
from .image_rows import ImageRows, collate_rows, teacher_inputs
from .lock import WriterLock
from .schema import CacheError, attrs_to_dict, check_root, check_teacher, storage_dtype, teacher_attrs
from .verify import bad_row_mask, raise_damaged, row_problem
from .views import draw_view_params


@dataclass(frozen=True)
class CacheJob:
    data: str                      # corpus path: CSV/TSV/JSONL file, folder of .tar shards, or brace pattern
    teachers: dict[str, str]       # NAME -> SPEC (resolved with teachers.load_teacher)
    out: str                       # FEATURES.h5
    batch_size: int = 64
    num_workers: int = 2           # images decoded in DataLoader workers
    device: str = "auto"           # cpu | cuda | auto
    dtype: str = "float16"         # float16 | float32 storage
    views: int = 0                 # K augmented views per image (0: each teacher's own eval transform)
    on_bad_sample: str = "skip"    # skip | fail
    seed: int = 0                  # view parameters are drawn from this
    chunk_rows: int = 512          # rows per committed part: a kill loses at most this many per process
    h5_chunk_rows: int = 256       # HDF5 chunk length along rows (reader I/O granularity)
    retry_bad: bool = False        # also retry rows already recorded as bad (e.g. after fixing image files)
    progress: bool = True          # tqdm bars on the main process
    max_pixels: int = DEFAULT_MAX_PIXELS  # width x height over which an image is a bad sample, never decoded (0: PIL's)

    def check(self) -> None:
        if not self.teachers:
            raise CacheError("no teacher given; pass at least one --teacher NAME=SPEC")
        for name in self.teachers:
            if not name or "/" in name or name.startswith("."):
                raise CacheError(f"teacher name {name!r} is not valid: use letters, digits, '-' or '_'")
        if self.on_bad_sample not in ("skip", "fail"):
            raise CacheError(f"on_bad_sample={self.on_bad_sample!r}; use 'skip' or 'fail'")
        storage_dtype(self.dtype)
        if self.views < 0 or self.batch_size < 1 or self.chunk_rows < 1 or self.num_workers < 0:
            raise CacheError("views and num_workers must be >= 0, batch_size and chunk_rows >= 1")
        if self.max_pixels < 0:
            raise CacheError(f"max_pixels={self.max_pixels}; use a positive pixel count (0: PIL's own limit)")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise CacheError(f"device {self.device!r}; use cpu, cuda or auto")


@dataclass
class TeacherSummary:
    computed: int   # rows embedded by this run
    done: int       # rows done in the file
    skipped: int    # rows recorded as bad samples and not done


@dataclass
class CacheSummary:
    out: str
    rows: int
    teachers: dict[str, TeacherSummary] = field(default_factory=dict)
    bad: list[tuple[str, str]] = field(default_factory=list)  # (key, reason)
    elapsed_s: float = 0.0

    def __str__(self) -> str:
        lines = [f"feature cache {self.out}: {self.rows} rows, {self.elapsed_s:.1f}s"]
        for name, t in self.teachers.items():
            lines.append(f"  {name}: computed {t.computed}, done {t.done}/{self.rows}, skipped {t.skipped}")
        if self.bad:
            lines.append(f"  {len(self.bad)} bad sample(s) skipped (recorded in /bad), e.g.:")
            lines += [f"    {k}: {r}" for k, r in self.bad[:5]]
        return "\n".join(lines)


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
    out, n = job.out, len(corpus)
    W.clean_temporaries(out)
    existing: dict[str, dict] = {}
    views_k = None
    if os.path.exists(out):
        try:
            with h5py.File(out, "r") as f:
                check_root(f, out, fp, n)
                existing = {k: attrs_to_dict(g.attrs) for k, g in f["teachers"].items()}
                views_k = f["views/params"].shape[1] if "views/params" in f else None
        except OSError as e:  # truncated or overwritten: never build on top of it
            raise_damaged(out, e, "; or choose another --out")
    for name in W.pending_teachers(out):
        meta = W.read_meta(out, name)
        if meta is not None and meta.get("fingerprint") != fp:
            raise CacheError(f"{W.teacher_parts_dir(out, name)} holds chunks computed from another corpus; "
                             "delete that folder (or choose another --out) and rerun")
    for name, spec in job.teachers.items():
        if name in existing:
            check_teacher(out, name, existing[name], spec, job.views, job.dtype)
        meta = W.read_meta(out, name)
        if meta is not None:
            check_teacher(out, name, {**meta["attrs"], "dtype": meta["dtype"]}, spec, job.views, job.dtype)
    if job.views and views_k is not None and views_k != job.views:
        raise CacheError(f"{out} stores {views_k} views per image; this run asks {job.views}: rerun with "
                         f"--views {views_k}, or write another file")
    if not os.path.exists(out):
        W.create_file(out, corpus.keys, fp, job.data)
    if job.views and views_k is None:
        W.add_views(out, draw_view_params(n, job.views, job.seed), job.seed, job.h5_chunk_rows)
    W.fold(out)  # chunks committed by a killed run


def _read_state(out: str):
    with h5py.File(out, "r") as f:
        done = {k: g["done"][:] for k, g in f["teachers"].items()}
        attrs = {k: attrs_to_dict(g.attrs) for k, g in f["teachers"].items()}
        bad = W.read_bad(f)
        params = f["views/params"][:] if "views/params" in f else None
    return done, attrs, bad, params


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
    bad: list[tuple[int, str]] = field(default_factory=list)


def _embed_rows(job: CacheJob, corpus: Corpus, teachers: dict, chunks: list[np.ndarray], need: np.ndarray,
                view_params, env: DistEnv) -> None:
    """Decode each row of `chunks` once; each teacher embeds the rows its column of `need` (N, T) flags.

    With num_workers >= 1 the workers decode and transform the next batches while this process runs the
    forward passes; on CUDA, batches arrive pinned, are copied without blocking, and embeddings stay on the
    device until the chunk is committed (one sync per chunk, not per batch).
    """
    names = list(teachers)
    rows = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)
    batches, ends = _batches(chunks, job.batch_size)
    ds = ImageRows(corpus, rows, need[rows], teacher_inputs(teachers, bool(job.views)),
                   view_params if job.views else None, max_pixels=job.max_pixels)
    cuda = any(t.device.type == "cuda" for t in teachers.values())
    loader = DataLoader(ds, batch_sampler=batches, num_workers=job.num_workers, collate_fn=collate_rows,
                        pin_memory=cuda)
    dtype = storage_dtype(job.dtype)
    suffix = f" (rank 0 of {env.world})" if env.world > 1 else ""
    col = {name: i for i, name in enumerate(names)}
    # one bar per teacher (its own rows, its own samples/s), all advanced by the same decoding pass
    bars = {name: tqdm(total=int(need[rows, col[name]].sum()), desc=f"cache {name}{suffix}", unit="sample",
                       dynamic_ncols=True, position=i, leave=True, disable=not (env.main and job.progress))
            for i, name in enumerate(names)}
    buf = {name: _ChunkBuffer() for name in names}
    try:  # closed on error too, so a message printed after it starts on its own line
        for b, batch in enumerate(loader):
            for row, reason, where in batch.bad:
                if job.on_bad_sample == "fail":
                    raise BadSampleError(corpus.keys[row], reason + " (rerun with --on-bad-sample skip to skip "
                                         "and record bad samples)", where)
                for name in names:  # a bad image is bad for every teacher that needed it
                    if need[row, col[name]]:
                        buf[name].bad.append((row, reason))
                        bars[name].update(1)
            for name, (batch_rows, x) in batch.inputs.items():
                t = teachers[name]
                x = x.to(t.device, non_blocking=cuda)
                if job.views:
                    bsz, k = x.shape[:2]
                    emb = t.encode_image(x.flatten(0, 1)).reshape(bsz, k, -1)
                else:
                    emb = t.encode_image(x)
                _check_dim(job, name, t, emb, "image")
                buf[name].images.append(emb)
                buf[name].rows.extend(batch_rows)
                bars[name].update(len(batch_rows))
            if b in ends:
                for name in names:
                    _commit_chunk(job, corpus, teachers[name], name, buf[name], dtype)
                buf = {name: _ChunkBuffer() for name in names}
    finally:
        for bar in bars.values():
            bar.close()


def _commit_chunk(job, corpus, teacher, name, buf: _ChunkBuffer, dtype) -> None:
    """Text for the chunk's good rows (each caption tokenised once), then one atomic part for this teacher.

    Rows whose image or text embedding is non-finite, zero or not unit-norm are never stored as done: they are
    recorded as bad samples naming the teacher (a teacher bug or an fp16 overflow would otherwise train silently).
    """
    if not buf.rows and not buf.bad:
        return  # this teacher needed no row of the chunk
    order = np.argsort(buf.rows, kind="stable")
    rows = np.asarray(buf.rows, dtype=np.int64)[order]
    d = teacher.embed_dim
    if buf.images:
        img = torch.cat(buf.images).float().cpu().numpy()[order]
    else:
        img = np.zeros((0, *((job.views,) if job.views else ()), d), np.float32)
    texts = []
    for i in range(0, len(rows), job.batch_size):
        tokens = teacher.tokenize([corpus.captions[r] for r in rows[i:i + job.batch_size]])
        emb = teacher.encode_text(tokens)
        _check_dim(job, name, teacher, emb, "text")
        texts.append(emb.float().cpu().numpy())
    txt = np.concatenate(texts) if texts else np.zeros((0, d), np.float32)
    bad = list(buf.bad)
    bad_img, bad_txt = bad_row_mask(img), bad_row_mask(txt)
    for i in np.flatnonzero(bad_img | bad_txt).tolist():
        what, x = ("image", img[i]) if bad_img[i] else ("text", txt[i])
        bad.append((int(rows[i]), f"teacher {name!r} gave a {row_problem(x)} {what} embedding"))
    keep = ~(bad_img | bad_txt)
    W.write_part(job.out, name, rows[keep], img[keep].astype(dtype), txt[keep].astype(dtype),
                 [r for r, _ in bad], [s for _, s in bad])


def _check_dim(job: CacheJob, name: str, teacher, emb: torch.Tensor, what: str) -> None:
    """A teacher whose embeddings disagree with its declared embed_dim (a custom `py:` teacher's bug) is refused
    before anything is written, rather than failing deep inside HDF5."""
    if emb.shape[-1] != teacher.embed_dim:
        raise CacheError(f"{job.out}: teacher {name!r} ({teacher.spec}) declares embed_dim {teacher.embed_dim} but "
                         f"its {what} embeddings have dimension {emb.shape[-1]}; fix the teacher's embed_dim")


def _load_teacher(job: CacheJob, name: str, attrs: dict, device: str, env: DistEnv, fp: str):
    """Load one pending teacher, check it against what the file holds, and record its meta for the fold."""
    from teachers import load_teacher

    spec = job.teachers[name]
    teacher = load_teacher(spec, device)
    if name in attrs and int(attrs[name]["embed_dim"]) != teacher.embed_dim:
        raise CacheError(f"{job.out}: teacher {name!r} was cached with embed_dim "
                         f"{attrs[name]['embed_dim']}, {spec} now gives {teacher.embed_dim}")
    if env.main:
        W.write_meta(job.out, name, {"attrs": teacher_attrs(teacher.describe(), job.views),
                                     "dtype": job.dtype, "fingerprint": fp, "h5_chunk_rows": job.h5_chunk_rows})
    return teacher


# -- the entry point -----------------------------------------------------------------------------------------
def build_cache(job: CacheJob) -> CacheSummary:
    """Build or complete `job.out`; returns (and prints on the main process) what was done."""
    job.check()
    env = dist_env()
    try:
        return _build(job, env)
    finally:
        env.close()


def _build(job: CacheJob, env: DistEnv) -> CacheSummary:
    t0 = time.time()
    corpus = open_corpus(job.data)
    fp, n = corpus.fingerprint(), len(corpus)
    lock = WriterLock(job.out)
    err = None
    if env.main:
        try:
            W.ensure_writable_target(job.out)
            lock.acquire()
            _prepare(job, corpus, fp)
        except Exception as e:
            err = e
    msg = env.broadcast(None if err is None else f"{err}")
    if err is not None:
        lock.release()
        raise err
    if msg is not None:
        raise CacheError(msg)
    try:
        device = _resolve_device(job.device, env)
        done, attrs, bad, view_params = _read_state(job.out)
        names = list(job.teachers)
        need = np.stack([~done.get(name, np.zeros(n, dtype=bool)) for name in names], axis=1)  # (N, T)
        if not job.retry_bad and bad:
            need[list(bad)] = False
        pending = [name for i, name in enumerate(names) if need[:, i].any()]  # complete ones are not loaded
        computed = dict.fromkeys(names, 0)
        if pending:
            teachers = {name: _load_teacher(job, name, attrs, device, env, fp) for name in pending}
            need = need[:, [names.index(name) for name in pending]]
            rows = np.flatnonzero(need.any(axis=1))  # rows no teacher needs are not even decoded
            chunks = [rows[i:i + job.chunk_rows] for i in range(0, len(rows), job.chunk_rows)]
            _embed_rows(job, corpus, teachers, chunks[env.rank::env.world], need, view_params, env)
            del teachers
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
            env.barrier()  # every process's parts are committed
            if env.main:
                computed.update(W.fold(job.out, pending))
        env.barrier()  # the file is final before anyone returns
        summary = summarise(job.out, computed, time.time() - t0) if env.main else None
    except BaseException:
        if env.world == 1 and lock.held:  # keep what was committed before the error (e.g. --on-bad-sample fail)
            try:
                W.fold(job.out)
            except (OSError, CacheError):  # e.g. the disk is still full: the parts stay for the next run's fold
                pass
        raise
    finally:
        lock.release()
    summary = env.broadcast(summary)
    if env.main and job.progress:
        print(summary, flush=True)
    return summary


def summarise(out: str, computed: dict[str, int], elapsed: float) -> CacheSummary:
    with h5py.File(out, "r") as f:
        n = int(f.attrs["num_rows"])
        bad = W.read_bad(f)
        bad_mask = np.zeros(n, dtype=bool)
        bad_mask[list(bad)] = True
        teachers = {}
        for name, g in f["teachers"].items():
            d = g["done"][:]
            teachers[name] = TeacherSummary(computed.get(name, 0), int(d.sum()), int((bad_mask & ~d).sum()))
        keys = f["bad/keys"].asstr()[:].tolist() if "bad" in f else []
        reasons = f["bad/reasons"].asstr()[:].tolist() if "bad" in f else []
    return CacheSummary(out, n, teachers, list(zip(keys, reasons)), elapsed)
