"""What `distill cache` is asked to do (`CacheJob`, validated before anything is opened) and what it did.

`CacheJob` is the public, flat form (the CLI's flags); the builder's helpers take only the parts they read:
`Storage` (how features are stored) and `EmbedCfg` (how the pass over the rows runs).
"""
from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field

from cache.sources.image_decode import DEFAULT_MAX_PIXELS
from cache.store.schema import CacheError, storage_dtype
from cache.sources.shard_io import Retry
from cache.build.views import ViewDist

# Why a default bound on token storage: a G x G grid of D-wide tokens per row and view is G*G*D times a feature
# row's dim (ViT-B/16 at G=14, 300k rows: ~90 GB per teacher), an easy typo away from filling a disk. 100 GB lets
# usual runs (G <= 7 on a few hundred thousand rows) through; --max-gb raises it, 0 lifts it.
DEFAULT_MAX_GB = 100.0
# Why a bound on bad rows: a corpus whose image paths are all wrong "succeeds" with every row skipped, and only
# training says (obscurely) that no row is usable. A few broken images in a web corpus are normal; more than half
# means a wrong folder, a wrong column or an unmounted disk. A file where every row is bad is always an error.
DEFAULT_MAX_BAD_FRACTION = 0.5


@dataclass(frozen=True)
class CacheJob:
    data: str                      # corpus: CSV/TSV/JSONL file, folder of .tar shards, brace pattern, or shard URLs
    teachers: dict[str, str]       # NAME -> SPEC (resolved with teachers.load_teacher)
    out: str                       # FEATURES.h5
    batch_size: int | str = "auto"  # rows per forward pass; auto: from the device (`loader_sizes`)
    num_workers: int | str = "auto" # images decoded in DataLoader workers; auto: from the device and cores
    device: str = "auto"           # cpu | cuda | auto
    dtype: str = "float16"         # float16 | float32 storage
    views: int = 0                 # K augmented views per image (0: each teacher's own eval transform)
    # how the views are drawn (None: as stored in the file, or cache.build.views' defaults for a new one)
    view_scale: tuple[float, float] | None = None  # crop area fraction range (default 0.5, 1)
    view_ratio: tuple[float, float] | None = None  # crop aspect ratio range (default 3/4, 4/3)
    view_flip: float | None = None  # horizontal flip probability (default 0: laterality matters)
    view_color: float | None = None  # S: brightness/contrast/saturation factors in [1-S, 1+S] (default 0: none)
    on_bad_sample: str = "skip"    # skip | fail
    seed: int = 0                  # view parameters are drawn from this
    chunk_rows: int = 512          # rows per committed part: a kill loses at most two chunks per process
    h5_chunk_rows: int = 256       # HDF5 chunk length along rows (reader I/O granularity)
    retry_bad: bool = False        # also retry rows already recorded as bad (e.g. after fixing image files)
    progress: bool = True          # tqdm bars on the main process
    max_pixels: int = DEFAULT_MAX_PIXELS  # width x height over which an image is a bad sample, never decoded (0: PIL's)
    trust_remote_code: bool = False  # let hub models run their repo's own code (recorded in each teacher's attrs)
    tokens: int = 0                # G: also store each teacher's patch tokens pooled to a G x G grid (0: none)
    max_gb: float = DEFAULT_MAX_GB  # refuse a run whose patch tokens would take more than this on disk (0: no bound)
    shard_attempts: int = 3        # streamed shards (URLs, pipe:): tries per shard before it is recorded as bad
    shard_backoff: float = 1.0     # seconds before the 2nd try, doubling after each failure (at most 60)
    max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION  # a file with a larger share of bad rows is an error

    @property
    def view_flags(self) -> dict:
        """The view distribution's fields this job names (ViewDist field -> value)."""
        given = {"scale": self.view_scale, "ratio": self.view_ratio, "flip_p": self.view_flip,
                 "color": self.view_color}
        return {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in given.items() if v is not None}

    @property
    def view_dist(self) -> ViewDist:
        """The distribution a new file's views are drawn from: the flags given, defaults for the rest."""
        return ViewDist(self.views, seed=self.seed, **self.view_flags)

    @property
    def retry(self) -> Retry:
        return Retry(self.shard_attempts, self.shard_backoff)

    @property
    def storage(self) -> "Storage":
        return Storage(self.out, self.dtype, self.views, self.h5_chunk_rows, self.tokens)

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
        if self.view_flags and not self.views:
            names = ", ".join(ViewDist.FLAGS[k] for k in self.view_flags)
            raise CacheError(f"{names} given without --views K: add --views K (or drop them)")
        problem = self.view_dist.problem() if self.views else None
        if problem:
            raise CacheError(problem)
        if self.tokens < 0 or self.max_gb < 0:
            raise CacheError(f"--tokens {self.tokens} / --max-gb {self.max_gb}: use a grid size G >= 1 (0: no "
                             f"tokens) and a size bound >= 0 GB (0: no bound)")
        if self.max_pixels < 0:
            raise CacheError(f"max_pixels={self.max_pixels}; use a positive pixel count (0: PIL's own limit)")
        if self.shard_attempts < 1 or self.shard_backoff < 0:
            raise CacheError(f"--shard-attempts {self.shard_attempts} / --shard-backoff {self.shard_backoff}: use "
                             "at least 1 attempt and a backoff >= 0 seconds")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise CacheError(f"--max-bad-fraction {self.max_bad_fraction}: use a share between 0 and 1")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise CacheError(f"device {self.device!r}; use cpu, cuda or auto")


