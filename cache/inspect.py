"""`distill info FEATURES.h5`: what a feature cache holds, in words a user can act on."""

from __future__ import annotations

import os
import re

import h5py
import numpy as np

import cache.store.layout as L
import cache.store.writer as W
from cache.build.views import read_view_dist
from cache.store.schema import CacheError, attrs_to_dict, check_root, virtual_sources
from cache.store.segments import segment_dir
from cache.store.shard_record import record_lines
from cache.store.verify import raise_damaged
from teachers.kernel.modality import Modality

_TRUNCATED = re.compile(r"truncated file: eof = (\d+).*stored_eof = (\d+)")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def info(path: str, max_keys: int = 3, all_bad: bool = False) -> str:
    """Format, rows, a sample of keys, views, bad samples (the first 3, or all), and per teacher
    spec/dim/views/dtype/done/skipped; a teacher whose segment file is missing or truncated is "damaged"."""
    return describe_cache(path, max_keys, all_bad)[0]


def describe_cache(path: str, max_keys: int = 3, all_bad: bool = False) -> tuple[str, dict[str, str]]:
    """`info`'s text and the damaged segment files it found (`segment_problems`), each file opened once."""
    if not os.path.isfile(path):
        raise CacheError(f"{path} not found")
    try:
        problems = segment_problems(path)
        lines = _describe(path, max_keys, all_bad, problems)
    except OSError as e:  # truncated, overwritten or not HDF5 at all: opening or any read can fail
        raise_damaged(path, e)
    lines += _pending(path)
    lines += record_lines(path, limit=10)  # streamed shards that failed (FEATURES.h5.shards.json)
    return "\n".join(lines), problems


def _pending(path: str) -> list[str]:
    """What a killed (or running) `distill cache` left beside the file, and that rerunning resumes it."""
    pending = W.pending_teachers(path)
    with_parts = {t: len(W.list_parts(path, t)) for t in pending}
    lines = []
    if any(with_parts.values()):
        counts = ", ".join(f"{t} ({c} chunk(s))" for t, c in with_parts.items() if c)
        lines.append(
            f"pending: committed chunks not yet folded in for {counts}; rerun the same `distill cache` "
            "command to fold them in and finish"
        )
    started = [t for t, c in with_parts.items() if not c]
    if started:
        lock = os.path.exists(path + ".lock")
        lines.append(
            f"pending: a `distill cache` run for {', '.join(started)} started but committed no chunk yet "
            f"({'it may still be running, or was ' if lock else 'it was '}interrupted before its first "
            "commit); rerun the same command to resume (nothing committed was lost)"
        )
    return lines


