"""What the benchmarks share: flags from a frozen dataclass, the machine's description, interleaved timing, the
synthetic JPEG corpus, result files.

Where results go: `--out DIR` (default $BIOMED_DISTILL_BENCH_OUT, else `bench-out/` in the working directory);
the committed figures in `benchmarks/results/` change only with `--record` (`Output`, `output_dir`).

Why interleaved: on a shared machine the load drifts over minutes, so timing A for a while and then B puts the
drift into B / A. `interleave` runs A B A B ... and reports per-repeat ratios (median, min, max) with the 1-minute
load average before each repeat, so a reader can see how much the machine moved.

Why no argparse: the project's rule is that only distill/cli.py imports it; a benchmark's flags are a frozen
dataclass of defaults (each field commented), and `--name value` / `--name=value` / `--flag` / `--no-flag`
override them with type checks (a tuple flag takes comma-separated values and may be repeated), like
`Config.from_argv` does for training.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as _dt
import difflib
import inspect
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, get_type_hints

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

OUT_ENV = "BIOMED_DISTILL_BENCH_OUT"  # where runs write NAME.json / NAME.md when --out is not given
DEFAULT_OUT = "bench-out"
RECORDED_DIR = Path(__file__).resolve().parent / "results"  # the committed figures the README quotes
T = TypeVar("T", bound="DataclassInstance")  # a Flags class: a (frozen) dataclass


@dataclass(frozen=True)
class Output:
    """The output flags of every benchmark that writes NAME.json / NAME.md (its Flags class derives from this)."""

    out: str = ""  # folder for NAME.json and NAME.md (default $BIOMED_DISTILL_BENCH_OUT, else bench-out)
    record: bool = False  # write to benchmarks/results/ instead: the committed figures the README quotes


def output_dir(flags: Output, env: Mapping[str, str] | None = None) -> Path:
    """The folder a run writes its results to; benchmarks/results/ only with --record (a run that was not meant
    to replace the committed figures never does, even with the environment variable pointing there)."""
    env = os.environ if env is None else env
    if flags.record:
        if flags.out:
            raise SystemExit("--record writes to benchmarks/results/; give --out or --record, not both")
        return RECORDED_DIR
    folder = Path(flags.out or env.get(OUT_ENV) or DEFAULT_OUT)
    if folder.resolve() == RECORDED_DIR:
        raise SystemExit(f"{folder} holds the committed figures; pass --record to replace them")
    return folder


def json_copy_path(path: str, flags: Output) -> str:
    """A script's `--json PATH` (an extra copy of its figures), refused inside benchmarks/results/ without
    --record, as `output_dir` refuses the folder."""
    if path and not flags.record and Path(path).resolve().parent == RECORDED_DIR:
        raise SystemExit(f"--json {path}: benchmarks/results/ holds the committed figures; pass --record")
    return path


# -- flags ------------------------------------------------------------------------------------------------
def _convert(raw: str, tp: Any, name: str) -> Any:
    try:
        if tp is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if tp is int:
            return int(float(raw)) if "e" in raw.lower() else int(raw)
        if tp is float:
            return float(raw)
        if tp is str:
            return raw
        if tp == tuple[int, ...]:
            return tuple(int(x) for x in raw.split(",") if x.strip())
        if tp == tuple[str, ...]:
            return tuple(x.strip() for x in raw.split(",") if x.strip())
        if tp == (str | None):
            return None if raw.lower() in ("none", "null", "") else raw
    except ValueError:
        raise SystemExit(f"--{name.replace('_', '-')}: {raw!r} is not a valid {getattr(tp, '__name__', tp)}") from None
    raise TypeError(f"flag {name} has unsupported type {tp}")  # pragma: no cover - a bug in a Flags class


def _field_comments(cls: type) -> dict[str, str]:
    """Each field's trailing `# comment` in the Flags class source and its bases' (what --help shows beside the
    default)."""
    lines: list[str] = []
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            try:
                lines += inspect.getsource(klass).splitlines()
            except (OSError, TypeError):
                pass
    out, last = {}, None
    for line in lines:
        m = re.match(r"\s+(\w+):[^#]*#\s*(.*)", line)
        if m:
            last, out[m.group(1)] = m.group(1), m.group(2)
        elif last and re.match(r"\s+#\s*(.*)", line):  # a continuation comment line
            out[last] += " " + line.strip().lstrip("#").strip()
        else:
            last = None
    return out


def parse_flags(cls: type[T], argv: Sequence[str] | None = None, doc: str = "") -> T:
    """`cls` (a frozen dataclass) with `--field-name value` overrides; `--help` lists fields and defaults."""
    argv = list(sys.argv[1:] if argv is None else argv)
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if "-h" in argv or "--help" in argv:
        print(doc.strip() + "\n\nflags (default):")
        notes = _field_comments(cls)
        for f in fields.values():
            print(f"  --{f.name.replace('_', '-'):<22} {f.default!r:<20} {notes.get(f.name, '')}".rstrip())
        raise SystemExit(0)
    values: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        a = argv[i]
        if not a.startswith("--"):
            raise SystemExit(f"unexpected argument {a!r}; flags look like --name value (see --help)")
        key, eq, raw = a[2:].partition("=")
        name = key.replace("-", "_")
        negated = name.startswith("no_") and name[3:] in fields and hints[name[3:]] is bool
        if negated:
            values[name[3:]] = False
            i += 1
            continue
        if name not in fields:
            close = difflib.get_close_matches(name, list(fields), n=2)
            hint = f"; did you mean --{close[0].replace('_', '-')}?" if close else ""
            raise SystemExit(f"unknown flag --{key}{hint} (see --help)")
        if not eq and hints[name] is bool and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
            values[name] = True
            i += 1
            continue
        if not eq:
            if i + 1 == len(argv):
                raise SystemExit(f"--{key} needs a value")
            raw, i = argv[i + 1], i + 1
        value = _convert(raw, hints[name], name)
        if name in values and isinstance(value, tuple):  # a repeated tuple flag adds to it (--task a --task b)
            value = values[name] + value
        values[name] = value
        i += 1
    flags = cls(**values)
    if isinstance(flags, Output):  # refuse a bad --out/--record/--json now, not after minutes of measuring
        output_dir(flags)
        json_copy_path(str(getattr(flags, "json", "") or ""), flags)
    return flags


# -- machine and timing -----------------------------------------------------------------------------------
def machine() -> dict:
    """What the figures were measured on, for the results file and README."""
    import torch  # noqa: PLC0415 (lazy: --help and flag errors answer without torch)

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "load_avg_1m": load_avg(),
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds, result) of one call."""
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def load_avg() -> float | None:
    """The 1-minute load average (None where the OS has none)."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


@dataclass(frozen=True)
class Spread:
    """Median and range of repeated measurements (a ratio's, or one variant's seconds)."""

    median: float
    lo: float
    hi: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        return cls(statistics.median(values), min(values), max(values), len(values))

    def text(self, digits: int = 3) -> str:
        return f"{self.median:.{digits}f} [{self.lo:.{digits}f}, {self.hi:.{digits}f}]"


@dataclass(frozen=True)
class Interleaved:
    """Per variant, one figure per repeat (in run order A B A B ...), and the load before each repeat and after."""

    samples: dict[str, list[float]]
    load: list[float | None]

    def stats(self, name: str) -> Spread:
        return Spread.of(self.samples[name])

    def ratio(self, a: str, b: str) -> Spread:
        """a / b within each repeat (the two ran back to back), then median and range over repeats."""
        return Spread.of([x / y for x, y in zip(self.samples[a], self.samples[b])])

    def as_dict(self) -> dict:
        return {
            "samples": self.samples,
            "load_avg_1m": self.load,
            "stats": {k: dataclasses.asdict(self.stats(k)) for k in self.samples},
        }


def interleave(variants: dict[str, Callable[[], float]], repeats: int, label: str = "") -> Interleaved:
    """Run every variant once per repeat, in order (A B A B ...); each callable returns its figure (seconds)."""
    samples: dict[str, list[float]] = {k: [] for k in variants}
    loads = []
    for r in range(repeats):
        loads.append(load_avg())
        for name, fn in variants.items():
            samples[name].append(float(fn()))
        print(
            f"{label} repeat {r + 1}/{repeats}: "
            + ", ".join(f"{k} {v[-1]:.4g}" for k, v in samples.items())
            + f" (load {loads[-1]})",
            flush=True,
        )
    loads.append(load_avg())
    return Interleaved(samples, loads)


def io_counters() -> dict[str, int]:
    """This process's /proc/self/io: rchar counts every byte read through read()/pread() (page cache or not),
    read_bytes only what came from the disk. Empty where /proc is absent (then byte ratios are not reported)."""
    try:
        return {k: int(v) for k, v in (line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())}
    except OSError:
        return {}


def drop_from_page_cache(path: Path) -> bool:
    """Evict the file's pages (no root needed): the next reads come from the disk."""
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return True


