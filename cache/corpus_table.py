"""CSV, TSV and JSONL corpora: one row per pair, columns `image`, `caption` and optional `key`.

Other columns are kept as text and read with `column(name)` (e.g. a `domain` column for teacher routing).

Image paths are relative to the table's folder unless absolute. Malformed tables (a missing column, an empty
image path, a duplicate key) are refused at open time with the file and row named, before any model runs.
"""
from __future__ import annotations

import csv
import json
import os

from PIL import Image

from .corpus import Corpus, CorpusError, decode_image


class TableCorpus(Corpus):
    """A CSV/TSV/JSONL table of (image, caption[, key]) rows."""

    def __init__(self, path: str):
        self.source = path
        if not os.path.isfile(path):
            raise CorpusError(f"corpus file {path} not found")
        self.root = os.path.dirname(os.path.abspath(path))
        self._fingerprint = None
        self.images: list[str] = []
        self.keys = []
        self.captions = []
        self._lines: list[int] = []
        self._extra: dict[str, list[str]] = {}  # other columns, as text ("" where a row lacks the cell)
        rows = self._read_jsonl(path) if path.lower().endswith(".jsonl") else self._read_delimited(path)
        seen: dict[str, int] = {}
        for n, (line, row) in enumerate(rows, start=1):
            image = row.get("image")
            if image is None or not str(image).strip():
                raise CorpusError(f"{path} row {n} (line {line}): empty 'image' value")
            caption = row.get("caption")
            caption = "" if caption is None else str(caption)
            key = row.get("key")
            key = str(image) if key is None or str(key) == "" else str(key)
            if key in seen:
                raise CorpusError(f"{path} row {n} (line {line}): duplicate key {key!r}, first used on row "
                                  f"{seen[key]}; keys must be unique (add or fix the 'key' column)")
            seen[key] = n
            self.images.append(str(image))
            self.captions.append(caption)
            self.keys.append(key)
            self._lines.append(line)
            for col, value in row.items():
                if col in ("image", "caption", "key"):
                    continue
                cells = self._extra.get(col)
                if cells is None:
                    cells = self._extra[col] = [""] * (n - 1)
                cells.append(_cell(value))
            for cells in self._extra.values():
                if len(cells) < n:  # a JSONL row without this column
                    cells.append("")
        if not self.keys:
            raise CorpusError(f"{path}: no rows")

    @staticmethod
    def _check_columns(path: str, columns, where: str) -> None:
        missing = [c for c in ("image", "caption") if c not in columns]
        if missing:
            raise CorpusError(f"{path}{where}: missing column(s) {', '.join(missing)}; found "
                              f"{', '.join(map(str, columns)) or 'none'} (needed: image, caption; optional: key)")

    def _read_delimited(self, path: str):
        delimiter = "\t" if path.lower().endswith(".tsv") else ","
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter=delimiter)
            self._check_columns(path, reader.fieldnames or [], " (header)")
            out = []
            for row in reader:
                if None in row:  # more cells than header columns
                    raise CorpusError(f"{path} line {reader.line_num}: more cells than header columns")
                out.append((reader.line_num, row))
            return out

    def _read_jsonl(self, path: str):
        out = []
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise CorpusError(f"{path} line {line_no}: invalid JSON ({e})") from e
                if not isinstance(row, dict):
                    raise CorpusError(f"{path} line {line_no}: expected a JSON object")
                self._check_columns(path, list(row), f" line {line_no}")
                out.append((line_no, row))
        return out

    @property
    def columns(self) -> list[str]:
        """The extra columns (besides image, caption, key), in first-seen order."""
        return list(self._extra)

    def column(self, name: str) -> list[str]:
        """The values of an extra column in corpus order, as text; "" for an empty or absent cell."""
        if name not in self._extra:
            raise CorpusError(f"{self.source} has no column {name!r}; its other columns are "
                              f"{', '.join(map(repr, self._extra)) or 'none'} (besides image, caption, key)")
        return list(self._extra[name])

    def image_path(self, i: int) -> str:
        p = os.path.expanduser(self.images[i])
        return p if os.path.isabs(p) else os.path.join(self.root, p)

    def describe(self, i: int) -> str:
        return f"{self.source} row {i + 1} (line {self._lines[i]}), key {self.keys[i]!r}"

    def load_image(self, i: int) -> Image.Image:
        return decode_image(None, self.image_path(i), self.keys[i], self.describe(i))


def _cell(value) -> str:
    """A cell as text: None -> "", a JSON list -> its items joined by "|" (routing's default separator)."""
    if value is None:
        return ""
    if isinstance(value, list):
        return "|".join(_cell(v) for v in value)
    return str(value)
