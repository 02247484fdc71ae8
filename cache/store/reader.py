"""Reading teacher features for training: fast row access without loading the file, safe under DataLoader fork.

h5py handles must not cross a fork (h5py docs/mpi.rst), so `FeatureReader` reads only small metadata (keys,
attrs, done masks, chunk shape) at construction with a handle it closes at once, and opens the file and its
datasets lazily in whichever process first reads, reopening when `os.getpid()` changes. The dataset handles stay
open between calls: reopening a dataset throws away HDF5's chunk cache.

Two read paths, both returning the same values:
- `block_rows=0` (default): rows are read as sorted unique indices (one hyperslab when they are dense, h5py
  point selection otherwise) and reordered in numpy, much faster than h5py fancy indexing in arbitrary order.
- `block_rows=B` (training with a block-shuffled sampler): the blocks the rows fall in (rows [k*B, (k+1)*B)) are
  read WHOLE, one contiguous slice per teacher and modality, kept in a small LRU of `cache_blocks` blocks, and
  rows are gathered in memory. With the trainer's block-shuffled `EpochSampler` (`block_shuffle_order`) and
  cache_blocks >= the shuffle buffer, each block is read once per epoch per process (worker) that draws from
  it; with the dealt order (data.sampler=block_deal, `distill.data.samplers.deal_order`) once per epoch in all:
  bytes read per useful byte ~1 at any number of ranks and workers (benchmarks/input_pipeline.py). B should be a
  multiple of the file's chunk rows (`chunk_rows`).

The reader sees the file as it was when opened: rows committed by a running or killed `distill cache` that
are still waiting in segments not yet folded in appear after the next fold. A format-2 file reads its rows
through virtual datasets from FEATURES.h5.segments/ (`cache.store.layout`; HDF5 opens each segment once per process,
on first read); one whose segment files are missing is refused when opened (`schema.check_root`).
"""

from __future__ import annotations

import os
from collections import Counter, OrderedDict
from collections.abc import Sequence

import h5py
import numpy as np

import cache.store.layout as L
from cache.store.schema import CacheError, attrs_to_dict, check_root
from cache.store.verify import UNREADABLE, BadRowsError, raise_damaged, read_block
from teachers.kernel.modality import MODALITIES, Modality, Pair

Embeddings = Pair[np.ndarray]  # one teacher's (B, D) image (or (B, K, D) views) and (B, D) text embeddings


