"""Opening WebDataset shards named by URL: fsspec for `file://`, `s3://`, `gs://`, `https://`, ..., and
webdataset's `pipe:CMD` convention (a shell command whose stdout is the tar stream, e.g. `pipe:curl -s URL`).

Why fsspec: one `open(url)` for every object store, with each store's own package (s3fs, gcsfs, aiohttp) installed
only by those who need it; a scheme whose package is missing is one line naming it, before anything is read.
Why retries live here: a remote read fails for reasons that pass (a dropped connection, a throttled request), so
every shard gets `Retry.attempts` tries with exponential backoff before it is called unreadable.
"""

from __future__ import annotations

import io
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import cast

from cache.sources.base import CorpusError

_BRACE = re.compile(r"\{([^{}]*)\}")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
PIPE = "pipe:"
# what to install for a scheme whose fsspec implementation is missing (fsspec's own hint for the others)
_PACKAGES = {
    "s3": "s3fs",
    "s3a": "s3fs",
    "gs": "gcsfs",
    "gcs": "gcsfs",
    "http": "aiohttp requests",
    "https": "aiohttp requests",
    "az": "adlfs",
    "abfs": "adlfs",
    "hf": "huggingface_hub",
}


def expand_braces(pattern: str) -> list[str]:
    """`a/{000..002}.tar` -> a/000.tar, a/001.tar, a/002.tar; `{x,y}` lists too; nested left to right."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    head, body, tail = pattern[: m.start()], m.group(1), pattern[m.end() :]
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


def is_stream_spec(path: str) -> bool:
    """True for a URL (`SCHEME://...`) or a `pipe:` command: shards read as streams, not as local files."""
    return path.startswith(PIPE) or _SCHEME.match(path) is not None


def is_local(url: str) -> bool:
    """`file://` shards: seekable, so listing them skips image bytes instead of reading through them."""
    m = _SCHEME.match(url)
    return m is not None and m.group(1).lower() in ("file", "local")


def shard_urls(spec: str) -> list[str]:
    """The shard URLs a spec names (brace ranges expanded), each scheme checked to be readable here."""
    urls = expand_braces(spec)
    for scheme in sorted({_scheme(u) for u in urls}):
        _check_scheme(scheme, spec)
    return urls


def _scheme(url: str) -> str:
    if url.startswith(PIPE):
        return PIPE
    m = _SCHEME.match(url)
    return m.group(1).lower() if m else ""


def _check_scheme(scheme: str, spec: str) -> None:
    if scheme == PIPE:
        if not spec[len(PIPE) :].strip():
            raise CorpusError(f"{spec!r}: a pipe: shard needs a command after 'pipe:' (e.g. pipe:curl -s URL)")
        return
    import fsspec  # noqa: PLC0415 (lazy: fsspec kept off the light CLI path; URL shards only)
    from fsspec.registry import known_implementations  # noqa: PLC0415 (lazy: fsspec kept off the light CLI path; URL shards only)

    try:
        fsspec.get_filesystem_class(scheme)
    except ImportError:
        package = _PACKAGES.get(scheme) or known_implementations.get(scheme, {}).get("err", "its fsspec package")
        raise CorpusError(f"{spec}: reading {scheme}:// shards needs {package} (pip install {package})") from None
    except ValueError:
        raise CorpusError(
            f"{spec}: unknown URL scheme {scheme}://; use file://, s3://, gs://, https:// or pipe:COMMAND"
        ) from None


def open_shard(url: str) -> io.BufferedIOBase:
    """A readable binary stream of one shard; the caller closes it (a pipe's exit status is checked at its end)."""
    if url.startswith(PIPE):
        return io.BufferedReader(_PipeReader(url[len(PIPE) :]), 1 << 20)
    import fsspec  # noqa: PLC0415 (lazy: fsspec kept off the light CLI path; URL shards only)

    return fsspec.open(url, "rb").open()


class _PipeReader(io.RawIOBase):
    """stdout of a shell command; a non-zero exit is an OSError at the end of the stream (a failed download must
    not look like a short shard). stderr goes to a temporary file, so a chatty command cannot block on it."""

    def __init__(self, cmd: str):
        self.cmd = cmd
        self.err = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, shell=True, stdout=subprocess.PIPE, stderr=self.err)
        # stdout=PIPE with the default buffering: Popen opens it as a BufferedReader
        self.stdout = cast(io.BufferedReader, self.proc.stdout)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self.stdout.readinto(b)
        if n == 0:
            rc = self.proc.wait()
            if rc != 0:
                self.err.seek(0)
                tail = self.err.read()[-300:].decode("utf-8", "replace").strip()
                raise OSError(f"command {self.cmd!r} exited with status {rc}" + (f": {tail}" if tail else ""))
        return n

    def close(self) -> None:
        if not self.closed:
            if self.proc.poll() is None:  # abandoned before its end (a reopened or failed shard)
                self.proc.kill()
            self.stdout.close()
            self.proc.wait()
            self.err.close()
        super().close()


@dataclass(frozen=True)
class Retry:
    """How hard a shard is tried: `attempts` opens/reads in all, waiting backoff_s x 2^(k-1) (at most 60 s)
    after the k-th failure."""

    attempts: int = 3
    backoff_s: float = 1.0

    def __post_init__(self):
        if self.attempts < 1 or self.backoff_s < 0:
            raise CorpusError(
                f"shard attempts must be >= 1 and backoff >= 0 s, got {self.attempts} and {self.backoff_s}"
            )

    def wait(self, failures: int) -> None:
        time.sleep(min(60.0, self.backoff_s * 2 ** (failures - 1)))
