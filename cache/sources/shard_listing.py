"""Reading one WebDataset shard front to back (tarfile `r|`, or `r:` seeking over image bytes for `file://`), and
the shard listings that give a streamed corpus its keys before any image is read (`cache.sources.stream`).

A listing is one JSON file per shard URL (its keys, captions and image member sizes; no pickle), under
`listing_dir()`, written atomically, so a listing pass that is interrupted or split over several processes
resumes where it stopped. A shard that fails is tried `Retry.attempts` times; every failure that a retry may cure
(transport errors, a cut stream) is a `ReadFailure`, while a shard that is itself wrong (an unsafe member name, a
caption that is not UTF-8) is a CorpusError, as for local shards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tarfile
from collections import deque
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, NamedTuple

from tqdm.auto import tqdm

from cache.sources.base import IMAGE_EXTS, CorpusError
from cache.sources.shard_io import Retry, is_local, open_shard
from cache.sources.webdataset import check_key, is_end_block, member_file, member_key, read_caption

log = logging.getLogger(__name__)

LISTING_ENV = "BIOMED_DISTILL_LISTINGS"
# the reason of every ShardUnreadable starts so (cache.build.run tells them apart)
SHARD_UNREADABLE = "shard unreadable"
_FORMAT = "biomed-distill shard listing"


def listing_dir() -> str:
    """Where shard listings live: $BIOMED_DISTILL_LISTINGS, else ~/.cache/biomed-distill/listings (put it on a
    file system every node sees when several nodes cache one corpus)."""
    return os.environ.get(LISTING_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "biomed-distill", "listings")


class ReadFailure(Exception):
    """A shard read that may pass on a retry: the transport failed, or the stream ended early."""


class Sample(NamedTuple):
    key: str
    caption: str
    size: int  # bytes of its image member, -1: none
    image: bytes | None  # read only when asked


@dataclass
class ShardListing:
    url: str
    keys: list[str]
    captions: list[str]
    sizes: list[int]

    def to_json(self) -> dict:
        return {
            "format": _FORMAT,
            "version": 1,
            "url": self.url,
            "keys": self.keys,
            "captions": self.captions,
            "sizes": self.sizes,
        }


class _Tail:
    """A read-only stream that remembers its last bytes, so the end-of-archive block can be checked after tarfile
    streamed past it (a cut at a member boundary would otherwise end the shard silently)."""

    KEEP = 4 * tarfile.RECORDSIZE

    def __init__(self, f) -> None:
        self.f, self.pos = f, 0
        self._chunks: deque[bytes] = deque()  # the last reads, at least KEEP bytes in all (not copied per read:
        self._held = 0  # skipping a 600 MB member takes 60,000 reads)

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.pos += len(data)
        kept = data if len(data) <= self.KEEP else data[-self.KEEP :]
        self._chunks.append(kept)
        self._held += len(kept)
        while self._chunks and self._held - len(self._chunks[0]) >= self.KEEP:
            self._held -= len(self._chunks.popleft())
        return data

    def block_at(self, offset: int) -> bytes:
        if offset + tarfile.BLOCKSIZE > self.pos:
            self.read(offset + tarfile.BLOCKSIZE - self.pos)
        tail = b"".join(self._chunks)[-self.KEEP :]
        start = self.pos - len(tail)
        return tail[offset - start : offset - start + tarfile.BLOCKSIZE] if offset >= start else b""


def iter_samples(url: str, f, seek: bool, want_image: Callable[[int], bool]) -> Generator[Sample, None, None]:
    """The samples of one open shard in member order; `seek`: skip member bytes by seeking (`r:`), else stream
    (`r|`). A sample's members must be next to each other (they are, as webdataset writes them)."""
    src = f if seek else _Tail(f)
    try:
        # typeshed's _Fileobj asks for write/seek/tell/close too; reading ("r:" on f, "r|" on a _Tail) only reads
        tar = tarfile.open(fileobj=src, mode="r:" if seek else "r|")  # type: ignore[call-overload]
    except (tarfile.TarError, EOFError) as e:
        raise ReadFailure(f"not a readable tar stream ({e})") from e
    key: str | None = None
    cur: dict[str, Any] = {}
    seen: set[str] = set()
    try:
        for m in tar:
            named = member_key(url, m)
            if named is None:
                continue
            k, ext = named
            if k != key:
                if key is not None:
                    yield _sample(url, key, cur)
                if k in seen:
                    raise CorpusError(
                        f"WebDataset shard {url}: the files of sample {k!r} are not next to each other; "
                        "a streamed shard needs each sample's files together (rewrite the shard)"
                    )
                seen.add(k)
                key, cur = k, {}
            if ext == "txt":
                cur["txt"] = read_caption(url, m.name, member_file(tar, m))
            elif ext in IMAGE_EXTS and "size" not in cur:
                cur["size"] = m.size
                if want_image(m.size):
                    cur["image"] = member_file(tar, m).read()
        end = tar.offset
    except CorpusError:  # the shard itself is wrong (unsafe name, bad caption): no retry helps
        raise
    except (tarfile.TarError, EOFError, ValueError, OverflowError) as e:
        raise ReadFailure(f"not a readable tar stream ({e})") from e
    if seek:
        f.seek(end)
        block = f.read(tarfile.BLOCKSIZE)
    else:
        block = src.block_at(end)
    if not is_end_block(block):
        raise ReadFailure(f"truncated: no tar end-of-archive marker after byte {end}")
    if key is not None:
        yield _sample(url, key, cur)


