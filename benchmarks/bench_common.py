"""What both benchmarks share: flags from a frozen dataclass, the machine's description, timing, result files.

Why no argparse: the project's rule is that only distill/cli.py imports it; a benchmark's flags are a frozen
dataclass of defaults (each field commented), and `--name value` / `--name=value` / `--flag` / `--no-flag`
override them with type checks (a tuple flag takes comma-separated values and may be repeated), like
`Config.from_argv` does for training.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import difflib
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar, get_type_hints

RESULTS_DIR = Path(__file__).resolve().parent / "results"
T = TypeVar("T")


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
        raise SystemExit(f"--{name.replace('_', '-')}: {raw!r} is not a valid {getattr(tp, '__name__', tp)}")
    raise TypeError(f"flag {name} has unsupported type {tp}")  # pragma: no cover - a bug in a Flags class


def _field_comments(cls: type) -> dict[str, str]:
    """Each field's trailing `# comment` in the Flags class source (what --help shows beside the default)."""
    import inspect
    import re

    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
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
    return cls(**values)


# -- machine and timing -----------------------------------------------------------------------------------
def machine() -> dict:
    """What the figures were measured on, for the results file and README."""
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": gpu,
            "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
            "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds")}


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds, result) of one call."""
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def io_counters() -> dict[str, int]:
    """This process's /proc/self/io: rchar counts every byte read through read()/pread() (page cache or not),
    read_bytes only what came from the disk. Empty where /proc is absent (then byte ratios are not reported)."""
    try:
        return {k: int(v) for k, v in (line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())}
    except OSError:
        return {}


# -- results ----------------------------------------------------------------------------------------------
def write_results(name: str, flags: Any, results: dict, markdown: str) -> tuple[Path, Path]:
    """benchmarks/results/NAME.json (flags, machine, results) and NAME.md (the printed table)."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
               "flags": dataclasses.asdict(flags), "machine": machine(), "results": results}
    j, m = RESULTS_DIR / f"{name}.json", RESULTS_DIR / f"{name}.md"
    j.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    mc = payload["machine"]
    head = (f"# {name}\n\n`python {payload['command']}` on {mc['date'][:10]}, {mc['cpu']}, {mc['cores']} cores, "
            f"torch threads {mc['torch_threads']}, GPU: {mc['gpu'] or 'none'}, load average {mc['load_avg_1m']}\n\n")
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
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # transformers absent or older: only cosmetic
        pass
