"""What `distill cache` is asked to do (`CacheJob`, validated when it is made, before anything is opened or torch
is imported) and what it did.

`CacheJob` is the public, flat form (the CLI's flags are made from its fields: `distill.cli`); the builder's
helpers take only the parts they read:
`Storage` (how features are stored) and `EmbedCfg` (how the pass over the rows runs).
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import BeforeValidator, Field, PlainValidator, model_validator

from cache.build.views import ViewDist
from cache.sources.image_decode import DEFAULT_MAX_PIXELS
from cache.sources.shard_io import Retry
from cache.store.schema import CacheError, storage_dtype
from teachers.kernel.config_model import Bool, ConfigError, Float, Int, Section, Str

# Why a default bound on token storage: a G x G grid of D-wide tokens per row and view is G*G*D times a feature
# row's dim (ViT-B/16 at G=14, 300k rows: ~90 GB per teacher), an easy typo away from filling a disk. 100 GB lets
# usual runs (G <= 7 on a few hundred thousand rows) through; --max-gb raises it, 0 lifts it.
DEFAULT_MAX_GB = 100.0
# Why a bound on bad rows: a corpus whose image paths are all wrong "succeeds" with every row skipped, and only
# training says (obscurely) that no row is usable. A few broken images in a web corpus are normal; more than half
# means a wrong folder, a wrong column or an unmounted disk. A file where every row is bad is always an error.
DEFAULT_MAX_BAD_FRACTION = 0.5


class CacheJobError(CacheError, ConfigError):
    """A `CacheJob` that cannot run as asked: a CacheError (what callers catch) that is also a ConfigError."""


def _fspath(v: Any) -> Any:
    return os.fspath(v) if isinstance(v, os.PathLike) else v


def _int_or_text(v: Any) -> Any:
    if isinstance(v, bool) or not isinstance(v, (int, str)):
        raise ValueError(f"must be an integer or 'auto', got {v!r}")
    return v  # the range and the word `auto` are checked by CacheJob, whose message names the flag


Path = Annotated[Str, BeforeValidator(_fspath)]  # a path: text, or an os.PathLike taken as its text
IntOrAuto = Annotated[int | str, PlainValidator(_int_or_text)]
DEVICES = ("cpu", "cuda", "auto")  # --device's choices (the API also takes cuda:N)
DTYPES = ("float16", "float32")
ON_BAD_SAMPLE = ("skip", "fail")


class CacheJob(Section):
    """What `distill cache` is asked to do; validated when it is made (`CacheJobError` naming the key or flag).

    The field descriptions are the flags' help, the defaults the flags' defaults (`distill.cli`)."""

    error = CacheJobError
    data: Path = Field(
        description="corpus: CSV/TSV/JSONL (image, caption[, key]) or WebDataset shards (a folder "
        "of .tar or a brace pattern; or streamed: file://, s3://, gs://, https:// URLs with brace "
        "ranges, or pipe:COMMAND)"
    )
    teachers: dict[Str, Str] = Field(description="NAME -> SPEC (resolved with teachers.load_teacher)")
    out: Path = Field(description="FEATURES.h5 (created, resumed or extended)")
    batch_size: IntOrAuto = Field(
        "auto", description="rows per forward pass (default auto: 256 on CUDA, 64 on CPU; the choice is logged)"
    )
    num_workers: IntOrAuto = Field(
        "auto",
        description="DataLoader workers decoding images and tokenising "
        "captions, each image decoded once for all teachers (default auto: on CUDA "
        "min(8, usable cores per process), on CPU 2)",
    )
    device: Str = Field("auto", description="cpu | cuda | cuda:N | auto")
    dtype: Str = Field("float16", description="storage dtype")
    views: Int = Field(
        0,
        description="K augmented views per image (crop box, flip, colour factors stored once "
        "with their distribution, replayed identically for every teacher and the student)",
    )
    # how the views are drawn (None: as stored in the file, or cache.build.views' defaults for a new one)
    view_scale: tuple[Float, Float] | None = Field(
        None, description="crop area fraction range of the views (default 0.5,1; an existing file: as stored)"
    )
    view_ratio: tuple[Float, Float] | None = Field(
        None, description="crop aspect ratio (width/height) range of the views (default 0.75,1.33333)"
    )
    view_flip: Float | None = Field(
        None,
        description="horizontal flip probability of the views (default 0: "
        "laterality matters in medical images; opt in only where it does not)",
    )
    view_color: Float | None = Field(
        None,
        description="photometric jitter: brightness, contrast and saturation "
        "factors each drawn in [1-S, 1+S] per view (torchvision ColorJitter; default "
        "0: none)",
    )
    on_bad_sample: Str = Field(
        "skip", description="skip (record and go on) or fail at the first unreadable image or empty caption"
    )
    seed: Int = Field(
        0, description="seed of the view parameters (a file's stored views are replayed whatever the seed)"
    )
    chunk_rows: Int = Field(
        512,
        description="rows per committed chunk (a kill loses at most two chunks per "
        "process, one embedded and one being written; chunks are dealt round-robin to the "
        "processes)",
    )
    h5_chunk_rows: Int = Field(256, description="HDF5 chunk length along rows (reader I/O granularity)")
    retry_bad: Bool = Field(False, description="retry rows recorded as bad in an earlier run")
    progress: Bool = Field(True, description="tqdm bars on the main process")
    max_pixels: Int = Field(
        DEFAULT_MAX_PIXELS,
        description="an image over N pixels (width x height, e.g. 64000000 "
        "or 64M) is recorded as a bad sample without being decoded (default 64M; 0: PIL's own "
        "limit)",
    )
    trust_remote_code: Bool = Field(
        False, description="let hub models run their repo's own code (recorded in each teacher's attrs)"
    )
    tokens: Int = Field(
        0,
        description="also store each teacher's patch tokens (last layer, after its final norm) "
        "average-pooled to a G x G grid, per view with --views, for the `spatial` loss term "
        "(default 0: none)",
    )
    max_gb: Float = Field(
        DEFAULT_MAX_GB,
        description="refuse a run whose patch tokens would take more than X GB on "
        "disk (the estimate is printed before the run; default 100; 0: no bound)",
    )
    shard_attempts: Int = Field(
        3,
        description="streamed shards: tries per shard (open or read) before it is "
        "recorded as bad and the run goes on without it (default 3; its rows stay missing: "
        "a rerun retries them)",
    )
    shard_backoff: Float = Field(
        1.0, description="streamed shards: seconds before the second try, doubled after each failure (default 1)"
    )
    max_bad_fraction: Float = Field(
        DEFAULT_MAX_BAD_FRACTION,
        description="end with an error (exit 2, naming the "
        "commonest reason) when more than this share of the rows are bad samples, or "
        "every row is (default 0.5; the rows embedded are kept either way)",
    )

    @property
    def view_flags(self) -> dict:
        """The view distribution's fields this job names (ViewDist field -> value)."""
        given = {"scale": self.view_scale, "ratio": self.view_ratio, "flip_p": self.view_flip, "color": self.view_color}
        return {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in given.items() if v is not None}

    @property
    def view_dist(self) -> ViewDist:
        """The distribution a new file's views are drawn from: the flags given, defaults for the rest."""
        return ViewDist(self.views, seed=self.seed, **self.view_flags)

    @property
    def retry(self) -> Retry:
        return Retry(self.shard_attempts, self.shard_backoff)

    @property
    def storage(self) -> Storage:
        return Storage(self.out, self.dtype, self.views, self.h5_chunk_rows, self.tokens)

    def embedding(self, device: str = "cpu", local_procs: int = 1) -> EmbedCfg:
        """How the pass runs on `device` (the resolved one) with `local_procs` processes on this machine: `auto`
        sizes chosen by `loader_sizes`."""
        batch, workers = loader_sizes(device, local_procs)
        return EmbedCfg(
            batch if self.batch_size == "auto" else int(self.batch_size),
            workers if self.num_workers == "auto" else int(self.num_workers),
            self.on_bad_sample,
            self.max_pixels,
            self.progress,
        )

    @model_validator(mode="after")
    def _check(self) -> CacheJob:
        """The job's own rules, each message naming the flag (the field types are pydantic's)."""
        if not self.teachers:
            raise ValueError("no teacher given; pass at least one --teacher NAME=SPEC")
        for name in self.teachers:
            if not name or "/" in name or name.startswith("."):
                raise ValueError(f"teacher name {name!r} is not valid: use letters, digits, '-' or '_'")
        if self.on_bad_sample not in ON_BAD_SAMPLE:
            raise ValueError(f"on_bad_sample={self.on_bad_sample!r}; use 'skip' or 'fail'")
        try:
            storage_dtype(self.dtype)
        except CacheError as e:
            raise ValueError(str(e)) from None
        for key, low in (("batch_size", 1), ("num_workers", 0)):
            v = getattr(self, key)
            if v != "auto" and (not isinstance(v, int) or v < low):
                raise ValueError(f"{key}={v!r}; use an integer >= {low} or 'auto' (chosen from the device)")
        if self.views < 0 or self.chunk_rows < 1:
            raise ValueError("views must be >= 0 and chunk_rows >= 1")
        if self.h5_chunk_rows < 1:
            raise ValueError(f"h5_chunk_rows={self.h5_chunk_rows}; use a chunk length >= 1")
        if self.view_flags and not self.views:
            names = ", ".join(ViewDist.FLAGS[k] for k in self.view_flags)
            raise ValueError(f"{names} given without --views K: add --views K (or drop them)")
        problem = self.view_dist.problem() if self.views else None
        if problem:
            raise ValueError(problem)
        if self.tokens < 0 or self.max_gb < 0:
            raise ValueError(
                f"--tokens {self.tokens} / --max-gb {self.max_gb}: use a grid size G >= 1 (0: no "
                f"tokens) and a size bound >= 0 GB (0: no bound)"
            )
        if self.max_pixels < 0:
            raise ValueError(f"max_pixels={self.max_pixels}; use a positive pixel count (0: PIL's own limit)")
        if self.shard_attempts < 1 or self.shard_backoff < 0:
            raise ValueError(
                f"--shard-attempts {self.shard_attempts} / --shard-backoff {self.shard_backoff}: use "
                "at least 1 attempt and a backoff >= 0 seconds"
            )
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"--max-bad-fraction {self.max_bad_fraction}: use a share between 0 and 1")
        if self.device not in DEVICES and not self.device.startswith("cuda:"):
            raise ValueError(f"device {self.device!r}; use cpu, cuda or auto")
        return self


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
    computed: int  # rows embedded by this run
    done: int  # rows done in the file
    skipped: int  # rows recorded as bad samples and not done


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
        fix = (
            "check the image paths, which are read relative to the corpus file's folder"
            if "missing" in kind
            else "repair or drop those rows"
        )
        return (
            f"{self.out}: {share} bad samples{bound}; commonest reason ({count} rows): {reason} (key "
            f"{key!r}); fix the corpus ({fix}) and rerun with --retry-bad (rows already embedded are kept; "
            f"`distill info --all-bad {self.out}` lists every bad row), or raise --max-bad-fraction"
        )

    def __str__(self) -> str:
        lines = [f"feature cache {self.out}: {self.rows} rows, {self.elapsed_s:.1f}s"]
        for name, t in self.teachers.items():
            lines.append(f"  {name}: computed {t.computed}, done {t.done}/{self.rows}, skipped {t.skipped}")
        if self.bad:
            lines.append(f"  {len(self.bad)} bad sample(s) skipped (recorded in /bad), e.g.:")
            lines += [f"    {k}: {r}" for k, r in self.bad[:5]]
        lines += [f"  {note}" for note in self.notes]
        return "\n".join(lines)
