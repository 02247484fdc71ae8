"""The one corpus interface every part of the project reads image-caption pairs through.

`open_corpus(path)` picks the reader from the path (DESIGN.md "Corpus formats"):

- a `.csv`, `.tsv` or `.jsonl` file with columns `image` (relative to the file, or absolute) and `caption`, and
  an optional `key` (default: the image path as written)  -> `cache.sources.table.TableCorpus`;
- a folder of `.tar` shards, a single `.tar`, or a brace pattern `shards/{00000..00009}.tar` (WebDataset: each
  sample an image `jpg`/`jpeg`/`png`/`webp` and a `txt` caption, key = `__key__`)
  -> `cache.sources.webdataset.WebDatasetCorpus` (indexed once, read by seeking);
- WebDataset shards named by URL or command (`file://`, `s3://`, `gs://`, `https://`, `pipe:CMD`, with brace
  ranges) -> `cache.sources.stream.StreamCorpus` (listed once, then read front to back; `stream` options).

The `Corpus` interface itself (keys, captions, load_image, describe, fingerprint, ...) is in `cache.sources.base`;
its names are re-exported here, so `from cache.sources.corpus import open_corpus, Corpus, CorpusError, BadSampleError`
is the one import callers need.
"""
from __future__ import annotations

import os

from cache.sources.base import (IMAGE_EXTS,
                              TABLE_SUFFIXES,
                              BadSampleError,
                              Corpus,
                              CorpusError,
                              DecodeLimits,
                              fingerprint_of,
                              text_problem,
                              utf8_problem)
from cache.sources.stream import StreamCorpus, StreamOptions
from cache.sources.table import TableCorpus
from cache.sources.webdataset import WebDatasetCorpus
from cache.sources.shard_io import is_stream_spec

__all__ = ["open_corpus", "Corpus", "CorpusError", "BadSampleError", "DecodeLimits", "fingerprint_of",
           "TableCorpus", "WebDatasetCorpus", "StreamCorpus", "StreamOptions", "is_stream_spec"]


def open_corpus(path: str | os.PathLike, stream: StreamOptions | None = None) -> Corpus:
    """Open a CSV/TSV/JSONL table, a local WebDataset (folder of .tar shards, one .tar, or a brace pattern), or
    WebDataset shards by URL or `pipe:` command (`stream`: retries, listing folder, read-ahead)."""
    path = os.fspath(path)
    if is_stream_spec(path):
        return StreamCorpus(path, stream or StreamOptions())
    if path.lower().endswith(TABLE_SUFFIXES):
        return TableCorpus(path)
    if os.path.isdir(path) or path.lower().endswith(".tar") or "{" in path:
        return WebDatasetCorpus(path)
    if not os.path.exists(path):
        raise CorpusError(f"corpus {path} not found")
    raise CorpusError(f"corpus {path}: unknown format; expected a .csv, .tsv or .jsonl file, a folder of .tar "
                      "shards, or a brace pattern such as shards/{00000..00009}.tar")
