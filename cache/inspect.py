"""`distill info FEATURES.h5`: what a feature cache holds, in words a user can act on."""
from __future__ import annotations

import os

import h5py
import numpy as np

from . import h5_writer as W
from .schema import CacheError, attrs_to_dict, check_root


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def info(path: str, max_keys: int = 3) -> str:
    """Format, rows, a sample of keys, views, bad samples, and per teacher spec/dim/views/dtype/done/skipped."""
    if not os.path.isfile(path):
        raise CacheError(f"{path} not found")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise CacheError(f"{path} is not a readable HDF5 file ({e})") from e
    with f:
        check_root(f, path)
        n = int(f.attrs["num_rows"])
        keys = f["keys"].asstr()
        shown = keys[:max_keys].tolist() + (["...", keys[n - 1]] if n > max_keys else [])
        lines = [
            f"{path}: {f.attrs['format']} version {int(f.attrs['version'])} ({f.attrs.get('created_by', '?')})",
            f"rows: {n}    size on disk: {_size(os.path.getsize(path))}",
            f"corpus: {f.attrs.get('corpus_source', '?')}  fingerprint {str(f.attrs['corpus_fingerprint'])[:16]}",
            f"keys: {', '.join(shown)}",
        ]
        if "views/params" in f:
            p = f["views/params"]
            lines.append(f"views: {p.shape[1]} per image (seed {int(p.attrs.get('seed', 0))}), stored in /views/params")
        else:
            lines.append("views: none (each teacher's own eval transform)")
        bad = W.read_bad(f)
        bad_mask = np.zeros(n, dtype=bool)
        bad_mask[list(bad)] = True
        lines.append(f"bad samples: {len(bad)}")
        if bad:
            bkeys = f["bad/keys"].asstr()[:3].tolist()
            for k, r in zip(bkeys, [bad[int(r)] for r in f["bad/rows"][:3]]):
                lines.append(f"  {k}: {r}")
        teachers = f["teachers"]
        lines.append(f"teachers: {len(teachers)}")
        for name, g in teachers.items():
            a = attrs_to_dict(g.attrs)
            done = g["done"][:]
            skipped = int((bad_mask & ~done).sum())
            status = "complete" if (done | bad_mask).all() else "incomplete"
            lines.append(f"  {name}: {a.get('spec')}")
            lines.append(f"    dim {a.get('embed_dim')}, views {a.get('views', 0)}, dtype {g['image'].dtype}, "
                         f"done {int(done.sum())}/{n}, skipped {skipped}, {status}, "
                         f"stats {'yes' if 'stats' in g else 'no'}")
            lines.append(f"    image_size {a.get('image_size')}, context_length {a.get('context_length')}, "
                         f"logit_scale {float(a.get('logit_scale', float('nan'))):.4g}")
    pending = W.pending_teachers(path)
    if pending:
        counts = ", ".join(f"{t} ({len(W.list_parts(path, t))} chunk(s))" for t in pending)
        lines.append(f"pending: committed chunks not yet folded in for {counts}; rerun the same `distill cache` "
                     "command to fold them in")
    return "\n".join(lines)
