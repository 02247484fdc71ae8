"""A small synthetic image-caption corpus the project generates itself (demo, tests, benchmarks).

Captions describe what is drawn (shape, colour, position, a pseudo-modality), so a student can actually learn
to match them: the demo's and tests' losses fall for a reason, not by chance.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (230, 210, 40),
    "white": (240, 240, 240),
}
SHAPES = ("circle", "square", "triangle", "cross")
SCAN_TYPES = {"ct": (20, 20, 20), "mri": (60, 40, 80), "ultrasound": (90, 80, 60)}
POSITIONS = ("upper left", "upper right", "lower left", "lower right", "centre")


def _draw(shape: str, colour: tuple, bg: tuple, pos: str, size: int, rng: random.Random) -> Image.Image:
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    r = size // 5 + rng.randint(-2, 2)
    cx, cy = {
        "upper left": (size // 4, size // 4),
        "upper right": (3 * size // 4, size // 4),
        "lower left": (size // 4, 3 * size // 4),
        "lower right": (3 * size // 4, 3 * size // 4),
        "centre": (size // 2, size // 2),
    }[pos]
    cx += rng.randint(-2, 2)
    cy += rng.randint(-2, 2)
    if shape == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif shape == "square":
        d.rectangle((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    else:
        w = max(2, r // 3)
        d.rectangle((cx - r, cy - w, cx + r, cy + w), fill=colour)
        d.rectangle((cx - w, cy - r, cx + w, cy + r), fill=colour)
    return img


def make_synthetic_corpus(
    out_dir: str | Path, n: int = 64, image_size: int = 48, seed: int = 0, fmt: str = "csv"
) -> Path:
    """Write `n` PNG images and `corpus.csv` (or `.jsonl`/`.tsv`) with columns image, caption, key."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        modality, pos = rng.choice(list(SCAN_TYPES)), rng.choice(POSITIONS)
        img = _draw(shape, COLOURS[colour], SCAN_TYPES[modality], pos, image_size, rng)
        rel = f"images/{i:05d}.png"
        img.save(out / rel)
        rows.append(
            {"image": rel, "caption": f"{modality} image of a {colour} {shape} in the {pos}", "key": f"syn-{i:05d}"}
        )
    if fmt == "jsonl":
        path = out / "corpus.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        path = out / ("corpus.tsv" if fmt == "tsv" else "corpus.csv")
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["image", "caption", "key"], delimiter="\t" if fmt == "tsv" else ",")
            w.writeheader()
            w.writerows(rows)
    return path
