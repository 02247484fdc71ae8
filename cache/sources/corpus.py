"""The one corpus interface every part of the project reads image-caption pairs through.

`open_corpus(path)` picks the reader through the format registry (`cache.sources.formats`), by the path:

- a `.csv`, `.tsv` or `.jsonl` file with columns `image` (relative to the file, or absolute) and `caption`, and
  an optional `key` (default: the image path as written)  -> `cache.sources.table.TableCorpus`;
- a folder of `.tar` shards, a single `.tar`, or a brace pattern `shards/{00000..00009}.tar` (WebDataset: each
  sample an image member and a `txt` caption, key = `__key__`)
  -> `cache.sources.webdataset.WebDatasetCorpus` (indexed once, read by seeking);
- WebDataset shards named by URL or command (`file://`, `s3://`, `gs://`, `https://`, `pipe:CMD`, with brace
  ranges) -> `cache.sources.stream.StreamCorpus` (listed once, then read front to back; `stream` options);
- any other registered format that offers a corpus reader (a plug-in, or `DATA_FORMATS.add` in a script).

`read_labelled(path)` does the same for labelled rows (a CSV/TSV, a MedMNIST `.npz`, a folder per class), which
evaluation datasets and `distill corpus` sources read through.

The `Corpus` interface itself (keys, captions, load_image, describe, fingerprint, ...) is in `cache.sources.base`;
its names are re-exported here, so `from cache.sources.corpus import open_corpus, Corpus, CorpusError, BadSampleError`
is the one import callers need. Importing this module registers the built-in formats.
"""

from __future__ import annotations

import os

# the built-in formats: each module registers its format(s) when imported
import cache.sources.class_folder  # noqa: F401
import cache.sources.npz  # noqa: F401
from cache.sources.base import (  # noqa: F401  (re-exported)
    IMAGE_EXTS,
    BadSampleError,
    Corpus,
    CorpusError,
    DecodeLimits,
    fingerprint_of,
    text_problem,
    utf8_problem,
)
from cache.sources.formats import DATA_FORMATS, Format, LabelledData, find_format, format_named
from cache.sources.shard_io import is_stream_spec
from cache.sources.stream import StreamCorpus, StreamOptions
from cache.sources.table import TableCorpus
from cache.sources.webdataset import WebDatasetCorpus

__all__ = [
    "open_corpus",
    "read_labelled",
    "Corpus",
    "CorpusError",
    "BadSampleError",
    "DecodeLimits",
    "fingerprint_of",
    "TableCorpus",
    "WebDatasetCorpus",
    "StreamCorpus",
    "StreamOptions",
    "is_stream_spec",
    "DATA_FORMATS",
    "Format",
    "LabelledData",
]


def open_corpus(path: str | os.PathLike, stream: StreamOptions | None = None, format: str | None = None) -> Corpus:
    """Open image-caption pairs: a CSV/TSV/JSONL table, a local WebDataset (folder of .tar shards, one .tar, or a
    brace pattern), WebDataset shards by URL or `pipe:` command (`stream`: retries, listing folder, read-ahead), or
    any registered format with a corpus reader. `format` names the format instead of telling it from the path."""
    path = os.fspath(path)
    fmt = format_named(format, "corpus") if format else find_format(path, "corpus", "corpus")
    if fmt.corpus is None:  # cannot be: both lookups return only a format that can read `need`
        raise TypeError(f"format {fmt.name!r} has no corpus reader")
    return fmt.corpus(path, stream)


def read_labelled(
    path: str | os.PathLike, format: str | None = None, split: str | None = None, what: str = "source"
) -> LabelledData:
    """Labelled rows of a CSV/TSV, a MedMNIST .npz, a folder per class, or any registered format with a labelled
    reader (`split`: the npz split or class-folder subfolder; a table's split is a column, chosen by the caller)."""
    path = os.fspath(path)
    fmt = format_named(format, "labelled", what) if format else find_format(path, "labelled", what)
    if fmt.labelled is None:  # cannot be: both lookups return only a format that can read `need`
        raise TypeError(f"format {fmt.name!r} has no labelled reader")
    return fmt.labelled(path, split)
