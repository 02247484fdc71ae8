"""Helpers the test files share for making corpus variants (imported by module name, like train_fixtures)."""

from __future__ import annotations

import csv
from pathlib import Path


def copy_corpus(src: Path, dst: Path, edit=None) -> Path:
    """`src` with absolute image paths (and `edit` applied to its rows), written to `dst`."""
    with open(src, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["image"] = str(src.parent / r["image"])
    if edit:
        edit(rows)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(dst, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "caption", "key"])
        w.writeheader()
        w.writerows(rows)
    return dst
