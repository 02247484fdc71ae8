"""Training data: corpus rows joined BY KEY to feature-cache rows, the student's augmentation, typed batches.

Why per-sample generators: a sample's crop (or stored view) is drawn from a generator seeded by (seed, epoch,
index), not from the global RNG, so a resumed run, a run with more workers or a run over more processes shows
the student exactly the same pixels as an uninterrupted single-process one.
Why the cache is read in the collate function: one batched HDF5 read per batch, inside the worker, from a reader
each worker opens for itself (h5py handles must not cross a fork).
"""
from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from cache.verify import BadRowsError, bad_row_mask, format_rows, row_problem
from cache.views import RATIO  # the aspect range of the cache's stored views, for the student's own crops
from teachers.transforms import PreprocessCfg, make_view_transform

log = logging.getLogger(__name__)


class DataError(ValueError):
    """The corpus and the cache cannot be used together as configured; the message says how to fix it."""


SKIP_HINT = ", or set data.bad_features=skip to train those rows without that teacher"


@dataclass
class TrainBatch:
    """One micro-batch: student inputs plus the cached features of the same rows."""

    images: torch.Tensor  # (B, 3, H, W) normalised for the student
    tokens: torch.Tensor  # (B, L) student token ids
    rows: torch.Tensor  # (B,) corpus rows
    views: torch.Tensor  # (B,) stored view index shown, -1 for the student's own crop
    teacher_feats: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # t -> {"image","text"}
    route: torch.Tensor | None = None  # (B, T) bool, T in the loss's teacher order (loss.routing); None: all
    caption_ids: torch.Tensor | None = None  # (B,) int64 caption_id of each caption: equal iff captions are equal
    skipped_features: int = 0  # (teacher, row) pairs dropped for bad cached features (data.bad_features=skip)

    def to(self, device, non_blocking: bool = False) -> "TrainBatch":
        """Accelerate's send_to_device calls this."""
        mv = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return TrainBatch(mv(self.images), mv(self.tokens), mv(self.rows), mv(self.views),
                          {t: {m: mv(x) for m, x in d.items()} for t, d in self.teacher_feats.items()},
                          mv(self.route), mv(self.caption_ids), self.skipped_features)

    def route_by_teacher(self, teachers: Sequence[str]) -> dict[str, torch.Tensor] | None:
        """{teacher: (B,) bool} from the route mask (columns in `teachers`' order), as TeacherBatch.route takes."""
        if self.route is None:
            return None
        if self.route.shape[1] != len(teachers):
            raise ValueError(f"the batch's route mask has {self.route.shape[1]} teacher columns; got "
                             f"{len(teachers)} teacher names")
        return {t: self.route[:, j] for j, t in enumerate(teachers)}

    def __len__(self) -> int:
        return self.images.shape[0]


