"""WebDataset corpora: `.tar` shards (a folder, one file, or a brace pattern) read with the stdlib `tarfile`.

Each shard is indexed once at open: for every sample (`__key__` = member path up to the first dot of its file
name, WebDataset's rule) we keep the caption (`txt`, needed for the fingerprint anyway) and the byte offset and
size of its image member, so `load_image(i)` is one seek and one read, with no re-scan of the tar.
"""
from __future__ import annotations

import glob
import os
import re
import tarfile

from PIL import Image

from .corpus import IMAGE_EXTS, BadSampleError, Corpus, CorpusError, decode_image

_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")
_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """`a/{000..002}.tar` -> a/000.tar, a/001.tar, a/002.tar; `{x,y}` lists too; nested left to right."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    head, body, tail = pattern[:m.start()], m.group(1), pattern[m.end():]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        a, b = rng.groups()
        width = max(len(a), len(b)) if (a.startswith("0") or b.startswith("0")) else 0
        lo, hi = int(a), int(b)
        step = 1 if hi >= lo else -1
        items = [str(i).zfill(width) for i in range(lo, hi + step, step)]
    else:
        items = body.split(",")
    return [p for item in items for p in expand_braces(head + item + tail)]


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
        raise CorpusError(f"WebDataset {path}: {len(missing)} of {len(shards)} shard(s) not found, "
                          f"first {missing[0]}")
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
                    raise CorpusError(f"WebDataset {path}: duplicate __key__ {key!r} in {shard} "
                                      f"(first seen in {seen[key]}); keys must be unique across shards")
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
                    if not m.isfile():
                        continue
                    match = _KEY_EXT.match(m.name)
                    if match is None or os.path.basename(m.name).startswith("__"):
                        continue
                    key, ext = match.group(1), match.group(2).lower()
                    if key not in samples:
                        samples[key] = {}
                        order.append(key)
                    s = samples[key]
                    if ext == "txt":
                        f = tar.extractfile(m)
                        try:
                            s["txt"] = f.read().decode("utf-8").strip()
                        except UnicodeDecodeError as e:
                            raise CorpusError(f"{shard}: caption {m.name} is not UTF-8 ({e})") from e
                    elif ext in IMAGE_EXTS and "image" not in s:
                        s["image"] = (s_idx, m.offset_data, m.size)
        except tarfile.TarError as e:
            raise CorpusError(f"WebDataset shard {shard} is not a readable tar file ({e})") from e
        for key in order:
            s = samples[key]
            yield key, s.get("txt", ""), s.get("image")

    def describe(self, i: int) -> str:
        return f"{self.shards[self._shard_of[i]]} sample {self.keys[i]!r}"

    def load_image(self, i: int) -> Image.Image:
        where = self.describe(i)
        loc = self._image[i]
        if loc is None:
            raise BadSampleError(self.keys[i], f"no image member ({'/'.join(IMAGE_EXTS)})", where)
        s_idx, offset, size = loc
        with open(self.shards[s_idx], "rb") as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise BadSampleError(self.keys[i], f"image member truncated in {self.shards[s_idx]}", where)
        return decode_image(data, None, self.keys[i], where)