class FeatureReader:
    """Per-teacher image/text embeddings of a feature cache, by row (see the module docstring).

    `max_span_ratio`: without blocks, read one contiguous slice when (last - first + 1) <= ratio * rows asked;
    `rdcc_nbytes`: HDF5 chunk cache per dataset; `block_rows`: read whole blocks of this many rows (0: off);
    `cache_blocks`: blocks kept per teacher (LRU; the sampler's shuffle buffer): at most cache_blocks x
    block_rows x bytes per row, per teacher (patch tokens, `read_tokens`, in an LRU of their own, "NAME/tokens").
    `bytes_read` counts the feature bytes fetched from HDF5, `block_reads` the whole-block reads by (teacher, block).

    A file HDF5 cannot open or read (truncated, overwritten) raises CacheError naming it. Feature rows that
    cannot be read (a fletcher32 checksum mismatch) raise `BadRowsError` naming the teacher, modality and rows
    with `unreadable="raise"` (default), or come back as NaN rows with `unreadable="nan"` for the caller's
    row checks to skip (training with data.bad_features=skip).
    """

    def __init__(
        self,
        path: str,
        teachers: list[str] | None = None,
        *,
        max_span_ratio: float = 4.0,
        rdcc_nbytes: int = 16 * 1024 * 1024,
        block_rows: int = 0,
        cache_blocks: int = 16,
        unreadable: str = "raise",
    ):
        self.path = os.fspath(path)
        if unreadable not in ("raise", "nan"):
            raise ValueError(f"unreadable must be 'raise' or 'nan', got {unreadable!r}")
        self.unreadable = unreadable
        self.max_span_ratio = float(max_span_ratio)
        self.rdcc_nbytes = int(rdcc_nbytes)
        if int(block_rows) < 0 or int(cache_blocks) < 1:
            raise ValueError(
                f"block_rows must be >= 0 (0: no block cache) and cache_blocks >= 1; got "
                f"block_rows={block_rows}, cache_blocks={cache_blocks}"
            )
        self.block_rows, self.cache_blocks = int(block_rows), int(cache_blocks)
        self.bytes_read = 0
        self.block_reads: Counter[tuple[str, int]] = Counter()
        self._h5: h5py.File | None = None
        self._pid: int | None = None
        self._ds: dict[tuple[str, str], h5py.Dataset] = {}  # (teacher, modality or "tokens") -> dataset
        self._blocks: dict[str, OrderedDict[int, dict]] = {}  # teacher (or "NAME/tokens") -> block -> arrays
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"feature cache {self.path} not found; build it with `distill cache`")
        try:
            self._read_metadata(teachers)
        except OSError as e:  # truncated or overwritten: opening or reading the metadata fails
            raise_damaged(self.path, e)

    def _read_metadata(self, teachers: list[str] | None) -> None:
        with h5py.File(self.path, "r") as f:  # closed before any fork
            check_root(f, self.path)
            self.fingerprint: str = str(f.attrs[L.Root.FINGERPRINT])
            self.num_rows = int(f.attrs[L.Root.NUM_ROWS])
            self.keys: list[str] = f[L.KEYS].asstr()[:].tolist()
            available = list(f[L.TEACHERS].keys())
            if teachers is None:
                teachers = available
            missing = [t for t in teachers if t not in available]
            if missing:
                raise KeyError(
                    f"{self.path}: no teacher(s) {', '.join(missing)}; available: {', '.join(available) or 'none'}"
                )
            self.teacher_names: list[str] = list(teachers)
            self._attrs = {t: attrs_to_dict(f[L.teacher(t)].attrs) for t in self.teacher_names}
            self._done = {t: f[L.done(t)][:] for t in self.teacher_names}
            self._has_stats = {t: L.stats(t) in f for t in self.teacher_names}
            self._has_tokens = {t: L.tokens(t) in f for t in self.teacher_names}
            self.num_views: int = int(f[L.VIEW_PARAMS].shape[1]) if L.VIEW_PARAMS in f else 0
            self.bad_rows = f[L.BAD_ROWS][:] if L.BAD in f else np.zeros(0, dtype=np.int64)
            chunks = [L.chunk_rows_of(f[L.feature(t, m)]) for t in self.teacher_names for m in MODALITIES]
            # rows per HDF5 chunk (the largest over the opened teachers); block_rows should be a multiple of it
            self.chunk_rows: int = max(chunks or [1])

    # -- lazy, fork-safe handles ---------------------------------------------------------------------------
    def _file(self) -> h5py.File:
        if self._h5 is None or self._pid != os.getpid():
            try:
                self._h5 = h5py.File(self.path, "r", rdcc_nbytes=self.rdcc_nbytes)
            except OSError as e:  # damaged (or replaced) since the metadata was read
                raise_damaged(self.path, e)
            self._pid = os.getpid()
            self._ds, self._blocks = {}, {}
        return self._h5

    def _dataset(self, teacher: str, what: str) -> h5py.Dataset:
        f = self._file()
        ds = self._ds.get((teacher, what))
        if ds is None:
            path = L.tokens(teacher) if what == L.TOKENS else L.feature(teacher, Modality(what))
            ds = self._ds[(teacher, what)] = f[path]
        return ds

    def close(self) -> None:
        if self._h5 is not None and self._pid == os.getpid():
            self._h5.close()
        self._h5, self._pid, self._ds, self._blocks = None, None, {}, {}

    def __getstate__(self) -> dict:  # spawn-started workers get no handle and no blocks, they open their own
        state = dict(self.__dict__)
        state["_h5"], state["_pid"], state["_ds"], state["_blocks"] = None, None, {}, {}
        return state

    def __enter__(self) -> FeatureReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        return self.num_rows

    # -- metadata ------------------------------------------------------------------------------------------
    def _names(self, teachers: Sequence[str] | None) -> list[str]:
        names = self.teacher_names if teachers is None else list(teachers)
        for t in names:
            if t not in self._attrs:
                raise KeyError(f"teacher {t!r} not opened from {self.path}; opened: {', '.join(self.teacher_names)}")
        return names

    def teacher_attrs(self, name: str) -> dict:
        """spec, embed_dim, logit_scale, image_size, mean, std, context_length, views, dtype, ..."""
        return dict(self._attrs[self._names([name])[0]])

    def token_grid(self, name: str) -> int:
        """G of teacher NAME's stored G x G patch-token grid; 0 when it was cached without --tokens."""
        name = self._names([name])[0]
        return int(self._attrs[name].get("tokens", 0)) if self._has_tokens[name] else 0

    def usable_rows(self, teachers: Sequence[str] | None = None) -> np.ndarray:
        """Sorted row ids done for every named teacher and not recorded as bad samples."""
        mask = np.ones(self.num_rows, dtype=bool)
        for t in self._names(teachers):
            mask &= self._done[t]
        mask[self.bad_rows] = False
        return np.flatnonzero(mask)

    # -- data ----------------------------------------------------------------------------------------------
    def _slice(self, ds: h5py.Dataset, lo: int, hi: int, where: tuple[str, str] | None) -> np.ndarray:
        """ds[lo:hi]; rows in chunks that fail their checksum raise BadRowsError, or come back as NaN."""
        try:
            return ds[lo:hi]
        except OSError as e:
            if where is None:  # not a feature dataset (views/params): the file itself is damaged
                raise_damaged(self.path, e)
        out, bad = read_block(ds, lo, hi)
        rows = sorted(r for rs in bad.values() for r in rs)
        if rows and self.unreadable == "raise":
            raise BadRowsError.of(
                self.path, where[0], "patch-token" if where[1] == L.TOKENS else where[1], rows, UNREADABLE
            )
        return out

    def _take(self, ds: h5py.Dataset, uniq: np.ndarray, where: tuple[str, str] | None = None) -> np.ndarray:
        if len(uniq) == 0:
            return np.zeros((0, *ds.shape[1:]), dtype=ds.dtype)
        lo, hi = int(uniq[0]), int(uniq[-1]) + 1
        if hi - lo <= self.max_span_ratio * len(uniq):
            out = self._slice(ds, lo, hi, where)
            self.bytes_read += out.nbytes
            return out[uniq - lo]
        try:
            out = ds[uniq]
        except OSError:  # narrow to the failing rows: one (small) read per row
            out = np.concatenate([self._slice(ds, r, r + 1, where) for r in uniq.tolist()])
        self.bytes_read += out.nbytes
        return out

    def _gather(self, teacher: str, uniq: np.ndarray) -> Embeddings:
        """A teacher's image and text rows `uniq` (sorted, unique) in stored dtype (see `_gather_sets`)."""
        got = self._gather_sets(teacher, teacher, tuple(MODALITIES), uniq)
        return Pair(got[Modality.IMAGE], got[Modality.TEXT])

    def _gather_sets(self, teacher: str, lru_key: str, whats: tuple[str, ...], uniq: np.ndarray) -> dict:
        """{what: rows `uniq`} of a teacher's datasets `whats`, via whole blocks (LRU `lru_key`) or direct reads.

        Blocks: rows [k*B, (k+1)*B), each dataset read whole as one slice, kept in the LRU. Blocks already held
        count as used before the ones read now, so a batch that straddles two shuffle buffers leaves the new
        buffer's blocks in the LRU, not the old one's; eviction waits until the batch is gathered.
        """
        if not self.block_rows:
            return {w: self._take(self._dataset(teacher, w), uniq, (teacher, w)) for w in whats}
        ds = {w: self._dataset(teacher, w) for w in whats}  # first: opening the file resets the LRUs
        lru = self._blocks.setdefault(lru_key, OrderedDict())
        out = {w: np.empty((len(uniq), *d.shape[1:]), dtype=d.dtype) for w, d in ds.items()}
        ids = uniq // self.block_rows
        starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]]) if len(uniq) else np.zeros(0, dtype=np.int64)
        runs = [(int(ids[s]), s, e) for s, e in zip(starts.tolist(), np.r_[starts[1:], len(uniq)].tolist())]
        for k, _, _ in runs:  # uniq is sorted: each block is one run
            if k in lru:
                lru.move_to_end(k)
        for k, s, e in runs:
            block = lru.get(k)
            if block is None:
                lo, hi = k * self.block_rows, min(self.num_rows, (k + 1) * self.block_rows)
                block = lru[k] = {w: self._slice(d, lo, hi, (teacher, w)) for w, d in ds.items()}
                self.bytes_read += sum(b.nbytes for b in block.values())
                self.block_reads[(lru_key, k)] += 1
            local = uniq[s:e] - k * self.block_rows
            for w in ds:
                out[w][s:e] = block[w][local]
        while len(lru) > self.cache_blocks:
            lru.popitem(last=False)
        return out

    def _rows(self, rows) -> tuple[np.ndarray, np.ndarray]:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if len(rows) and (rows.min() < 0 or rows.max() >= self.num_rows):
            raise IndexError(f"row ids must be in [0, {self.num_rows}); got {rows.min()}..{rows.max()}")
        return np.unique(rows, return_inverse=True)

    def read(
        self, rows, teachers: Sequence[str] | None = None, views: np.ndarray | None = None
    ) -> dict[str, Embeddings]:
        """{teacher: Embeddings(image (B, D), text (B, D))} as float32, in the order of `rows`.

        For a teacher cached with K views, `views` (B,) picks view views[i] for row i (the same view for all
        teachers); without it `image` is (B, K, D). Teachers cached without views ignore `views`.
        """
        uniq, inv = self._rows(rows)
        out: dict[str, Embeddings] = {}
        for t in self._names(teachers):
            got = self._gather(t, uniq)
            image = got.image[inv]
            if image.ndim == 3 and views is not None:
                image = image[np.arange(len(views)), _view_ids(views, len(inv), image.shape[1], t)]
            out[t] = Pair(image.astype(np.float32), got.text[inv].astype(np.float32))
        return out

    def read_tokens(
        self, rows, teachers: Sequence[str] | None = None, views: np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        """{teacher: (B, G*G, D) float32 patch tokens} in the order of `rows` (blocks as for `read`, in a separate
        LRU); with K views, `views` (B,) picks each row's view as in `read`, else (B, K, G*G, D)."""
        uniq, inv = self._rows(rows)
        out: dict[str, np.ndarray] = {}
        for t in self._names(teachers):
            if not self._has_tokens[t]:
                raise CacheError(
                    f"{self.path}: teacher {t!r} has no patch tokens; cache it with `distill cache "
                    f"--tokens G` (into a new file or under another teacher name)"
                )
            x = self._gather_sets(t, f"{t}/{L.TOKENS}", (L.TOKENS,), uniq)[L.TOKENS][inv]
            if x.ndim == 4 and views is not None:
                x = x[np.arange(len(inv)), _view_ids(views, len(inv), x.shape[1], t)]
            out[t] = x.astype(np.float32)
        return out

    def view_params(self, rows) -> np.ndarray | None:
        """(B, K, 5) crop boxes + flips of `rows` (for the student to see the same views), or None."""
        if not self.num_views:
            return None
        uniq, inv = self._rows(rows)
        return self._take(self._file()[L.VIEW_PARAMS], uniq)[inv]

    def stats(self, name: str) -> dict[str, np.ndarray]:
        """image_mean, image_cov, text_mean, text_cov (float32), written when the teacher completed."""
        name = self._names([name])[0]
        if not self._has_stats[name]:
            raise CacheError(
                f"{self.path}: teacher {name!r} has no statistics yet: only "
                f"{int(self._done[name].sum())}/{self.num_rows} rows done; finish `distill cache`"
            )
        s = self._file()[L.stats(name)]
        return {k: s[k][:] for k in L.STATS_FIELDS}


def _view_ids(views, rows: int, k: int, teacher: str) -> np.ndarray:
    """(B,) view ids, checked against the rows asked and the teacher's K views."""
    views = np.asarray(views, dtype=np.int64).reshape(-1)
    if views.shape[0] != rows:
        raise ValueError(f"views has {views.shape[0]} entries for {rows} rows")
    if len(views) and (views.min() < 0 or views.max() >= k):
        raise IndexError(f"teacher {teacher!r} has {k} views; got view ids {views.min()}..{views.max()}")
    return views


def block_shuffle_order(block_ids: np.ndarray, buffer_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """Positions 0..n-1 in block-shuffled order: blocks (equal `block_ids`) in random order, then positions
    shuffled within each buffer of `buffer_blocks` consecutive blocks. A batch then draws from few blocks (dense
    reads); blocks must be whole in memory for that (FeatureReader's block cache)."""
    block_ids = np.asarray(block_ids).reshape(-1)
    if len(block_ids) == 0:
        return np.zeros(0, dtype=np.int64)
    pos = np.argsort(block_ids, kind="stable")
    sorted_ids = block_ids[pos]
    starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]])
    groups = np.split(pos, starts[1:])
    groups = [groups[i] for i in rng.permutation(len(groups))]
    b = max(1, int(buffer_blocks))
    out = []
    for i in range(0, len(groups), b):
        buf = np.concatenate(groups[i : i + b])
        out.append(buf[rng.permutation(len(buf))])
    return np.concatenate(out).astype(np.int64)