def load_into_page_cache(path: Path, step: int = 64 << 20) -> None:
    """Read the whole file once so that "warm" measurements find it in the page cache."""
    with open(path, "rb", buffering=0) as fh:
        while fh.read(step):
            pass


# -- results ----------------------------------------------------------------------------------------------
def atomic_write_text(path: Path, text: str) -> Path:
    """Write `text` to a temporary file beside `path`, then rename it over `path`: harness processes sharing a
    --workdir may write and read the same file at once, and a reader must see the old or the new text, never an
    empty or half-written file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def invocation() -> str:
    """This run's command line after `python`: `-m benchmarks.NAME ...` or `benchmarks/NAME.py ...`."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    head = f"-m {spec.name}" if spec is not None else Path(sys.argv[0]).as_posix()
    return " ".join([head, *sys.argv[1:]])


def write_results(name: str, flags: Output, results: dict, markdown: str, json_copy: str = "") -> tuple[Path, Path]:
    """NAME.json (flags, machine, results) and NAME.md (the printed table) in `output_dir(flags)`; with `json_copy`
    (a script's --json OUT) also `results` alone at that path."""
    if json_copy:
        Path(json_copy).write_text(json.dumps(results, indent=2, default=str) + "\n")
    folder = output_dir(flags)
    folder.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = {
        "benchmark": name,
        "command": invocation(),
        "flags": dataclasses.asdict(flags),
        "machine": machine(),
        "results": results,
    }
    j, m = folder / f"{name}.json", folder / f"{name}.md"
    j.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    mc = payload["machine"]
    head = (
        f"# {name}\n\n`python {payload['command']}` on {mc['date'][:10]}, {mc['cpu']}, {mc['cores']} cores, "
        f"torch threads {mc['torch_threads']}, GPU: {mc['gpu'] or 'none'}, load average {mc['load_avg_1m']}\n\n"
    )
    m.write_text(head + markdown.rstrip() + "\n")
    return j, m


