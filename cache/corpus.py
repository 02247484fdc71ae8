"""The one corpus interface every part of the project reads image-caption pairs through.

`open_corpus(path)` picks the reader from the path (DESIGN.md "Corpus formats"):

- a `.csv`, `.tsv` or `.jsonl` file with columns `image` (relative to the file, or absolute) and `caption`, and
  an optional `key` (default: the image path as written)  -> `cache.corpus_table.TableCorpus`;
- a folder of `.tar` shards, a single `.tar`, or a brace pattern `shards/{00000..00009}.tar` (WebDataset: each
  sample an image `jpg`/`jpeg`/`png`/`webp` and a `txt` caption, key = `__key__`)
  -> `cache.corpus_webdataset.WebDatasetCorpus`.

The interface (stable: the cache writer and the trainer both rely on it):

    corpus = open_corpus(path)
    len(corpus)              # number of samples, in corpus order (row i of the feature cache is sample i)
    corpus.keys[i]           # unique sample id (str)
    corpus.captions[i]       # caption as written (str; may be empty -> a bad sample for the cache)
    corpus.load_image(i)     # PIL.Image in RGB; raises BadSampleError(key, reason) when missing or corrupt
    corpus.describe(i)       # "corpus.csv row 3 (line 4), key 'abc'": where a sample lives, for messages
    corpus.fingerprint()     # sha256 hex of keys and captions: ties a feature cache to its corpus
    corpus.column(name)      # an extra column's values as text (tables only; CorpusError otherwise)

Everything is indexed once when the corpus is opened; `load_image` opens files lazily, so a corpus object can be
built before DataLoader workers fork and used inside them.
"""
from __future__ import annotations

import hashlib
import io
import os
from abc import ABC, abstractmethod
from typing import Sequence

from PIL import Image

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl")


class CorpusError(ValueError):
    """The corpus itself is malformed (missing column, duplicate key, unreadable shard): nothing can be cached."""


class BadSampleError(Exception):
    """One sample cannot be used (missing or corrupt image, empty caption); the cache may skip it."""

    def __init__(self, key: str, reason: str, where: str | None = None):
        self.key = key
        self.reason = reason
        self.where = where
        super().__init__(f"{where or f'key {key!r}'}: {reason}")


def fingerprint_of(keys: Sequence[str], captions: Sequence[str]) -> str:
    """sha256 over (key, caption) pairs, length-prefixed so no two corpora collide by concatenation."""
    h = hashlib.sha256()
    h.update(f"n={len(keys)};".encode())
    for k, c in zip(keys, captions):
        kb, cb = k.encode("utf-8"), c.encode("utf-8")
        h.update(f"{len(kb)}:".encode() + kb + f"{len(cb)}:".encode() + cb)
    return h.hexdigest()


def decode_image(data: bytes | None, path: str | None, key: str, where: str) -> Image.Image:
    """Open and fully decode an image (from bytes or a path) as RGB, or raise BadSampleError saying why."""
    try:
        if data is None:
            if path is None or not os.path.isfile(path):
                raise BadSampleError(key, f"missing image file {path}", where)
            with open(path, "rb") as f:
                data = f.read()
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # force the full decode: truncated files fail here, not inside a transform
            return img.convert("RGB")
    except BadSampleError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        src = path if path is not None else "image bytes"
        raise BadSampleError(key, f"unreadable image {src} ({type(e).__name__}: {e})", where) from e


class Corpus(ABC):
    """Image-caption pairs in a fixed order; see the module docstring for the contract."""

    source: str
    keys: list[str]
    captions: list[str]

    def __len__(self) -> int:
        return len(self.keys)

    @abstractmethod
    def load_image(self, i: int) -> Image.Image: ...

    @abstractmethod
    def describe(self, i: int) -> str: ...

    def column(self, name: str) -> list[str]:
        """An extra per-row column as text (CSV/TSV/JSONL corpora only; see TableCorpus.column)."""
        raise CorpusError(f"{self.source} ({type(self).__name__}) has no extra columns, so it has no column "
                          f"{name!r}; per-row columns (e.g. for loss.routing) need a CSV, TSV or JSONL corpus")

    def fingerprint(self) -> str:
        if getattr(self, "_fingerprint", None) is None:
            self._fingerprint = fingerprint_of(self.keys, self.captions)
        return self._fingerprint

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.source!r}, {len(self)} samples)"


def open_corpus(path: str | os.PathLike) -> Corpus:
    """Open a CSV/TSV/JSONL table or a WebDataset (folder of .tar shards, one .tar, or a brace pattern)."""
    path = os.fspath(path)
    if path.lower().endswith(TABLE_SUFFIXES):
        from .corpus_table import TableCorpus
        return TableCorpus(path)
    if os.path.isdir(path) or path.lower().endswith(".tar") or "{" in path:
        from .corpus_webdataset import WebDatasetCorpus
        return WebDatasetCorpus(path)
    if not os.path.exists(path):
        raise CorpusError(f"corpus {path} not found")
    raise CorpusError(f"corpus {path}: unknown format; expected a .csv, .tsv or .jsonl file, a folder of .tar "
                      "shards, or a brace pattern such as shards/{00000..00009}.tar")