def _folder_bytes(path: str) -> int:
    """Bytes of the files in the cache's segment folder (format 2: the features; sparse files count their
    allocated blocks)."""
    folder = segment_dir(path)
    if not os.path.isdir(folder):
        return 0
    stats = [os.stat(os.path.join(folder, n)) for n in os.listdir(folder)]
    return sum(min(s.st_size, getattr(s, "st_blocks", s.st_size // 512 + 1) * 512) for s in stats)


def _segments_line(f, path: str) -> str:
    """Where a format-2 file's features are: its segment folder and how many segment files it maps."""
    files = {n for n in virtual_sources(f) if "-rank-" in n}
    if not files:
        return ""
    return f" (features in {len(files)} segment file(s) in {os.path.basename(segment_dir(path))}/)"


def segment_problems(path: str) -> dict[str, str]:
    """{segment file name (as mapped): what is wrong} for each mapped file that is missing, shorter than its own
    header says it must be (truncated: HDF5 would read the lost rows as NaN without a word), or not HDF5."""
    base = os.path.dirname(os.path.abspath(path))
    with h5py.File(path, "r") as f:
        names = sorted(virtual_sources(f))
    out = {}
    for name in names:
        p = os.path.join(base, name)
        if not os.path.isfile(p):
            out[name] = "missing"
            continue
        try:
            h5py.File(p, "r").close()
        except OSError as e:
            if getattr(e, "errno", None) is not None:
                raise  # permission and the like: the file may be fine
            cut = _TRUNCATED.search(str(e))
            out[name] = (
                f"truncated: {_size(int(cut.group(1)))} of the {_size(int(cut.group(2)))} its mapping "
                f"needs ({int(cut.group(1)) / max(1, int(cut.group(2))):.0%})"
                if cut
                else f"unreadable ({str(e).splitlines()[0]})"
            )
    return out


def check_segments(path: str, problems: dict[str, str]) -> None:
    """Raise CacheError naming the damaged segment files of `path` (`segment_problems`) and what to do."""
    if problems:
        first, why = next(iter(problems.items()))
        raise CacheError(
            f"{path}: {len(problems)} segment file(s) damaged, e.g. {first}: {why}; their rows cannot "
            f"be read: restore the file and its folder from a backup, or rebuild it with `distill "
            f"cache` (same --data, --teacher and --out after moving it away)"
        )


def _teacher_damage(g, problems: dict[str, str]) -> list[str]:
    """The damaged segment files a teacher's datasets map."""
    found: set[str] = set()
    for ds in g.values():
        if isinstance(ds, h5py.Dataset) and ds.is_virtual:
            plist = ds.id.get_create_plist()
            found.update(
                n for i in range(plist.get_virtual_count()) if (n := plist.get_virtual_filename(i)) in problems
            )
    return sorted(found)


def _describe(path: str, max_keys: int, all_bad: bool, problems: dict[str, str]) -> list[str]:
    with h5py.File(path, "r") as f:
        check_root(f, path)
        n = int(f.attrs[L.Root.NUM_ROWS])
        keys = f[L.KEYS].asstr()
        shown = keys[:max_keys].tolist() + (["...", keys[n - 1]] if n > max_keys else [])
        lines = [
            f"{path}: {f.attrs[L.Root.FORMAT]} version {int(f.attrs[L.Root.VERSION])} "
            f"({f.attrs.get(L.Root.CREATED_BY, '?')})",
            f"rows: {n}    size on disk: {_size(os.path.getsize(path) + _folder_bytes(path))}{_segments_line(f, path)}",
            f"corpus: {f.attrs.get(L.Root.SOURCE, '?')}  fingerprint {str(f.attrs[L.Root.FINGERPRINT])[:16]}",
            f"keys: {', '.join(shown)}",
        ]
        dist = read_view_dist(f)
        if dist is not None:
            lines.append(
                f"views: {dist.describe()}; stored in /{L.VIEW_PARAMS} "
                f"({', '.join(L.VIEW_COLUMNS[: f[L.VIEW_PARAMS].shape[2]])})"
            )
        else:
            lines.append("views: none (each teacher's own eval transform)")
        bad = W.read_bad(f)
        bad_mask = np.zeros(n, dtype=bool)
        bad_mask[list(bad)] = True
        lines.append(f"bad samples: {len(bad)}")
        if bad:
            shown = len(bad) if all_bad else 3
            bkeys = f[L.BAD_KEYS].asstr()[:shown].tolist()
            for k, r in zip(bkeys, [bad[int(r)] for r in f[L.BAD_ROWS][:shown]]):
                lines.append(f"  {k}: {r}")
            if len(bad) > shown:
                lines.append(f"  ... {len(bad) - shown} more: `distill info --all-bad {path}` lists them all")
        teachers = f[L.TEACHERS]
        lines.append(f"teachers: {len(teachers)}")
        for name, g in teachers.items():
            a = attrs_to_dict(g.attrs)
            done = g[L.DONE][:]
            skipped = int((bad_mask & ~done).sum())
            damaged = _teacher_damage(g, problems)
            status = (
                "DAMAGED (segment " + ", ".join(damaged) + f": {problems[damaged[0]]})"
                if damaged
                else "complete"
                if (done | bad_mask).all()
                else "incomplete"
            )
            lines.append(f"  {name}: {a.get('spec')}")
            lines.append(
                f"    dim {a.get('embed_dim')}, views {a.get('views', 0)}, dtype {g[Modality.IMAGE].dtype}, "
                f"done {int(done.sum())}/{n}, skipped {skipped}, {status}, "
                f"stats {'yes' if L.STATS in g else 'no'}"
            )
            lines.append(
                f"    image_size {a.get('image_size')}, context_length {a.get('context_length')}, "
                f"logit_scale {float(a.get('logit_scale', float('nan'))):.4g}"
            )
            if L.TOKENS in g:  # --tokens G: the pooled patch-token grid
                grid, tok = int(a.get("tokens", 0)), g[L.TOKENS]
                stored = tok.size * tok.dtype.itemsize if tok.is_virtual else tok.id.get_storage_size()
                lines.append(
                    f"    patch tokens: {grid} x {grid} grid, {tok.shape[-1]}-wide, shape {tok.shape}, "
                    f"{_size(stored)} on disk, in /{L.tokens(name)}"
                )
    return lines