def table(rows: list[list[Any]], header: list[str]) -> str:
    """A GitHub markdown table (also what the scripts print)."""

    def fmt(x: Any) -> str:
        if isinstance(x, float):
            return f"{x:,.3f}" if abs(x) < 10 else f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.1f}"
        return str(x)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)


def quiet_libraries() -> None:
    """No hub access and no per-load progress bars from transformers in benchmark output."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging  # noqa: PLC0415 (lazy: optional, and heavy)

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # transformers absent or older: only cosmetic
        pass


# -- synthetic JPEG corpus --------------------------------------------------------------------------------
def make_jpeg_corpus(out: Path, n: int, px: int, seed: int = 0) -> Path:
    """The synthetic corpus (cache.sources.synthetic) re-encoded as textured JPEGs, so decoding costs what photos do."""
    from cache.sources.synthetic import make_synthetic_corpus  # noqa: PLC0415 (lazy: the cache package imports torch)

    png_csv = make_synthetic_corpus(out, n=n, image_size=px, seed=seed)
    rng = np.random.default_rng(seed)
    with open(png_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        src = out / r["image"]
        arr = np.asarray(Image.open(src).convert("RGB"), dtype=np.int16)
        arr = np.clip(arr + rng.normal(0, 12, arr.shape), 0, 255).astype(np.uint8)  # speckle, like scans
        dst = src.with_suffix(".jpg")
        Image.fromarray(arr).save(dst, "JPEG", quality=90)
        src.unlink()
        r["image"] = str(Path(r["image"]).with_suffix(".jpg"))
    path = out / "corpus_jpeg.csv"
    write_csv(path, rows)
    png_csv.unlink()
    return path


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def head_corpus(path: Path, n: int) -> Path:
    """The first n rows of a CSV corpus beside it (same image paths): the one-batch run for the marginal cost."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))[:n]
    out = path.with_name(f"{path.stem}_head{n}.csv")
    write_csv(out, rows)
    return out


def synthetic_teacher_meta(name: str, dim: int, chunk_rows: int, **extra: object) -> dict:
    """The writer's meta for a synthetic teacher `name` of width `dim` (cache_overhead and scale_sim write the
    same datasets a real fold creates, without a model); `extra` adds keys (a fingerprint, the run)."""
    return {
        "attrs": {
            "spec": f"synthetic:{name}",
            "resolved_spec": f"synthetic:{name}",
            "embed_dim": dim,
            "logit_scale": 100.0,
            "image_size": 224,
            "mean": [0.5] * 3,
            "std": [0.5] * 3,
            "context_length": 77,
            "views": 0,
        },
        "dtype": "float16",
        "h5_chunk_rows": chunk_rows,
        **extra,
    }
