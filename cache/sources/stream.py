"""Streamed WebDataset corpora: shards named by URL (`file://`, `s3://`, `gs://`, `https://`, `pipe:CMD`, brace
ranges), read front to back with tarfile's streaming mode (`file://` shards seek over the members they skip),
never indexed for random access. Only the image members a row asks for are read, each under the byte bound of
`DecodeLimits.max_bytes`; captions are cut to MAX_CAPTION_BYTES (`cache.sources.webdataset.read_caption`).

Why a listing: the feature cache fixes its rows (keys) when it is created, and training joins corpus rows to it by
key, so keys and captions must be known before any image is read. Each shard is listed once (its keys, captions
and image member sizes, one JSON file per shard under `listing_dir()`): `file://` shards are listed by seeking over
the image bytes; remote and `pipe:` shards are streamed through (their bytes are read twice in all: once to list,
once to embed). Later opens read the listings only. A shard that cannot be listed after its retries is left out of
the rows and kept in `StreamCorpus.unlisted` (URL -> reason), never silently.

Why a cursor: `load_bytes(i)` keeps the shard streams it opened and reads forward to row i; rows passed on the way
are kept (up to `read_ahead` rows) for a later request. So any caller whose requests run forward through a shard,
within a window of `read_ahead` rows, reads each shard once: `distill cache` deals whole shards to ranks and
workers, training's sampler (`distill.data.stream_data`) deals shards and shuffles within a bounded buffer, eval reads
in order. Other orders stay correct but reopen shards. A shard failing mid-read is reopened and skipped to where it
was, up to `Retry.attempts` tries; after that its rows raise `ShardUnreadable` (a `BadSampleError` naming the URL).
Keys, the safety checks on member names and the caption and image rules are the local reader's
(`cache.sources.webdataset`); a stream whose keys or captions differ from its listing stops with a CorpusError.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import logging
import os
from collections import OrderedDict
from collections.abc import Generator
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from cache.sources.base import IMAGE_EXTS, BadSampleError, Corpus, CorpusError
from cache.sources.formats import Format, register_format
from cache.sources.image_decode import decode_image
from cache.sources.shard_io import Retry, is_local, is_stream_spec, open_shard, shard_urls
from cache.sources.shard_listing import (
    SHARD_UNREADABLE,
    ListingStore,
    ReadFailure,
    Sample,
    iter_samples,
    list_shards,
    listing_dir,
    why,
)

log = logging.getLogger(__name__)


class ShardUnreadable(BadSampleError):
    """A row whose shard could not be read after its retries; `where` is the shard's URL, `reason` starts with
    SHARD_UNREADABLE."""


@dataclass(frozen=True)
class StreamOptions:
    """How a streamed corpus is opened and read."""

    retry: Retry = Retry()
    listing: str | None = None  # listing folder (None: listing_dir())
    skip: dict[str, str] = field(default_factory=dict)  # URL -> reason: left out without being listed again
    read_ahead: int = 0  # rows read past and kept for a later request, per process
    progress: bool = False  # a bar while listing


class StreamCorpus(Corpus):
    """Samples of streamed WebDataset shards, in shard order then member order (row i of the cache is sample i)."""

    streamed = True

    def __init__(self, spec: str, options: StreamOptions = StreamOptions()):
        self.source, self.options, self._fingerprint = spec, options, None
        self.shards = shard_urls(spec)
        store = ListingStore(options.listing or listing_dir())
        todo = [u for u in self.shards if u not in options.skip]
        self.unlisted: dict[str, str] = {u: options.skip[u] for u in self.shards if u in options.skip}
        self.unlisted.update(list_shards(todo, options.retry, store.root, options.progress))
        self.keys, self.captions, sizes, shard_of = [], [], [], []
        self.first_row = np.full(len(self.shards), -1, dtype=np.int64)  # -1: not listed
        seen: dict[str, int] = {}
        for s, url in enumerate(self.shards):
            listing = None if url in self.unlisted else store.load(url)
            if listing is None:
                self.unlisted.setdefault(url, "no listing (it vanished while the corpus was opened)")
                continue
            self.first_row[s] = len(self.keys)
            for key in listing.keys:
                if key in seen:
                    raise CorpusError(
                        f"WebDataset {spec}: duplicate __key__ {key!r} in {url} (first seen in "
                        f"{self.shards[seen[key]]}); keys must be unique across shards"
                    )
                seen[key] = s
            self.keys += listing.keys
            self.captions += listing.captions
            sizes += listing.sizes
            shard_of += [s] * len(listing.keys)
        if not self.keys:
            raise CorpusError(
                f"WebDataset {spec}: no samples in {len(self.shards)} shard(s)"
                + (
                    f" ({len(self.unlisted)} could not be read, e.g. {next(iter(self.unlisted))}: "
                    f"{next(iter(self.unlisted.values()))})"
                    if self.unlisted
                    else ""
                )
            )
        if self.unlisted:
            log.warning(
                "%s: %d of %d shard(s) could not be listed and are left out, e.g. %s",
                spec,
                len(self.unlisted),
                len(self.shards),
                next(iter(self.unlisted)),
            )
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.shard_of = np.asarray(shard_of, dtype=np.int64)  # shard index (into self.shards) of each row
        self._state: dict = {}  # this process's cursor, shared by shallow copies (with_limits)

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_state"] = {}  # open streams never cross a process boundary
        return d

    def with_read_ahead(self, rows: int) -> StreamCorpus:
        """A copy that keeps up to `rows` samples read past for a later request (a shuffle buffer's window)."""
        out = copy.copy(self)
        out.options = dataclasses.replace(self.options, read_ahead=int(rows))
        out._state = {}
        return out

    def describe(self, i: int) -> str:
        return f"{self.shards[self.shard_of[i]]} sample {self.keys[i]!r}"

    def load_image(self, i: int) -> Image.Image:
        return decode_image(self.load_bytes(i), None, self.keys[i], self.describe(i), self.limits)

    def load_bytes(self, i: int) -> bytes:
        size, max_bytes = int(self.sizes[i]), self.limits.max_bytes
        if size < 0:
            raise BadSampleError(self.keys[i], f"no image member ({'/'.join(IMAGE_EXTS)})", self.describe(i))
        if max_bytes is not None and size > max_bytes:
            raise BadSampleError(
                self.keys[i],
                f"image member is {size / 2**20:.0f} MiB, larger than any image "
                f"within the pixel limit ({self.limits.hint}); not read",
                self.describe(i),
            )
        cursor = self._state.get("cursor")
        if cursor is None or cursor.pid != os.getpid():
            cursor = self._state["cursor"] = _Cursor(self)
        return cursor.read(i, max_bytes)

    def close(self) -> None:
        """Close this process's open shard streams (they also close when the corpus is collected)."""
        cursor = self._state.pop("cursor", None)
        if cursor is not None and cursor.pid == os.getpid():
            cursor.close()


class _ShardStream:
    """One shard read forward, reopened and skipped to where it was after a failure, up to retry.attempts."""

    def __init__(self, url: str, retry: Retry):
        self.url, self.retry = url, retry
        self.pos = 0  # samples handed out
        self.failures = 0
        self.max_bytes: int | None = None
        self._skipping = False
        self._file: io.BufferedIOBase | None = None
        self._it: Generator[Sample, None, None] | None = None

    def next(self) -> Sample:
        while True:
            try:
                if self._it is None:
                    self._file = open_shard(self.url)
                    self._it = iter_samples(self.url, self._file, is_local(self.url), self._want)
                    self._skipping = True
                    for _ in range(self.pos):  # already handed out before the failure
                        next(self._it)
                    self._skipping = False
                sample = next(self._it)
                self.pos += 1
                return sample
            except StopIteration:
                raise CorpusError(
                    f"WebDataset shard {self.url} ended after {self.pos} sample(s), fewer than when it "
                    "was listed: it changed; delete its listing (see BIOMED_DISTILL_LISTINGS) and rerun"
                ) from None
            except CorpusError:
                raise
            except Exception as e:  # noqa: BLE001 - retried: the transport's errors have no common base
                self.close()
                self.failures += 1
                if self.failures >= self.retry.attempts:
                    raise ReadFailure(f"{SHARD_UNREADABLE} after {self.failures} attempt(s) ({why(e)})") from e
                log.warning(
                    "%s: read failed (%s); attempt %d of %d", self.url, why(e), self.failures + 1, self.retry.attempts
                )
                self.retry.wait(self.failures)

    def _want(self, size: int) -> bool:
        return not self._skipping and (self.max_bytes is None or size <= self.max_bytes)

    def close(self) -> None:
        if self._it is not None:
            self._it.close()
        if self._file is not None:
            try:
                self._file.close()
            except OSError:  # a pipe that failed: its status was reported already or no longer matters
                pass
        self._file = self._it = None


class _Cursor:
    """One process's open shard streams (a few, least recently used closed first) and read-ahead rows."""

    MAX_OPEN = 4

    def __init__(self, corpus: StreamCorpus):
        self.pid, self.c = os.getpid(), corpus
        self.streams: OrderedDict[int, _ShardStream] = OrderedDict()
        self.ahead: OrderedDict[int, bytes | None] = OrderedDict()
        self.failed: dict[int, str] = {}

    def read(self, i: int, max_bytes: int | None) -> bytes:
        c = self.c
        if i in self.ahead:
            data = self.ahead.pop(i)
            if data is not None:
                return data
        s = int(c.shard_of[i])
        pos = i - int(c.first_row[s])
        if s in self.failed:
            raise ShardUnreadable(c.keys[i], self.failed[s], c.shards[s])
        st = self.streams.get(s)
        if st is None or st.pos > pos:  # not open, or already past row i: from the start of the shard
            if st is not None:
                st.close()
            st = self.streams[s] = _ShardStream(c.shards[s], c.options.retry)
            while len(self.streams) > self.MAX_OPEN:
                self.streams.popitem(last=False)[1].close()
        self.streams.move_to_end(s)
        st.max_bytes = max_bytes
        while True:
            try:
                sample = st.next()
            except ReadFailure as e:
                self.failed[s] = str(e)
                self.streams.pop(s).close()
                raise ShardUnreadable(c.keys[i], str(e), c.shards[s]) from None
            j = int(c.first_row[s]) + st.pos - 1
            if j >= len(c.keys) or c.shard_of[j] != s or sample.key != c.keys[j] or sample.caption != c.captions[j]:
                raise CorpusError(
                    f"WebDataset shard {c.shards[s]} sample {st.pos} is {sample.key!r}, its listing "
                    f"says {c.keys[j] if j < len(c.keys) and c.shard_of[j] == s else 'none'!r} (or "
                    "the caption differs): the shard changed since it was listed; delete its listing "
                    f"({ListingStore(c.options.listing or listing_dir()).path(c.shards[s])}) and "
                    "rebuild the cache"
                )
            if j == i:
                if sample.image is None:  # over this call's byte bound when read ahead under another
                    raise BadSampleError(c.keys[i], "image member not read (over the byte limit)", c.describe(i))
                return sample.image
            if c.options.read_ahead > 0:
                self.ahead[j] = sample.image
                while len(self.ahead) > c.options.read_ahead:
                    self.ahead.popitem(last=False)

    def close(self) -> None:
        for st in self.streams.values():
            st.close()
        self.streams.clear()
        self.ahead.clear()


def _open(path: str, stream: StreamOptions | None = None) -> StreamCorpus:
    return StreamCorpus(path, stream or StreamOptions())


register_format(
    Format(
        "stream",
        "WebDataset shards by URL (file://, s3://, gs://, https://) or a pipe: command",
        is_stream_spec,
        corpus=_open,
    )
)
