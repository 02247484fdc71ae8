"""What `distill cache` is asked to do (`CacheJob`, validated before anything is opened) and what it did.

`CacheJob` is the public, flat form (the CLI's flags); the builder's helpers take only the parts they read:
`Storage` (how features are stored) and `EmbedCfg` (how the pass over the rows runs).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from .image_decode import DEFAULT_MAX_PIXELS
from .schema import CacheError, storage_dtype


@dataclass(frozen=True)
class CacheJob:
    data: str                      # corpus path: CSV/TSV/JSONL file, folder of .tar shards, or brace pattern
    teachers: dict[str, str]       # NAME -> SPEC (resolved with teachers.load_teacher)
    out: str                       # FEATURES.h5
    batch_size: int | str = "auto"  # rows per forward pass; auto: from the device (`loader_sizes`)
    num_workers: int | str = "auto" # images decoded in DataLoader workers; auto: from the device and cores
    device: str = "auto"           # cpu | cuda | auto
    dtype: str = "float16"         # float16 | float32 storage
    views: int = 0                 # K augmented views per image (0: each teacher's own eval transform)
    on_bad_sample: str = "skip"    # skip | fail
    seed: int = 0                  # view parameters are drawn from this
    chunk_rows: int = 512          # rows per committed part: a kill loses at most two chunks per process
    h5_chunk_rows: int = 256       # HDF5 chunk length along rows (reader I/O granularity)
    retry_bad: bool = False        # also retry rows already recorded as bad (e.g. after fixing image files)
    progress: bool = True          # tqdm bars on the main process
    max_pixels: int = DEFAULT_MAX_PIXELS  # width x height over which an image is a bad sample, never decoded (0: PIL's)

    @property
    def storage(self) -> "Storage":
        return Storage(self.out, self.dtype, self.views, self.h5_chunk_rows)

    def embedding(self, device: str = "cpu", local_procs: int = 1) -> "EmbedCfg":
        """How the pass runs on `device` (the resolved one) with `local_procs` processes on this machine: `auto`
        sizes chosen by `loader_sizes`."""
        batch, workers = loader_sizes(device, local_procs)
        return EmbedCfg(batch if self.batch_size == "auto" else int(self.batch_size),
                        workers if self.num_workers == "auto" else int(self.num_workers),
                        self.on_bad_sample, self.max_pixels, self.progress)

    def check(self) -> None:
        if not self.teachers:
            raise CacheError("no teacher given; pass at least one --teacher NAME=SPEC")
        for name in self.teachers:
            if not name or "/" in name or name.startswith("."):
                raise CacheError(f"teacher name {name!r} is not valid: use letters, digits, '-' or '_'")
        if self.on_bad_sample not in ("skip", "fail"):
            raise CacheError(f"on_bad_sample={self.on_bad_sample!r}; use 'skip' or 'fail'")
        storage_dtype(self.dtype)
        for key, low in (("batch_size", 1), ("num_workers", 0)):
            v = getattr(self, key)
            if v != "auto" and (isinstance(v, bool) or not isinstance(v, int) or v < low):
                raise CacheError(f"{key}={v!r}; use an integer >= {low} or 'auto' (chosen from the device)")
        if self.views < 0 or self.chunk_rows < 1:
            raise CacheError("views must be >= 0 and chunk_rows >= 1")
        if self.max_pixels < 0:
            raise CacheError(f"max_pixels={self.max_pixels}; use a positive pixel count (0: PIL's own limit)")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise CacheError(f"device {self.device!r}; use cpu, cuda or auto")


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def loader_sizes(device: str, local_procs: int = 1) -> tuple[int, int]:
    """(batch size, decoding workers) that keep `device` busy: on CUDA a GPU embeds 256 rows faster than one
    core decodes them, so up to 8 workers per process (never more than its share of the usable cores when
    `local_procs` processes share the machine); on CPU the forward passes compete with the workers for cores,
    so the old 64 and 2."""
    if device.startswith("cuda"):
        return 256, max(1, min(8, usable_cores() // max(1, local_procs)))
    return 64, 2


@dataclass(frozen=True)
class Storage:
    """How teacher features are stored in `out` (what a teacher's group and its parts must agree on)."""

    out: str
    dtype: str
    views: int
    h5_chunk_rows: int


@dataclass(frozen=True)
class EmbedCfg:
    """How the pass over the rows runs: batches, decoding workers, bad samples, progress bars."""

    batch_size: int
    num_workers: int
    on_bad_sample: str
    max_pixels: int
    progress: bool


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
