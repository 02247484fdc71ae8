"""The corpus interface every part of the project reads image-caption pairs through: `Corpus` and its errors.

Why a module of its own: the readers (`cache.sources.table`, `cache.sources.webdataset`, ...) subclass `Corpus`
and `cache.sources.corpus` picks among them through the format registry (`cache.sources.formats`), so the base
lives below both and no file imports one that imports it back.

The interface (stable: the cache writer and the trainer both rely on it):

    corpus = open_corpus(path)
    len(corpus)              # number of samples, in corpus order (row i of the feature cache is sample i)
    corpus.keys[i]           # unique sample id (str)
    corpus.captions[i]       # caption as written, cut to MAX_CAPTION_BYTES (str; empty -> a bad sample)
    corpus.load_image(i)     # PIL.Image in RGB; raises BadSampleError(key, reason) when missing, corrupt or too
                             # large (`corpus.limits`, a DecodeLimits: pixel limit, reduced JPEG decodes)
    corpus.load_bytes(i)     # the image file's bytes, undecoded (None: this corpus cannot give them)
    corpus.with_limits(lim)  # a copy of the corpus that decodes under other DecodeLimits
    corpus.describe(i)       # "corpus.csv row 3 (line 4), key 'abc'": where a sample lives, for messages
    corpus.fingerprint()     # sha256 hex of keys and captions: ties a feature cache to its corpus
    corpus.column(name)      # an extra column's values as text (tables only; CorpusError otherwise)

Everything is indexed once when the corpus is opened; `load_image` opens files lazily, so a corpus object can be
built before DataLoader workers fork and used inside them.
"""

from __future__ import annotations

import copy
import hashlib
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence

from PIL import Image

from cache.sources.image_decode import IMAGE_SUFFIXES, BadSampleError, DecodeLimits  # noqa: F401  (re-exported)

IMAGE_EXTS = tuple(s[1:] for s in IMAGE_SUFFIXES)  # WebDataset member extensions: the suffixes without the dot
# Input limits (docs/reliability.md "Bad input"): what one corpus may ask of memory before anything is cached.
MAX_COLUMNS = 1024  # columns of a table (header cells; keys of the JSONL objects, all rows together)
MAX_CELL_CHARS = 1 << 20  # characters of one table cell; a longer one is refused naming its line
MAX_CAPTION_BYTES = 64 << 10  # UTF-8 bytes of a caption kept (and of a `txt` member read); the rest is cut off


class CorpusError(ValueError):
    """The corpus itself is malformed (missing column, duplicate key, unreadable shard): nothing can be cached."""


def text_problem(value: str, is_key: bool) -> str | None:
    """Why a key or caption cannot be stored or hashed (lone surrogates from JSON escapes, NUL in a key), or None."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"is not valid Unicode (character {value[e.start]!r} at position {e.start + 1})"
    if is_key and "\x00" in value:
        return "contains a NUL character (HDF5 cannot store it)"
    return None


def cap_utf8(data: bytes, limit: int = MAX_CAPTION_BYTES) -> bytes:
    """The first `limit` bytes of `data`, less a multi-byte character the cut would split (so it stays UTF-8)."""
    if len(data) <= limit:
        return data
    cut = data[:limit]
    start = len(cut)
    while start > 0 and len(cut) - start < 3 and cut[start - 1] & 0xC0 == 0x80:  # back over continuation bytes
        start -= 1
    if start > 0 and cut[start - 1] >= 0xC0:  # a lead byte: is its character whole?
        lead = cut[start - 1]
        need = 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
        if len(cut) - (start - 1) < need:
            return cut[: start - 1]
    return cut


def cap_caption(caption: str) -> str:
    """A caption cut to MAX_CAPTION_BYTES of UTF-8 (at a character boundary).

    Why cut, not refuse: a tokenizer keeps its first 77 (or 256, 512) tokens anyway, while tokenising a 50 MB
    caption costs gigabytes and minutes in every worker; 64 KiB is far beyond any context length."""
    if len(caption) * 4 <= MAX_CAPTION_BYTES:  # fast path: cannot be over whatever its characters are
        return caption
    data = caption.encode("utf-8", "surrogatepass")
    if len(data) <= MAX_CAPTION_BYTES:
        return caption
    return cap_utf8(data).decode("utf-8", "surrogatepass")


def utf8_problem(data: bytes) -> tuple[int, int, str] | None:
    """(line, column, byte) of the first byte of `data` that is not UTF-8, both 1-based, or None."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        return line, column, f"0x{data[e.start]:02x}"
    return None


def read_utf8_text(path: str | os.PathLike) -> str:
    """A table's text, decoded once (the bytes and the text are the most a table costs); a file that is not UTF-8
    is refused naming the line, column and byte (a BOM is allowed and dropped)."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        problem = utf8_problem(data)
        if problem is None:  # cannot be: the text did not decode, so utf8_problem finds its first bad byte
            raise TypeError(f"{path}: no undecodable byte found after {e}") from e
        line, column, byte = problem
        raise CorpusError(
            f"{path} line {line}: not UTF-8 (byte {byte} at column {column}); save the file as UTF-8"
        ) from None


def fingerprint_of(keys: Sequence[str], captions: Sequence[str]) -> str:
    """sha256 over (key, caption) pairs, length-prefixed so no two corpora collide by concatenation."""
    h = hashlib.sha256()
    h.update(f"n={len(keys)};".encode())
    for k, c in zip(keys, captions):
        kb, cb = k.encode("utf-8"), c.encode("utf-8")
        h.update(f"{len(kb)}:".encode() + kb + f"{len(cb)}:".encode() + cb)
    return h.hexdigest()


class Corpus(ABC):
    """Image-caption pairs in a fixed order; see the module docstring for the contract."""

    source: str
    keys: list[str]
    captions: list[str]
    limits: DecodeLimits = DecodeLimits()  # how load_image decodes (cache.sources.image_decode)
    _fingerprint: str | None  # computed on first use (subclasses may set it None in __init__)

    def __len__(self) -> int:
        return len(self.keys)

    @abstractmethod
    def load_image(self, i: int) -> Image.Image: ...

    @abstractmethod
    def describe(self, i: int) -> str: ...

    def load_bytes(self, i: int) -> bytes | None:
        """The encoded image as stored, for decoding elsewhere (`data.decode: device`); None: not supported."""
        return None

    def with_limits(self, limits: DecodeLimits) -> Corpus:
        """A shallow copy decoding under `limits` (the index is shared, not rebuilt); this corpus is unchanged."""
        out = copy.copy(self)
        out.limits = limits
        return out

    def column(self, name: str) -> list[str]:
        """An extra per-row column as text (CSV/TSV/JSONL corpora only; see TableCorpus.column)."""
        raise CorpusError(
            f"{self.source} ({type(self).__name__}) has no extra columns, so it has no column "
            f"{name!r}; per-row columns (e.g. for loss.routing) need a CSV, TSV or JSONL corpus"
        )

    def fingerprint(self) -> str:
        fp = getattr(self, "_fingerprint", None)
        if fp is None:
            fp = self._fingerprint = fingerprint_of(self.keys, self.captions)
        return fp

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.source!r}, {len(self)} samples)"
