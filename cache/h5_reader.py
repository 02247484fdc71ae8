"""Reading teacher features for training: fast row access without loading the file, safe under DataLoader fork.

h5py handles must not cross a fork (h5py docs/mpi.rst), so `FeatureReader` reads only small metadata (keys,
attrs, done masks) at construction with a handle it closes at once, and opens the data lazily in whichever
process first calls `read()`, reopening when `os.getpid()` changes. Rows are read as sorted unique indices
(one hyperslab when they are dense, h5py point selection otherwise) and reordered in numpy, which is much
faster than h5py fancy indexing in arbitrary order. `BlockShuffleSampler` makes batches dense on purpose.

The reader sees the file as it was when opened: rows committed by a running or killed `distill cache` that
are still waiting in FEATURES.h5.parts/ appear after the next fold.
"""
from __future__ import annotations

import os
from typing import Iterator, Sequence

import h5py
import numpy as np
from torch.utils.data import Sampler

from .schema import CacheError, attrs_to_dict, check_root


class FeatureReader:
    """Per-teacher image/text embeddings of a feature cache, by row (see the module docstring).

    `max_span_ratio`: read one contiguous block when (last - first + 1) <= ratio * number of rows asked;
    `rdcc_nbytes`: HDF5 chunk cache per dataset. Both are knobs for the cache-overhead benchmark.
    """

    def __init__(self, path: str, teachers: list[str] | None = None, *, max_span_ratio: float = 4.0,
                 rdcc_nbytes: int = 16 * 1024 * 1024):
        self.path = os.fspath(path)
        self.max_span_ratio = float(max_span_ratio)
        self.rdcc_nbytes = int(rdcc_nbytes)
        self._h5: h5py.File | None = None
        self._pid: int | None = None
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"feature cache {self.path} not found; build it with `distill cache`")
        with h5py.File(self.path, "r") as f:  # closed before any fork
            check_root(f, self.path)
            self.fingerprint: str = str(f.attrs["corpus_fingerprint"])
            self.num_rows = int(f.attrs["num_rows"])
            self.keys: list[str] = f["keys"].asstr()[:].tolist()
            available = list(f["teachers"].keys())
            if teachers is None:
                teachers = available
            missing = [t for t in teachers if t not in available]
            if missing:
                raise KeyError(f"{self.path}: no teacher(s) {', '.join(missing)}; available: "
                               f"{', '.join(available) or 'none'}")
            self.teacher_names: list[str] = list(teachers)
            self._attrs = {t: attrs_to_dict(f[f"teachers/{t}"].attrs) for t in self.teacher_names}
            self._done = {t: f[f"teachers/{t}/done"][:] for t in self.teacher_names}
            self._has_stats = {t: f"teachers/{t}/stats" in f for t in self.teacher_names}
            self.num_views: int = int(f["views/params"].shape[1]) if "views/params" in f else 0
            self.bad_rows = f["bad/rows"][:] if "bad" in f else np.zeros(0, dtype=np.int64)

    # -- lazy, fork-safe handle ----------------------------------------------------------------------------
    def _file(self) -> h5py.File:
        if self._h5 is None or self._pid != os.getpid():
            self._h5 = h5py.File(self.path, "r", rdcc_nbytes=self.rdcc_nbytes)
            self._pid = os.getpid()
        return self._h5

    def close(self) -> None:
        if self._h5 is not None and self._pid == os.getpid():
            self._h5.close()
        self._h5, self._pid = None, None

    def __getstate__(self) -> dict:  # spawn-started workers get no handle, they open their own
        state = dict(self.__dict__)
        state["_h5"], state["_pid"] = None, None
        return state

    def __enter__(self) -> "FeatureReader":
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

    def usable_rows(self, teachers: Sequence[str] | None = None) -> np.ndarray:
        """Sorted row ids done for every named teacher and not recorded as bad samples."""
        mask = np.ones(self.num_rows, dtype=bool)
        for t in self._names(teachers):
            mask &= self._done[t]
        mask[self.bad_rows] = False
        return np.flatnonzero(mask)

    # -- data ----------------------------------------------------------------------------------------------
    def _take(self, ds: h5py.Dataset, uniq: np.ndarray) -> np.ndarray:
        if len(uniq) == 0:
            return np.zeros((0, *ds.shape[1:]), dtype=ds.dtype)
        lo, hi = int(uniq[0]), int(uniq[-1]) + 1
        if hi - lo <= self.max_span_ratio * len(uniq):
            return ds[lo:hi][uniq - lo]
        return ds[uniq]

    def _rows(self, rows) -> tuple[np.ndarray, np.ndarray]:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if len(rows) and (rows.min() < 0 or rows.max() >= self.num_rows):
            raise IndexError(f"row ids must be in [0, {self.num_rows}); got {rows.min()}..{rows.max()}")
        return np.unique(rows, return_inverse=True)

    def read(self, rows, teachers: Sequence[str] | None = None,
             views: np.ndarray | None = None) -> dict[str, dict[str, np.ndarray]]:
        """{teacher: {"image": (B, D), "text": (B, D)}} as float32, in the order of `rows`.

        For a teacher cached with K views, `views` (B,) picks view views[i] for row i (the same view for all
        teachers); without it "image" is (B, K, D). Teachers cached without views ignore `views`.
        """
        uniq, inv = self._rows(rows)
        if views is not None:
            views = np.asarray(views, dtype=np.int64).reshape(-1)
            if views.shape[0] != inv.shape[0]:
                raise ValueError(f"views has {views.shape[0]} entries for {inv.shape[0]} rows")
        f = self._file()
        out = {}
        for t in self._names(teachers):
            g = f[f"teachers/{t}"]
            image = self._take(g["image"], uniq)[inv]
            if image.ndim == 3 and views is not None:
                k = image.shape[1]
                if len(views) and (views.min() < 0 or views.max() >= k):
                    raise IndexError(f"teacher {t!r} has {k} views; got view ids {views.min()}..{views.max()}")
                image = image[np.arange(len(views)), views]
            out[t] = {"image": image.astype(np.float32), "text": self._take(g["text"], uniq)[inv].astype(np.float32)}
        return out

    def view_params(self, rows) -> np.ndarray | None:
        """(B, K, 5) crop boxes + flips of `rows` (for the student to see the same views), or None."""
        if not self.num_views:
            return None
        uniq, inv = self._rows(rows)
        return self._take(self._file()["views/params"], uniq)[inv]

    def stats(self, name: str) -> dict[str, np.ndarray]:
        """image_mean, image_cov, text_mean, text_cov (float32), written when the teacher completed."""
        name = self._names([name])[0]
        if not self._has_stats[name]:
            raise CacheError(f"{self.path}: teacher {name!r} has no statistics yet: only "
                             f"{int(self._done[name].sum())}/{self.num_rows} rows done; finish `distill cache`")
        s = self._file()[f"teachers/{name}/stats"]
        return {k: s[k][:] for k in ("image_mean", "image_cov", "text_mean", "text_cov")}


