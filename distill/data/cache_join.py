"""Which corpus rows train and with which teachers: corpus keys joined to feature-cache rows, and loss routing.

Why by key, not by row: a corpus may be re-exported in another order, or a cache may hold more rows than the
corpus; the key is the stable sample id, so rows are matched through it and every mismatch is an
error that says which command fixes it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cache.sources.corpus import CorpusError
from cache.store.reader import FeatureReader
from distill.data.loader import DataError

log = logging.getLogger(__name__)


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
    path = str(features)
    if not Path(path).is_file():
        raise DataError(
            f"data.features={path} does not exist; build it with `distill cache --data "
            f"{corpus.source} --teacher NAME=SPEC --out {path}`"
        )
    with FeatureReader(path) as reader:
        fix = f"`distill cache --data {corpus.source} --out {path} --teacher NAME=SPEC`"
        available = list(reader.teacher_names)
        if not available:
            raise DataError(f"{path} holds no teachers yet; add some with {fix}")
        names = list(available) if teachers is None else list(teachers)
        missing = [t for t in names if t not in available]
        if missing:
            raise DataError(
                f"{path} lacks teacher(s) {missing} (it has {available}); add each with "
                f"`distill cache --data {corpus.source} --out {path} --teacher {missing[0]}=SPEC`, "
                f"or drop it from the config's loss.teachers"
            )
        cache_keys = list(reader.keys)
        if reader.fingerprint != corpus.fingerprint():
            raise DataError(
                f"{path} was built from another corpus than {corpus.source} (corpus fingerprint "
                f"differs: keys or captions changed, so cached text features would be stale); "
                f"rebuild it with {fix} into a new file, or point data.features at this corpus's cache"
            )
        index = {k: r for r, k in enumerate(cache_keys)}
        absent = [k for k in corpus.keys if k not in index]
        if absent:
            raise DataError(
                f"{len(absent)} corpus key(s) of {corpus.source} are not in {path} (first: "
                f"{absent[0]!r}): the cache was built from another version of the corpus; "
                f"rebuild it with {fix}"
            )
        cache_rows_all = np.array([index[k] for k in corpus.keys], dtype=np.int64)
        done_any = _undone(reader, names, cache_rows_all)
        if done_any:
            t, n = done_any
            raise DataError(
                f"{path}: teacher {t!r} has not embedded {n} of the corpus's {len(corpus)} rows "
                f"(an interrupted or partial cache); finish it by rerunning `distill cache --data "
                f"{corpus.source} --out {path} --teacher {t}=SPEC` (it fills only missing rows)"
            )
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
        return CacheJoin(
            np.flatnonzero(keep), cache_rows_all[keep], attrs, views, skipped, reader.chunk_rows, tuple(available)
        )


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
    row_weights: np.ndarray | None = None  # (N_corpus,) float32 teacher-term weight by corpus row (routing.weights)

    def summary(self) -> dict:
        return {"rows_per_teacher": dict(self.rows_per_teacher), "unrouted_rows": self.unrouted_rows}


def route_mask(
    routing, corpus, teachers: Sequence[str], cache_teachers: Sequence[str], used_rows: np.ndarray | None = None
) -> Routing:
    """The route mask of `corpus` for the loss's `teachers` from a `distill.config.train_config.RoutingCfg`.

    cache_teachers: every teacher in the feature cache (a routed name outside it is an error). used_rows: the corpus
    rows that train (after skipping bad ones); every teacher must be routed to at least one of them.
    """
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
            raise DataError(
                f"{what} names teacher(s) {bad} that are not in the cache ({', '.join(known)}); "
                f"fix the name or add it with `distill cache --teacher {bad[0]}=SPEC`"
            )
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
                raise DataError(
                    f"{corpus.describe(i)}: column {routing.column!r} names teacher(s) {bad} that are "
                    f"not in the cache ({', '.join(known)}); fix the cell or the cache"
                )
            mask[i, [col[n] for n in names if n in col] if names else default] = True
    rows = np.arange(len(cells)) if used_rows is None else np.asarray(used_rows)
    sub = mask[rows]
    counts = {t: int(sub[:, j].sum()) for j, t in enumerate(teachers)}
    empty = [t for t, c in counts.items() if c == 0]
    if empty:
        raise DataError(
            f"teacher {empty[0]!r} is routed to no row of {corpus.source} (loss.routing, column "
            f"{routing.column!r}); route some rows to it, or leave it out of loss.teachers"
        )
    return Routing(list(teachers), mask, counts, int((~sub.any(1)).sum()), row_weights(routing, cells, corpus))


def row_weights(routing, cells: Sequence[str], corpus) -> np.ndarray | None:
    """(N_corpus,) float32 teacher-term weight of each row from `loss.routing.weights` (value -> weight, 1 for
    values not listed); None without weights. A listed value that no cell holds is an error: a misspelt value
    would otherwise leave its rows at weight 1 without a word."""
    weights = getattr(routing, "weights", None) or {}
    if not weights:
        return None
    held = set(cells)
    absent = [v for v in weights if v not in held]
    if absent:
        values = sorted(held)
        raise DataError(
            f"loss.routing.weights names value(s) {absent} that column {routing.column!r} of "
            f"{corpus.source} never holds (its values: {', '.join(map(repr, values[:12]))}"
            f"{', ...' if len(values) > 12 else ''}); fix the name or remove it"
        )
    return np.array([weights.get(v, 1.0) for v in cells], dtype=np.float32)