def _sample(url: str, key: str, cur: dict) -> Sample:
    check_key(url, key)
    return Sample(key, cur.get("txt", ""), cur.get("size", -1), cur.get("image"))


def list_shard(url: str, retry: Retry) -> ShardListing:
    """Keys, captions and image sizes of one shard, tried `retry.attempts` times; ReadFailure after the last."""
    failures = 0
    while True:
        try:
            with open_shard(url) as f:
                got = list(iter_samples(url, f, is_local(url), lambda size: False))
            return ShardListing(url, [s.key for s in got], [s.caption for s in got], [s.size for s in got])
        except CorpusError:
            raise
        except Exception as e:  # noqa: BLE001 - a transport's errors have no common base; they are retried
            failures += 1
            if failures >= retry.attempts:
                raise ReadFailure(f"{SHARD_UNREADABLE} after {failures} attempt(s) ({why(e)})") from e
            retry.wait(failures)


def why(e: Exception) -> str:
    return f"{type(e).__name__}: {e}" if not isinstance(e, ReadFailure) else str(e)


class ListingStore:
    """One JSON file per shard URL (named by its hash), written atomically; unreadable files are listed again."""

    def __init__(self, root: str):
        self.root = root

    def path(self, url: str) -> str:
        return os.path.join(self.root, hashlib.sha256(url.encode("utf-8")).hexdigest()[:32] + ".json")

    def load(self, url: str) -> ShardListing | None:
        try:
            with open(self.path(url), encoding="utf-8") as f:
                d = json.load(f)
        except (OSError, ValueError):
            return None
        if d.get("format") != _FORMAT or d.get("url") != url:
            return None
        return ShardListing(url, list(d["keys"]), list(d["captions"]), [int(x) for x in d["sizes"]])

    def save(self, listing: ShardListing) -> None:
        os.makedirs(self.root, exist_ok=True)
        path = self.path(listing.url)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(listing.to_json(), f)
        os.replace(tmp, path)


def list_shards(urls: list[str], retry: Retry, root: str | None = None, progress: bool = False) -> dict[str, str]:
    """List every shard of `urls` without a listing yet; returns the ones that failed (URL -> reason)."""
    store = ListingStore(root or listing_dir())
    todo = [u for u in urls if store.load(u) is None]
    failed = {}
    for url in tqdm(todo, desc="list shards", unit="shard", disable=not (progress and todo)):
        try:
            store.save(list_shard(url, retry))
        except ReadFailure as e:
            failed[url] = str(e)
            log.warning("%s: %s", url, e)
    return failed