class BlockShuffleSampler(Sampler[int]):
    """Shuffle contiguous blocks of rows, then rows within a buffer of blocks: random enough, and dense reads.

    With block_size=1 it is a plain shuffle. Call `set_epoch(e)` each epoch for a new, reproducible order.
    """

    def __init__(self, rows: Sequence[int] | np.ndarray, block_size: int = 256, buffer_blocks: int = 16,
                 seed: int = 0):
        self.rows = np.sort(np.asarray(rows, dtype=np.int64))
        self.block_size, self.buffer_blocks = max(1, int(block_size)), max(1, int(buffer_blocks))
        self.seed, self.epoch = int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.rows)

    def order(self) -> np.ndarray:
        rng = np.random.default_rng((self.seed, self.epoch))
        blocks = [self.rows[i:i + self.block_size] for i in range(0, len(self.rows), self.block_size)]
        blocks = [blocks[i] for i in rng.permutation(len(blocks))]
        out = []
        for i in range(0, len(blocks), self.buffer_blocks):
            buf = np.concatenate(blocks[i:i + self.buffer_blocks])
            out.append(buf[rng.permutation(len(buf))])
        return np.concatenate(out) if out else self.rows[:0]

    def __iter__(self) -> Iterator[int]:
        return iter(self.order().tolist())
