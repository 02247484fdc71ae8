"""WebDataset corpora: `.tar` shards (a folder, one file, or a brace pattern) read with the stdlib `tarfile`.

Each shard is indexed once at open: for every sample (`__key__` = member path up to the first dot of its file
name, WebDataset's rule) we keep the caption (`txt`, needed for the fingerprint anyway) and the byte offset and
size of its image member, so `load_image(i)` is one seek and one read, with no re-scan of the tar.

Nothing is ever extracted: members are read at their offset inside the shard, links are ignored, and a shard
with an absolute or `..` member name is refused (a sign of a hostile or broken shard). A shard cut short is
refused too (tarfile alone would silently end at the cut), naming the shard. Indexing reads no member but the
captions, and of each only its first MAX_CAPTION_BYTES; an image member over `DecodeLimits.max_bytes` (what no
image within the pixel limit needs) is a bad sample without being read.
"""

from __future__ import annotations

import glob
import os
import re
import tarfile
from typing import IO, cast

from PIL import Image

from cache.sources.base import (
    IMAGE_EXTS,
    MAX_CAPTION_BYTES,
    BadSampleError,
    Corpus,
    CorpusError,
    cap_utf8,
    text_problem,
    utf8_problem,
)
from cache.sources.formats import Format, register_format
from cache.sources.image_decode import decode_image
from cache.sources.shard_io import expand_braces, is_stream_spec  # noqa: F401  (expand_braces: re-exported)

_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


def shard_paths(path: str) -> list[str]:
    """The shard files a WebDataset path names, in order; errors name what was looked for."""
    if os.path.isdir(path):
        shards = sorted(glob.glob(os.path.join(path, "*.tar")))
        if not shards:
            raise CorpusError(f"WebDataset folder {path} holds no .tar shards")
        return shards
    shards = expand_braces(path)
    missing = [s for s in shards if not os.path.isfile(s)]
    if missing:
        raise CorpusError(f"WebDataset {path}: {len(missing)} of {len(shards)} shard(s) not found, first {missing[0]}")
    return shards


class WebDatasetCorpus(Corpus):
    """Samples from WebDataset tar shards, in shard order then member order."""

    def __init__(self, path: str):
        self.source = path
        self._fingerprint = None
        self.shards = shard_paths(path)
        self.keys = []
        self.captions = []
        self._image: list[tuple[int, int, int] | None] = []  # (shard index, data offset, size)
        self._shard_of: list[int] = []
        seen: dict[str, str] = {}
        for s_idx, shard in enumerate(self.shards):
            for key, caption, image in self._index_shard(shard, s_idx):
                if key in seen:
                    raise CorpusError(
                        f"WebDataset {path}: duplicate __key__ {key!r} in {shard} "
                        f"(first seen in {seen[key]}); keys must be unique across shards"
                    )
                seen[key] = shard
                self.keys.append(key)
                self.captions.append(caption)
                self._image.append(image)
                self._shard_of.append(s_idx)
        if not self.keys:
            raise CorpusError(f"WebDataset {path}: no samples in {len(self.shards)} shard(s)")

    @staticmethod
    def _index_shard(shard: str, s_idx: int):
        samples: dict[str, dict] = {}
        order: list[str] = []
        try:
            with tarfile.open(shard, "r:") as tar:
                for m in tar:
                    named = member_key(shard, m)
                    if named is None:
                        continue
                    key, ext = named
                    if key not in samples:
                        samples[key] = {}
                        order.append(key)
                    s = samples[key]
                    if ext == "txt":
                        s["txt"] = read_caption(shard, m.name, member_file(tar, m))
                    elif ext in IMAGE_EXTS and "image" not in s:
                        s["image"] = (s_idx, m.offset_data, m.size)
                end = tar.offset  # where tarfile stopped: the end-of-archive marker, or the cut
        except CorpusError:
            raise
        except (tarfile.TarError, EOFError, ValueError, OverflowError) as e:
            raise CorpusError(
                f"WebDataset shard {shard} is not a readable tar file ({e}); copy or write it again"
            ) from e
        _check_complete(shard, end)
        for key in order:
            check_key(shard, key)
            s = samples[key]
            yield key, s.get("txt", ""), s.get("image")

    def describe(self, i: int) -> str:
        return f"{self.shards[self._shard_of[i]]} sample {self.keys[i]!r}"

    def load_image(self, i: int) -> Image.Image:
        return decode_image(self.load_bytes(i), None, self.keys[i], self.describe(i), self.limits)

    def load_bytes(self, i: int) -> bytes:
        where = self.describe(i)
        loc = self._image[i]
        if loc is None:
            raise BadSampleError(self.keys[i], f"no image member ({'/'.join(IMAGE_EXTS)})", where)
        s_idx, offset, size = loc
        max_bytes = self.limits.max_bytes
        if max_bytes is not None and size > max_bytes:  # larger than any image within the pixel limit
            raise BadSampleError(
                self.keys[i],
                f"image member is {size / 2**20:.0f} MiB, larger than any image "
                f"within the pixel limit ({self.limits.hint}); not read",
                where,
            )
        with open(self.shards[s_idx], "rb") as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise BadSampleError(self.keys[i], f"image member truncated in {self.shards[s_idx]}", where)
        return data


