"""The format registry: every file format the project reads data from, registered once by name.

Why one registry: training corpora (`open_corpus`), evaluation datasets (`distill.eval.datasets`) and the
labelled sources of `distill corpus` (`cache.sources.labelled`) read the same files; each format is one module that
registers one `Format` here, so image suffixes, encodings, BOMs and the messages naming file, line and key live in
that module and every caller gets them alike.

A format offers one or both readers:

- `corpus(path, stream)` -> a `Corpus` of image-caption pairs (training, `distill cache`, eval retrieval);
- `labelled(path, split)` -> a `LabelledData`: rows of text cells with their images and raw labels
  (eval classification tasks, `distill corpus` sources).

Built-in formats (registered by their modules, which `cache.sources.corpus` imports): csv, tsv, jsonl
(`cache.sources.table`), webdataset (`cache.sources.webdataset`), stream (`cache.sources.stream`), npz
(`cache.sources.npz`), folder (`cache.sources.class_folder`). Another package may add one through the entry point
group `biomed_distill.formats`; a test or a script may call `DATA_FORMATS.add(name, Format(...))`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from cache.sources.base import Corpus, CorpusError
from teachers.kernel.registry import Registry

Need = Literal["corpus", "labelled"]


@dataclass(eq=False)
class LabelledData:
    """One labelled source read into rows, the same shape whatever the format.

    Row i has text cells `rows[i]` (columns `columns`), the message prefix `where[i]` ("FILE row N (line L)"),
    a key `keys[i]` unique within the source, an image `images[i]` (an absolute path, or a uint8 array) and a raw
    label `labels[i]`. Tables leave `images`, `keys` and `labels` to the caller (None: a column names them)."""

    origin: str  # the file or folder, for messages
    columns: list[str]  # text columns of `rows`
    rows: list[dict[str, str]]
    where: list[str]
    keys: list[str] | None = None
    images: list[str] | np.ndarray | list[np.ndarray] | None = None
    labels: list[str] | np.ndarray | None = None  # class folder names, or (N, C) label arrays as stored (npz)
    classes: list[str] | None = None  # class folders present (empty ones too): folder sources

    def __len__(self) -> int:
        return len(self.rows)


@dataclass(frozen=True)
class Format:
    """A registered file format: how to recognise its paths and how to read them."""

    name: str
    summary: str  # "a .csv file", for messages listing the formats
    matches: Callable[[str], bool]  # does this path look like this format (by name, or is_dir)?
    corpus: Callable[[str, Any], Corpus] | None = None  # (path, StreamOptions | None) -> Corpus
    labelled: Callable[[str, str | None], LabelledData] | None = None  # (path, split or None) -> LabelledData

    def can(self, need: Need) -> bool:
        return (self.corpus if need == "corpus" else self.labelled) is not None


DATA_FORMATS: Registry[Format] = Registry("data format", entry_point_group="biomed_distill.formats")


def register_format(fmt: Format) -> Format:
    """Register `fmt` under its name (a second format of the same name raises)."""
    DATA_FORMATS.add(fmt.name, fmt)
    return fmt


def format_named(name: str, need: Need, what: str = "data") -> Format:
    """The format called `name`, which must offer the `need` reader; unknown names suggest near matches."""
    try:
        fmt = DATA_FORMATS.get(name)
    except KeyError as e:
        raise CorpusError(str(e.args[0])) from None
    if not fmt.can(need):
        able = ", ".join(n for n in DATA_FORMATS.list() if DATA_FORMATS.get(n).can(need))
        raise CorpusError(f"format {name!r} cannot be read as {_NEEDS[need]} ({what}); formats that can: {able}")
    return fmt


def find_format(path: str | os.PathLike, need: Need, what: str = "corpus") -> Format:
    """The one format offering `need` whose `matches` accepts `path`; a CorpusError listing the formats otherwise."""
    path = os.fspath(path)
    able = [DATA_FORMATS.get(n) for n in DATA_FORMATS.list()]
    able = [f for f in able if f.can(need)]
    hits = [f for f in able if f.matches(path)]
    if len(hits) == 1:
        return hits[0]
    if len(hits) > 1:
        raise CorpusError(f"{what} {path}: matches the formats {', '.join(f.name for f in hits)}; name one")
    if not os.path.exists(path):
        raise CorpusError(f"{what} {path} not found")
    raise CorpusError(f"{what} {path}: unknown format; expected " + _listed([f.summary for f in able]))


def _listed(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]


def has_suffix(*suffixes: str) -> Callable[[str], bool]:
    """A `matches` for formats known by their file name's ending (case-insensitive)."""
    return lambda path: path.lower().endswith(suffixes)


_NEEDS = {"corpus": "image-caption pairs", "labelled": "labelled rows"}
