"""CSV, TSV and JSONL corpora: one row per pair, columns `image`, `caption` and optional `key`.

Other columns are kept as text and read with `column(name)` (e.g. a `domain` column for teacher routing).

Image paths are relative to the table's folder unless absolute. Malformed tables (not UTF-8, a missing column,
an empty image path, a JSON value of the wrong type, a duplicate key, a CSV quote never closed or a row with
another number of cells than the header: `cache.sources.csv_rows`) are refused at open time with the file and the line
where the row begins, before any model runs. An empty or null caption is not malformed: that row becomes a bad
sample. Limits (`cache.sources.base`): at most MAX_COLUMNS columns and MAX_CELL_CHARS characters per cell (over
them: refused), captions cut to MAX_CAPTION_BYTES.

Registered formats (`cache.sources.formats`): csv, tsv (a corpus, or labelled rows: `read_table`, which eval
datasets and `distill corpus` sources read through) and jsonl (a corpus).
"""

from __future__ import annotations

import json
import os

from PIL import Image

from cache.sources.base import (
    MAX_CELL_CHARS,
    MAX_COLUMNS,
    Corpus,
    CorpusError,
    cap_caption,
    read_utf8_text,
    text_problem,
)
from cache.sources.csv_rows import read_delimited
from cache.sources.formats import Format, LabelledData, has_suffix, register_format
from cache.sources.image_decode import decode_image, read_bytes

_JSON_TYPES = {bool: "boolean", int: "number", float: "number", str: "string", list: "list", dict: "object"}


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
            where = f"{path} row {n} (line {line})"
            image = _typed(row.get("image"), "image", (str,), where, "a path string")
            if image is None or not image.strip():
                raise CorpusError(f"{where}: empty 'image' value")
            caption = _typed(row.get("caption"), "caption", (str,), where, "a string") or ""
            key = _typed(row.get("key"), "key", (str, int), where, "a string or an integer")
            key = image if key is None or str(key) == "" else str(key)
            for what, value in (("key", key), ("caption", caption)):
                problem = text_problem(value, is_key=what == "key")
                if problem:
                    raise CorpusError(f"{where}: {what} {problem}; fix that row")
            caption = cap_caption(caption)
            if key in seen:
                raise CorpusError(
                    f"{path} row {n} (line {line}): duplicate key {key!r}, first used on row "
                    f"{seen[key]}; keys must be unique (add or fix the 'key' column)"
                )
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
                    if len(self._extra) + 3 >= MAX_COLUMNS:
                        raise CorpusError(_too_many_columns(path, line, len(self._extra) + 4))
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
            shown = ", ".join(map(str, list(columns)[:10])) + (", ..." if len(columns) > 10 else "")
            raise CorpusError(
                f"{path}{where}: missing column(s) {', '.join(missing)}; found "
                f"{shown or 'none'} (needed: image, caption; optional: key)"
            )

    def _read_delimited(self, path: str):
        header, rows = read_delimited(path, _read_utf8(path, "a header line: image,caption[,key]"), _delimiter(path))
        self._check_columns(path, header, " (header)")
        return rows

    def _read_jsonl(self, path: str):
        out = []
        for line_no, line in enumerate(_read_utf8(path, "one JSON object per line").split("\n"), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as e:
                raise CorpusError(f"{path} line {line_no}: invalid JSON ({e})") from e
            if not isinstance(row, dict):
                raise CorpusError(
                    f"{path} line {line_no}: expected a JSON object, found a "
                    f"{_JSON_TYPES.get(type(row), type(row).__name__)}"
                )
            if len(row) > MAX_COLUMNS:
                raise CorpusError(_too_many_columns(path, line_no, len(row)))
            for col, value in row.items():
                if isinstance(value, (str, list)) and len(text := _cell(value)) > MAX_CELL_CHARS:
                    raise CorpusError(
                        f"{path} line {line_no}: the {col!r} cell is {len(text):,} characters, over "
                        f"{MAX_CELL_CHARS:,}, the limit of one cell; shorten it"
                    )
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
            raise CorpusError(
                f"{self.source} has no column {name!r}; its other columns are "
                f"{', '.join(map(repr, self._extra)) or 'none'} (besides image, caption, key)"
            )
        return list(self._extra[name])

    def image_path(self, i: int) -> str:
        p = os.path.expanduser(self.images[i])
        return p if os.path.isabs(p) else os.path.join(self.root, p)

    def describe(self, i: int) -> str:
        return f"{self.source} row {i + 1} (line {self._lines[i]}), key {self.keys[i]!r}"

    def load_image(self, i: int) -> Image.Image:
        return decode_image(None, self.image_path(i), self.keys[i], self.describe(i), self.limits)

    def load_bytes(self, i: int) -> bytes:
        return read_bytes(self.image_path(i), self.keys[i], self.describe(i), self.limits)


def _delimiter(path: str) -> str:
    return "\t" if path.lower().endswith(".tsv") else ","


def read_table(path: str | os.PathLike, split: str | None = None) -> LabelledData:
    """A CSV/TSV of labelled rows (eval datasets, `distill corpus` sources): the header and every row's cells,
    each row with "FILE row N (line L)". Not UTF-8 (a BOM is dropped), a quote never closed, a row of another
    width, a cell over MAX_CELL_CHARS: a CorpusError naming the line. Which column holds images, labels or the
    split is the caller's (`split` is not used here: a table's split is a column)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CorpusError(f"{path} not found")
    columns, records = read_delimited(path, read_utf8_text(path), _delimiter(path))
    rows, where = [], []
    for n, (line, row) in enumerate(records, start=1):
        rows.append(row)
        where.append(f"{path} row {n} (line {line})")
    return LabelledData(path, columns, rows, where)


def _too_many_columns(path: str, line: int, columns: int) -> str:
    return (
        f"{path} line {line}: {columns:,} columns, more than the {MAX_COLUMNS} a corpus table may have; keep "
        "the columns training uses (image, caption, key, e.g. domain)"
    )


def _read_utf8(path: str, expected: str) -> str:
    """The file's text; one that is empty or not UTF-8 is refused naming the line (a BOM is allowed and dropped)."""
    text = read_utf8_text(path)
    if not text or text.isspace():  # not strip(): that may copy the whole text
        raise CorpusError(f"{path}: empty file; expected {expected}")
    return text


def _typed(value, column: str, types: tuple, where: str, expected: str):
    """`value` if it is None or one of `types` (bool is not an integer here), else a CorpusError naming the row."""
    if value is None or (isinstance(value, types) and not isinstance(value, bool)):
        return value
    shown = repr(value)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    raise CorpusError(
        f"{where}: '{column}' is a JSON {_JSON_TYPES.get(type(value), type(value).__name__)} "
        f"({shown}); expected {expected}"
    )


def _cell(value) -> str:
    """A cell as text: None -> "", a JSON list -> its items joined by "|" (routing's default separator)."""
    if value is None:
        return ""
    if isinstance(value, list):
        return "|".join(_cell(v) for v in value)
    return str(value)


def _open(path: str, stream=None) -> TableCorpus:
    return TableCorpus(path)


register_format(Format("csv", "a .csv file", has_suffix(".csv"), corpus=_open, labelled=read_table))
register_format(Format("tsv", "a .tsv file", has_suffix(".tsv"), corpus=_open, labelled=read_table))
register_format(Format("jsonl", "a .jsonl file", has_suffix(".jsonl"), corpus=_open))