def member_key(shard: str, m: tarfile.TarInfo) -> tuple[str, str] | None:
    """(`__key__`, lower-case extension) of a sample's file member; None for links, folders, `__` names and names
    without an extension. An unsafe name is refused. Shared with the streamed reader (`cache.sources.stream`)."""
    _check_member_name(shard, m.name)
    if not m.isfile():
        return None
    match = _KEY_EXT.match(m.name)
    if match is None or os.path.basename(m.name).startswith("__"):
        return None
    return match.group(1), match.group(2).lower()


def member_file(tar: tarfile.TarFile, m: tarfile.TarInfo) -> IO[bytes]:
    """The bytes of member `m`, a regular file (`member_key` keeps only those, for which extractfile is not None)."""
    return cast("IO[bytes]", tar.extractfile(m))


def read_caption(shard: str, name: str, member: IO[bytes]) -> str:
    """A `txt` member's caption: its first MAX_CAPTION_BYTES only are read (cut at a character boundary; a longer
    caption is no use to a tokenizer and costs memory in every worker). Bytes that are not UTF-8 are refused,
    naming the member, line and column."""
    data = cap_utf8(member.read(MAX_CAPTION_BYTES + 1))
    bad = utf8_problem(data)
    if bad:
        raise CorpusError(
            f"{shard}: caption {name} line {bad[0]}: not UTF-8 (byte {bad[2]} at column {bad[1]}); "
            "save captions as UTF-8"
        )
    return data.decode("utf-8").strip()


def check_key(shard: str, key: str) -> None:
    problem = text_problem(key, is_key=True)
    if problem:
        raise CorpusError(f"{shard}: sample key {key!r} {problem}; rename that member")


def is_end_block(block: bytes) -> bool:
    """A tar's real end: a whole zero block (tarfile alone ends silently at a cut after any member)."""
    return len(block) == tarfile.BLOCKSIZE and not block.strip(b"\0")


def _check_member_name(shard: str, name: str) -> None:
    """Refuse absolute and `..` member names: nothing here extracts, but such a shard is hostile or broken."""
    if name.startswith(("/", "\\")) or ".." in re.split(r"[/\\]", name) or re.match(r"^[A-Za-z]:", name):
        raise CorpusError(
            f"WebDataset shard {shard}: member {name!r} has an unsafe name (absolute, or with "
            f"'..'); member names must be relative paths inside the shard, so rewrite the shard"
        )


def _check_complete(shard: str, end: int) -> None:
    """tarfile treats a cut after the first member as the end of the archive; a real end is a zero block."""
    with open(shard, "rb") as f:
        f.seek(end)
        block = f.read(tarfile.BLOCKSIZE)
    if not is_end_block(block):
        raise CorpusError(
            f"WebDataset shard {shard} is truncated (it ends at byte {os.path.getsize(shard)} "
            f"without the tar end-of-archive marker after byte {end}); copy or write it again"
        )


def _is_local_shards(path: str) -> bool:
    """A folder (of .tar shards), a .tar file, or a brace pattern; URLs and `pipe:` are the stream format's."""
    return not is_stream_spec(path) and (os.path.isdir(path) or path.lower().endswith(".tar") or "{" in path)


def _open(path: str, stream=None) -> WebDatasetCorpus:
    return WebDatasetCorpus(path)


register_format(
    Format(
        "webdataset",
        "a folder of .tar shards, a .tar file, or a brace pattern such as shards/{00000..00009}.tar",
        _is_local_shards,
        corpus=_open,
    )
)