_PATHLIKE = re.compile(r"\S*[/\\]\S*|\S+\.\w{2,5}\b|\d+(\.\d+)?")


def _reason_kind(reason: str) -> str:
    """A bad-sample reason with its paths, file names and numbers blanked: rows failing the same way group."""
    return _PATHLIKE.sub("_", reason)


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
    tokens: int = 0  # G of the pooled patch-token grid (0: no tokens)


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
    notes: list[str] = field(default_factory=list)  # e.g. streamed shards that failed, and what to do

    def bad_share_problem(self, max_fraction: float) -> str | None:
        """The error when every row, or more than `max_fraction` of them, is a bad sample: naming the commonest
        reason (paths and numbers set aside), an example and what to do; None when the share is acceptable."""
        n, bad = self.rows, len(self.bad)
        if not n or not bad or (bad < n and bad <= max_fraction * n):
            return None
        kinds = Counter(_reason_kind(r) for _, r in self.bad)
        kind, count = kinds.most_common(1)[0]
        key, reason = next((k, r) for k, r in self.bad if _reason_kind(r) == kind)
        share = "every row is" if bad == n else f"{bad} of {n} rows ({bad / n:.0%}) are"
        bound = "" if bad == n else f", more than --max-bad-fraction {max_fraction:g}"
        fix = ("check the image paths, which are read relative to the corpus file's folder" if "missing" in kind
               else "repair or drop those rows")
        return (f"{self.out}: {share} bad samples{bound}; commonest reason ({count} rows): {reason} (key "
                f"{key!r}); fix the corpus ({fix}) and rerun with --retry-bad (rows already embedded are kept; "
                f"`distill info --all-bad {self.out}` lists every bad row), or raise --max-bad-fraction")

    def __str__(self) -> str:
        lines = [f"feature cache {self.out}: {self.rows} rows, {self.elapsed_s:.1f}s"]
        for name, t in self.teachers.items():
            lines.append(f"  {name}: computed {t.computed}, done {t.done}/{self.rows}, skipped {t.skipped}")
        if self.bad:
            lines.append(f"  {len(self.bad)} bad sample(s) skipped (recorded in /bad), e.g.:")
            lines += [f"    {k}: {r}" for k, r in self.bad[:5]]
        lines += [f"  {note}" for note in self.notes]
        return "\n".join(lines)
