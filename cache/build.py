"""`distill cache`: every teacher embeds every (image, caption) pair once, into the HDF5 feature cache.

Flow (one process or many under torchrun / accelerate launch): the lock holder (rank 0) checks the file against
the corpus and the teachers, creates it or folds leftovers of a killed run; then, per teacher, every process
embeds its share of the rows still to do (chunks dealt round-robin) into committed parts, and rank 0 folds them
into the file (see `cache.h5_writer` for why this is kill-safe). Teachers whose rows are all done are not loaded.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from . import h5_writer as W
from .corpus import BadSampleError, Corpus, open_corpus
from .dist import DistEnv, dist_env
from .lock import WriterLock
from .schema import CacheError, attrs_to_dict, check_root, check_teacher, storage_dtype, teacher_attrs
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


# -- the image side of the work: decoded and transformed in DataLoader workers ------------------------------
class _ImageRows(Dataset):
    """Row j -> (corpus row, image tensor or None, bad reason, where): bad samples travel back, not raise."""

    def __init__(self, corpus: Corpus, rows: np.ndarray, transform, view_transform, view_params):
        self.corpus, self.rows = corpus, rows
        self.transform, self.view_transform, self.view_params = transform, view_transform, view_params

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, j: int):
        row = int(self.rows[j])
        if not self.corpus.captions[row].strip():
            return row, None, "empty caption", self.corpus.describe(row)
        try:
            img = self.corpus.load_image(row)
        except BadSampleError as e:
            return row, None, e.reason, e.where
        try:
            if self.view_params is not None:
                x = torch.stack([self.view_transform(img, p) for p in self.view_params[row]])
            else:
                x = self.transform(img)
        except Exception as e:  # a transform that chokes on this image: the sample is bad, not the run
            return row, None, f"image transform failed ({type(e).__name__}: {e})", self.corpus.describe(row)
        return row, x, None, None


def _collate(items):
    good = [(r, x) for r, x, _, _ in items if x is not None]
    bad = [(r, reason, where) for r, x, reason, where in items if x is None]
    images = torch.stack([x for _, x in good]) if good else None
    return [r for r, _ in good], images, bad


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
        except OSError as e:
            raise CacheError(f"{out} exists but is not a readable HDF5 file ({e}); choose another --out") from e
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


# -- one teacher ---------------------------------------------------------------------------------------------
def _batches(chunks: list[np.ndarray], batch_size: int) -> tuple[list[list[int]], set[int]]:
    """Batch indices into the concatenated rows, never straddling a chunk; and which batches end a chunk."""
    batches, ends, offset = [], set(), 0
    for c in chunks:
        for i in range(0, len(c), batch_size):
            batches.append(list(range(offset + i, offset + min(i + batch_size, len(c)))))
        ends.add(len(batches) - 1)
        offset += len(c)
    return batches, ends


def _embed_teacher(job: CacheJob, corpus: Corpus, teacher, name: str, chunks: list[np.ndarray],
                   view_params, env: DistEnv) -> None:
    rows = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)
    batches, ends = _batches(chunks, job.batch_size)
    ds = _ImageRows(corpus, rows, teacher.image_transform, teacher.view_transform,
                    view_params if job.views else None)
    loader = DataLoader(ds, batch_sampler=batches, num_workers=job.num_workers, collate_fn=_collate,
                        pin_memory=str(teacher.device).startswith("cuda"))
    dtype = storage_dtype(job.dtype)
    suffix = f" (rank 0 of {env.world})" if env.world > 1 else ""
    bar = tqdm(total=len(rows), desc=f"cache {name}{suffix}", unit="sample", dynamic_ncols=True,
               disable=not (env.main and job.progress))
    good_rows: list[int] = []
    images: list[np.ndarray] = []
    bad: list[tuple[int, str]] = []
    try:  # closed on error too, so a message printed after it starts on its own line
        for b, (batch_rows, x, batch_bad) in enumerate(loader):
            for row, reason, where in batch_bad:
                if job.on_bad_sample == "fail":
                    raise BadSampleError(corpus.keys[row], reason + " (rerun with --on-bad-sample skip to skip "
                                         "and record bad samples)", where)
                bad.append((row, reason))
            if x is not None:
                if job.views:
                    bsz, k = x.shape[:2]
                    emb = teacher.encode_image(x.flatten(0, 1)).reshape(bsz, k, -1)
                else:
                    emb = teacher.encode_image(x)
                images.append(emb.cpu().numpy().astype(dtype))
                good_rows.extend(batch_rows)
            bar.update(len(batch_rows) + len(batch_bad))
            if b in ends:
                _commit_chunk(job, corpus, teacher, name, good_rows, images, bad, dtype)
                good_rows, images, bad = [], [], []
    finally:
        bar.close()


def _commit_chunk(job, corpus, teacher, name, good_rows, images, bad, dtype) -> None:
    """Text for the chunk's good rows (each caption tokenised once), then one atomic part."""
    order = np.argsort(good_rows, kind="stable")
    rows = np.asarray(good_rows, dtype=np.int64)[order]
    d = teacher.embed_dim
    img = np.concatenate(images)[order] if images else np.zeros((0, *((job.views,) if job.views else ()), d), dtype)
    texts = []
    for i in range(0, len(rows), job.batch_size):
        tokens = teacher.tokenize([corpus.captions[r] for r in rows[i:i + job.batch_size]])
        texts.append(teacher.encode_text(tokens).cpu().numpy().astype(dtype))
    txt = np.concatenate(texts) if texts else np.zeros((0, d), dtype)
    W.write_part(job.out, name, rows, img, txt, [r for r, _ in bad], [s for _, s in bad])


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
    from teachers import load_teacher

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
        computed: dict[str, int] = {}
        for name, spec in job.teachers.items():
            todo = ~done.get(name, np.zeros(n, dtype=bool))
            if not job.retry_bad and bad:
                todo[list(bad)] = False
            rows = np.flatnonzero(todo)
            computed[name] = 0
            if not len(rows):
                continue  # complete: the teacher is not even loaded
            teacher = load_teacher(spec, device)
            if name in attrs and int(attrs[name]["embed_dim"]) != teacher.embed_dim:
                raise CacheError(f"{job.out}: teacher {name!r} was cached with embed_dim "
                                 f"{attrs[name]['embed_dim']}, {spec} now gives {teacher.embed_dim}")
            if env.main:
                W.write_meta(job.out, name, {"attrs": teacher_attrs(teacher.describe(), job.views),
                                             "dtype": job.dtype, "fingerprint": fp,
                                             "h5_chunk_rows": job.h5_chunk_rows})
            chunks = [rows[i:i + job.chunk_rows] for i in range(0, len(rows), job.chunk_rows)]
            _embed_teacher(job, corpus, teacher, name, chunks[env.rank::env.world], view_params, env)
            del teacher
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
            env.barrier()  # every process's parts are committed
            if env.main:
                computed[name] = W.fold(job.out, [name]).get(name, 0)
        env.barrier()  # the file is final before anyone returns
        summary = summarise(job.out, computed, time.time() - t0) if env.main else None
    except BaseException:
        if env.world == 1 and lock.held:  # keep what was committed before the error (e.g. --on-bad-sample fail)
            W.fold(job.out)
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