def caption_id(caption: str) -> int:
    """A stable 63-bit id of the exact caption string (BLAKE2b, unlike the salted `hash()`: equal in every process
    and run), so identical captions can be found across the global batch (`positives: caption` loss terms)."""
    digest = hashlib.blake2b(caption.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") & 0x7FFF_FFFF_FFFF_FFFF


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A generator owned by one sample of one epoch (independent of workers, processes and resumption)."""
    s = np.random.SeedSequence([seed, epoch, index]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(s) & 0x7FFF_FFFF_FFFF_FFFF)


def random_crop_params(gen: torch.Generator, width: int, height: int, scale: Sequence[float],
                       flip: bool) -> list[float]:
    """A RandomResizedCrop box (torchvision's algorithm, our generator) as relative (x0, y0, w, h, flip)."""
    area = width * height
    u = torch.rand(4 * 10 + 1, generator=gen, dtype=torch.float64).tolist()
    box = None
    for i in range(10):
        target = area * (scale[0] + (scale[1] - scale[0]) * u[4 * i])
        log_r = math.log(RATIO[0]) + (math.log(RATIO[1]) - math.log(RATIO[0])) * u[4 * i + 1]
        w = int(round(math.sqrt(target * math.exp(log_r))))
        h = int(round(math.sqrt(target / math.exp(log_r))))
        if 0 < w <= width and 0 < h <= height:
            x0 = int(u[4 * i + 2] * (width - w + 1))
            y0 = int(u[4 * i + 3] * (height - h + 1))
            box = (x0, y0, w, h)
            break
    if box is None:  # fallback: the whole image (scale upper bound is 1 here)
        box = (0, 0, width, height)
    x0, y0, w, h = box
    do_flip = 1.0 if flip and u[-1] < 0.5 else 0.0
    return [x0 / width, y0 / height, w / width, h / height, do_flip]


class EpochSampler(Sampler):
    """An epoch order seeded by (seed, epoch), cut to whole global batches; yields (epoch, index) pairs.

    Random (`block_ids=None`): a permutation. Block-shuffled (`block_ids[i]`: the cache block of dataset item i,
    i.e. its cache row // data.block_rows): blocks in random order, items shuffled within each buffer of
    `buffer_blocks` blocks (cache.h5_reader.block_shuffle_order), so the feature reader reads each block whole
    once instead of scattered rows per batch. The order depends on (seed, epoch) only, never on the number of
    processes or workers: Accelerate gives each rank its share of every global batch from the same order, and a
    resumed run skips into the same order. Cutting to whole global batches makes every optimizer step see exactly
    the scheduled global batch, and every epoch end on an accumulation boundary. No `generator` attribute on
    purpose: Accelerate would reseed it.
    """

    def __init__(self, num_rows: int, seed: int, global_batch_of: Callable[[int], int], shuffle: bool = True,
                 block_ids: np.ndarray | None = None, buffer_blocks: int = 16):
        self.num_rows, self.seed, self.global_batch_of, self.shuffle = num_rows, seed, global_batch_of, shuffle
        if block_ids is not None and len(block_ids) != num_rows:
            raise ValueError(f"block_ids has {len(block_ids)} entries for {num_rows} rows")
        self.block_ids = None if block_ids is None else np.asarray(block_ids, dtype=np.int64)
        self.buffer_blocks = int(buffer_blocks)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        gb = self.global_batch_of(self.epoch)
        return self.num_rows // gb * gb

    def order(self) -> np.ndarray:
        """Dataset indices of this epoch, before the cut to whole global batches."""
        if not self.shuffle:
            return np.arange(self.num_rows)
        if self.block_ids is not None:
            from cache.h5_reader import block_shuffle_order

            return block_shuffle_order(self.block_ids, self.buffer_blocks,
                                       np.random.default_rng((self.seed, self.epoch)))
        return torch.randperm(self.num_rows, generator=torch.Generator().manual_seed(self.seed + self.epoch)).numpy()

    def __iter__(self):
        for i in self.order()[: len(self)].tolist():
            yield (self.epoch, i)


class PairDataset(Dataset):
    """Usable corpus rows, each with the cache row of the same key; items are (epoch, index) or plain indices.

    Images are decoded under `max_pixels` (over it: a DataError naming the row, before decoding) and JPEGs at least
    twice the side the student's crops need are decoded at a reduced scale (`cache.image_decode.DecodeLimits`):
    this changes the pixels of such large JPEGs only.
    """

    def __init__(self, corpus, preprocess: PreprocessCfg, *, crop_scale=(0.9, 1.0), flip: bool = False,
                 seed: int = 0, cache_rows: np.ndarray | None = None, corpus_rows: np.ndarray | None = None,
                 view_params: np.ndarray | None = None, max_pixels: int = 64_000_000):
        from cache.image_decode import DecodeLimits
        from cache.image_rows import needed_side
        from cache.views import SCALE

        min_area = SCALE[0] if view_params is not None else crop_scale[0]  # the smallest crop the student sees
        self.corpus = corpus.with_limits(DecodeLimits(max_pixels or None, hint="data.max_pixels",
                                                      draft_side=needed_side(preprocess.image_size, min_area,
                                                                             RATIO[0])))
        self.preprocess = preprocess
        self.crop_scale, self.flip, self.seed = tuple(crop_scale), flip, seed
        self.corpus_rows = np.arange(len(corpus)) if corpus_rows is None else np.asarray(corpus_rows)
        self.cache_rows = self.corpus_rows if cache_rows is None else np.asarray(cache_rows)
        self.view_params = view_params  # (N_cache, K, 5) or None: stored views to show
        self.transform = make_view_transform(preprocess)

    def __len__(self) -> int:
        return len(self.corpus_rows)

    def choose(self, item) -> tuple[int, torch.Generator]:
        epoch, i = item if isinstance(item, tuple) else (0, item)
        return int(i), sample_generator(self.seed, int(epoch), int(i))

    def __getitem__(self, item) -> dict:
        i, gen = self.choose(item)
        row, cache_row = int(self.corpus_rows[i]), int(self.cache_rows[i])
        from cache.corpus import BadSampleError

        try:
            img = self.corpus.load_image(row)
        except BadSampleError as e:
            raise DataError(f"{e}; build a feature cache (`distill cache`) to find and skip bad samples, "
                            f"or fix or remove that row") from e
        if self.view_params is not None:
            k = int(torch.randint(self.view_params.shape[1], (1,), generator=gen))
            params = self.view_params[cache_row, k].tolist()
        else:
            k = -1
            params = random_crop_params(gen, img.width, img.height, self.crop_scale, self.flip)
        return {"image": self.transform(img, params), "caption": self.corpus.captions[row], "row": row,
                "cache_row": cache_row, "view": k}


class Collate:
    """Stacks items, tokenises captions, reads the rows' teacher features (same stored view) from the cache.

    Each caption's `caption_id` goes into the batch (with `caption_ids`), so the loss can tell which rows share a
    caption.

    `block_rows` > 0 (block-shuffled sampler): the reader reads whole blocks of that many rows and keeps
    `cache_blocks` of them per teacher, which should cover the sampler's shuffle buffer.

    Every teacher row read is checked (finite, unit norm, checksum; `cache.verify`), so a damaged cache never
    trains silently. `bad_features="stop"` raises `BadRowsError` naming teacher, modality and cache rows;
    "skip" keeps the sample (InfoNCE still sees it) but drops that teacher for that row: its features become
    zeros (0 * NaN would still be NaN in the loss) and its route entry is cleared, which gives it weight 0 in
    every teacher term (`distill.losses.combine.weight_matrix`). Zeroed rows still appear as (all-zero) columns
    of other rows' teacher similarity matrices in batch-level terms (affinity, ICL): a small bias, not a NaN.
    """

    def __init__(self, tokenizer, features: str | None = None, teachers: Sequence[str] = (),
                 use_views: bool = False, block_rows: int = 0, cache_blocks: int = 16,
                 route: np.ndarray | None = None, caption_ids: bool = True, bad_features: str = "stop"):
        self.tokenizer, self.features, self.teachers, self.use_views = tokenizer, features, list(teachers), use_views
        self.block_rows, self.cache_blocks = int(block_rows), int(cache_blocks)
        self.route = route  # (N_corpus, T) bool by CORPUS row, T = `teachers` (route_mask); None: no routing
        self.caption_ids = caption_ids  # hash the captions (only `positives: caption` terms read the ids)
        if bad_features not in ("stop", "skip"):
            raise ValueError(f"bad_features must be 'stop' or 'skip', got {bad_features!r}")
        self.bad_features = bad_features
        self.skipped_total = 0  # (teacher, row) pairs skipped by this process (or worker) so far
        self._reader = None

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_reader"] = None  # each worker opens its own reader
        return d

    @property
    def reader(self):
        if self._reader is None:
            from cache.h5_reader import FeatureReader

            self._reader = FeatureReader(self.features, teachers=self.teachers, block_rows=self.block_rows,
                                         cache_blocks=self.cache_blocks,
                                         unreadable="nan" if self.bad_features == "skip" else "raise")
        return self._reader

    def _read_checked(self, rows: np.ndarray, views: np.ndarray | None) -> tuple[dict, np.ndarray]:
        """The rows' teacher features, and a (B, T) bool mask of the (row, teacher) pairs that are bad."""
        try:
            got = self.reader.read(rows, self.teachers, views=views)
        except BadRowsError as e:  # a checksum failure (stop mode): same message as a NaN row, with the option
            raise BadRowsError.of(e.path, e.teacher, e.modality, e.rows, e.problem, SKIP_HINT) from None
        bad = np.zeros((len(rows), len(self.teachers)), dtype=bool)
        for j, t in enumerate(self.teachers):
            for m, x in got[t].items():
                mask = bad_row_mask(x)
                if mask.any() and self.bad_features == "stop":
                    first = int(np.flatnonzero(mask)[0])
                    raise BadRowsError.of(self.features, t, m, rows[mask], row_problem(x[first]), SKIP_HINT)
                bad[:, j] |= mask
        return got, bad

    def __call__(self, items: list[dict]) -> TrainBatch:
        views = torch.tensor([it["view"] for it in items], dtype=torch.long)
        feats: dict[str, dict[str, torch.Tensor]] = {}
        corpus_rows = [it["row"] for it in items]
        route = None if self.route is None else torch.from_numpy(self.route[corpus_rows])
        skipped = 0
        if self.features and self.teachers:
            rows = np.array([it["cache_row"] for it in items])
            got, bad = self._read_checked(rows, views.numpy() if self.use_views else None)
            if bad.any():  # skip mode: drop the teacher for those rows, never let a NaN reach the loss
                if route is None:
                    route = torch.ones(len(items), len(self.teachers), dtype=torch.bool)
                route = route & ~torch.from_numpy(bad)
                for j, t in enumerate(self.teachers):
                    for x in got[t].values():
                        x[bad[:, j]] = 0.0
                skipped = int(bad.sum())
                self.skipped_total += skipped
                log.warning("data.bad_features=skip: dropped %s for cache rows with bad features (%d pair(s) so "
                            "far in this process); run `distill info --verify %s`", ", ".join(
                                f"teacher {t!r} on rows {format_rows(rows[bad[:, j]])}" for j, t in
                                enumerate(self.teachers) if bad[:, j].any()), self.skipped_total, self.features)
            feats = {t: {m: mean_view(torch.as_tensor(np.asarray(x), dtype=torch.float32)) for m, x in d.items()}
                     for t, d in got.items()}
        captions = [it["caption"] for it in items]
        return TrainBatch(images=torch.stack([it["image"] for it in items]),
                          tokens=self.tokenizer(captions),
                          rows=torch.tensor(corpus_rows, dtype=torch.long), views=views,
                          teacher_feats=feats, route=route,
                          caption_ids=torch.tensor([caption_id(c) for c in captions], dtype=torch.int64)
                          if self.caption_ids else None, skipped_features=skipped)


def mean_view(x: torch.Tensor) -> torch.Tensor:
    """(B, K, D) view embeddings when the student does not use stored views: their normalised mean."""
    return torch.nn.functional.normalize(x.mean(1), dim=-1) if x.ndim == 3 else x


@dataclass(frozen=True)
class CacheJoin:
    """Which corpus rows train, the cache row of each, and what the cache says about its teachers."""

    corpus_rows: np.ndarray
    cache_rows: np.ndarray
    teachers: dict[str, dict]  # name -> teacher attrs (spec, embed_dim, logit_scale, views, ...)
    view_params: np.ndarray | None
    skipped_bad: int
    chunk_rows: int = 1  # rows per HDF5 chunk of the cache's teachers (data.block_rows should be a multiple)
    cache_teachers: tuple[str, ...] = ()  # every teacher in the cache, used or not (routing names any of them)


def join_cache(corpus, features: str | Path, teachers: Sequence[str] | None, use_views: bool = True) -> CacheJoin:
    """Match corpus keys to cache keys and keep rows every used teacher has done; clear errors otherwise."""
    from cache.h5_reader import FeatureReader

    path = str(features)
    if not Path(path).is_file():
        raise DataError(f"data.features={path} does not exist; build it with `distill cache --data "
                        f"{corpus.source} --teacher NAME=SPEC --out {path}`")
    with FeatureReader(path) as reader:
        fix = f"`distill cache --data {corpus.source} --out {path} --teacher NAME=SPEC`"
        available = list(reader.teacher_names)
        if not available:
            raise DataError(f"{path} holds no teachers yet; add some with {fix}")
        names = list(available) if teachers is None else list(teachers)
        missing = [t for t in names if t not in available]
        if missing:
            raise DataError(f"{path} lacks teacher(s) {missing} (it has {available}); add each with "
                            f"`distill cache --data {corpus.source} --out {path} --teacher {missing[0]}=SPEC`, "
                            f"or drop it from the config's loss.teachers")
        cache_keys = list(reader.keys)
        if reader.fingerprint != corpus.fingerprint():
            raise DataError(f"{path} was built from another corpus than {corpus.source} (corpus fingerprint "
                            f"differs: keys or captions changed, so cached text features would be stale); "
                            f"rebuild it with {fix} into a new file, or point data.features at this corpus's cache")
        index = {k: r for r, k in enumerate(cache_keys)}
        absent = [k for k in corpus.keys if k not in index]
        if absent:
            raise DataError(f"{len(absent)} corpus key(s) of {corpus.source} are not in {path} (first: "
                            f"{absent[0]!r}): the cache was built from another version of the corpus; "
                            f"rebuild it with {fix}")
        cache_rows_all = np.array([index[k] for k in corpus.keys], dtype=np.int64)
        done_any = _undone(reader, names, cache_rows_all)
        if done_any:
            t, n = done_any
            raise DataError(f"{path}: teacher {t!r} has not embedded {n} of the corpus's {len(corpus)} rows "
                            f"(an interrupted or partial cache); finish it by rerunning `distill cache --data "
                            f"{corpus.source} --out {path} --teacher {t}=SPEC` (it fills only missing rows)")
        keep = np.isin(cache_rows_all, reader.usable_rows(names))
        if not keep.any():
            raise DataError(f"{path}: no corpus row is usable by every teacher in {names}")
        attrs = {t: dict(reader.teacher_attrs(t)) for t in names}
        views = None
        if use_views and reader.num_views:
            views = reader.view_params(np.arange(len(cache_keys)))
        skipped = int((~keep).sum())
        if skipped:
            log.warning("skipping %d corpus rows the cache marks bad", skipped)
        return CacheJoin(np.flatnonzero(keep), cache_rows_all[keep], attrs, views, skipped, reader.chunk_rows,
                         tuple(available))


def _undone(reader, names: Sequence[str], cache_rows: np.ndarray) -> tuple[str, int] | None:
    """(teacher, count) of the first teacher with rows neither done nor marked bad, else None."""
    pending = ~np.isin(cache_rows, reader.bad_rows)
    for t in names:
        n = int((pending & ~np.isin(cache_rows, reader.usable_rows([t]))).sum())
        if n:
            return t, n
    return None


@dataclass(frozen=True)
class Routing:
    """Each corpus row's teachers: a (N_corpus, T) bool mask over `teachers`, and the counts over the used rows."""

    teachers: list[str]  # mask columns (the loss's teacher order)
    mask: np.ndarray  # (N_corpus, T) bool, indexed by corpus row
    rows_per_teacher: dict[str, int]  # over the rows that train
    unrouted_rows: int  # rows that train with no teacher (teacher-free terms only)

    def summary(self) -> dict:
        return {"rows_per_teacher": dict(self.rows_per_teacher), "unrouted_rows": self.unrouted_rows}


def route_mask(routing, corpus, teachers: Sequence[str], cache_teachers: Sequence[str],
               used_rows: np.ndarray | None = None) -> Routing:
    """The route mask of `corpus` for the loss's `teachers` from a `distill.config.RoutingCfg`.

    cache_teachers: every teacher in the feature cache (a routed name outside it is an error). used_rows: the corpus
    rows that train (after skipping bad ones); every teacher must be routed to at least one of them.
    """
    from cache.corpus import CorpusError

    where = f"loss.routing.column={routing.column!r}"
    try:
        cells = corpus.column(routing.column)
    except CorpusError as e:
        raise DataError(f"{where}: {e}") from None
    known = list(cache_teachers)
    named = [(f"loss.routing.teachers.{v}", names) for v, names in (routing.teachers or {}).items()]
    for what, names in [*named, ("loss.routing.default", routing.default)]:
        bad = [n for n in names if n not in known]
        if bad:
            raise DataError(f"{what} names teacher(s) {bad} that are not in the cache ({', '.join(known)}); "
                            f"fix the name or add it with `distill cache --teacher {bad[0]}=SPEC`")
    col = {t: j for j, t in enumerate(teachers)}
    mask = np.zeros((len(cells), len(teachers)), dtype=bool)
    default = [col[t] for t in routing.default if t in col]
    if routing.teachers is not None:
        table = {v: [col[t] for t in names if t in col] for v, names in routing.teachers.items()}
        for i, v in enumerate(cells):
            mask[i, table.get(v, default)] = True
    else:
        for i, v in enumerate(cells):
            names = [n.strip() for n in v.split(routing.separator) if n.strip()]
            bad = [n for n in names if n not in known]
            if bad:
                raise DataError(f"{corpus.describe(i)}: column {routing.column!r} names teacher(s) {bad} that are "
                                f"not in the cache ({', '.join(known)}); fix the cell or the cache")
            mask[i, [col[n] for n in names if n in col] if names else default] = True
    rows = np.arange(len(cells)) if used_rows is None else np.asarray(used_rows)
    sub = mask[rows]
    counts = {t: int(sub[:, j].sum()) for j, t in enumerate(teachers)}
    empty = [t for t, c in counts.items() if c == 0]
    if empty:
        raise DataError(f"teacher {empty[0]!r} is routed to no row of {corpus.source} (loss.routing, column "
                        f"{routing.column!r}); route some rows to it, or leave it out of loss.teachers")
    return Routing(list(teachers), mask, counts, int((~sub.any(1)).sum()))
