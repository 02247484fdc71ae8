"""Reading a CSV or TSV corpus table record by record, each row with the line where it begins, in bounded memory.

Why not `csv.DictReader`: it names the line where a row *ends*; it reads a quote that is never closed as one cell
holding the rest of the file (two rows silently become one); it fills missing cells with None and keeps extra
ones under a None key; and it builds every cell of a 10^6-column header before anything can be checked. Here:

- a quote never closed (the file ends inside a quoted cell), text after a closing quote, a row with another number
  of cells than the header, a cell over MAX_CELL_CHARS characters: each is a CorpusError naming the line where
  its row begins (and, for a row over several lines, where it ends);
- a header over MAX_COLUMNS columns, or a row over the header's width, is refused from its first line when that
  line holds no quote (its cells are then exactly its delimiters + 1), before a cell is built;
- line breaks inside properly closed quotes stay part of the cell (captions may span lines).
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterator
from typing import cast

from cache.sources.base import MAX_CELL_CHARS, MAX_COLUMNS, CorpusError

_HOW_TO_TRIM = "keep the columns training uses (image, caption, key, e.g. domain)"
_LINE = re.compile(r"[^\r\n]*(?:\r\n?|\n)?")  # one physical line with its ending, as csv wants them


class _TooWide(Exception):
    def __init__(self, cells: int):
        self.cells = cells


class _Lines:
    """The table's physical lines (split at \\n, \\r\\n or \\r, as csv expects), counted; the first line of each
    record is checked against `width` cells when it holds no quote. Why not io.StringIO: it keeps a copy of the
    text at 4 bytes per character."""

    def __init__(self, text: str, delimiter: str):
        self._text, self._pos = text, 0
        self.delimiter = delimiter
        self.count = 0  # lines handed to csv so far
        self.record_start = True  # the next line begins a record
        self.width = MAX_COLUMNS  # most cells a record may have (the header's width once it is read)

    def __iter__(self):
        return self

    def __next__(self) -> str:
        line = cast("re.Match[str]", _LINE.match(self._text, self._pos)).group()  # _LINE matches the empty string
        if not line:
            raise StopIteration
        self._pos += len(line)
        self.count += 1
        if self.record_start:
            self.record_start = False
            if '"' not in line:
                cells = line.count(self.delimiter) + 1
                if cells > self.width:
                    raise _TooWide(cells)
        return line


def _records(path: str, text: str, delimiter: str) -> Iterator[tuple[int, list[str]]]:
    """(line where it begins, cells) of each non-blank record, the header first; every later record has the
    header's number of cells (else a CorpusError)."""
    lines = _Lines(text, delimiter)
    reader = csv.reader(lines, delimiter=delimiter, strict=True)
    header: list[str] | None = None
    while True:
        start = lines.count + 1
        lines.record_start = True
        old = csv.field_size_limit(MAX_CELL_CHARS)  # process-wide: set for this read only (a generator may pause)
        try:
            cells = next(reader)
        except StopIteration:
            return
        except _TooWide as e:
            raise CorpusError(_too_wide(path, start, e.cells, header, delimiter)) from None
        except csv.Error as e:
            raise CorpusError(_not_csv(path, start, lines.count, e)) from None
        finally:
            csv.field_size_limit(old)
        if not cells or (len(cells) == 1 and not cells[0].strip()):
            continue
        if header is None:
            if len(cells) > MAX_COLUMNS:  # a quoted header line, so not caught before it was parsed
                raise CorpusError(_too_wide(path, start, len(cells), None, delimiter))
            header, lines.width = cells, len(cells)
        elif len(cells) != len(header):
            raise CorpusError(_wrong_count(path, start, lines.count, len(cells), header, delimiter))
        yield start, cells


def read_delimited(path: str, text: str, delimiter: str) -> tuple[list[str], Iterator[tuple[int, dict[str, str]]]]:
    """(header, the rows as (line where the row begins, {column: cell})) of a CSV/TSV text; blank lines are
    skipped. The header is read at once, the rows as they are iterated (so only one is held at a time)."""
    records = _records(path, text, delimiter)
    first = next(records, None)
    if first is None:
        return [], iter(())
    header = first[1]
    return header, ((line, dict(zip(header, cells))) for line, cells in records)


def _too_wide(path: str, line: int, cells: int, header: list[str] | None, delimiter: str) -> str:
    if header is None:
        return (
            f"{path} line {line}: the header has {cells:,} columns, more than the {MAX_COLUMNS} a corpus table "
            f"may have; {_HOW_TO_TRIM}"
        )
    return _wrong_count(path, line, line, cells, header, delimiter)


def _wrong_count(path: str, start: int, end: int, cells: int, header: list[str], delimiter: str) -> str:
    names = ", ".join(header[:8]) + (", ..." if len(header) > 8 else "")
    spans = (
        f"; the row runs to line {end}: a quote opened on line {start} may close too late"
        if end > start
        else " (quote a cell that holds a " + ("tab" if delimiter == "\t" else "comma") + ")"
    )
    return (
        f"{path} line {start}: {cells:,} cell{'s' if cells != 1 else ''}, but the header has {len(header)} "
        f"({names}); every row needs one cell per column{spans}"
    )


def _not_csv(path: str, start: int, end: int, e: csv.Error) -> str:
    why = str(e)
    if "unexpected end of data" in why:
        return (
            f"{path} line {start}: a quoted cell in the row that begins on this line is never closed (the file "
            'ends inside it); close the quote, or write a quote meant literally as two ("")'
        )
    if "field larger than field limit" in why:
        if end > start:
            return (
                f"{path} line {start}: a cell of the row that begins on this line is over {MAX_CELL_CHARS:,} "
                f"characters, the limit of one cell, and runs past line {end}: a quote opened on line {start} "
                "is probably never closed"
            )
        return (
            f"{path} line {start}: a cell of the row that begins on this line is over {MAX_CELL_CHARS:,} "
            "characters, the limit of one cell; shorten it"
        )
    if end > start:
        return (
            f"{path} line {start}: not valid CSV in the row that begins on this line and runs to line {end} "
            f"({why}); look for a quote opened on line {start} that is not closed where it should be"
        )
    if "expected after" in why:  # strict mode: text after a closing quote
        return f"{path} line {start}: not valid CSV ({why}); a cell that starts with a quote must end with one"
    return f"{path} line {start}: not valid CSV ({why})"
