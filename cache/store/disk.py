"""Every HDF5 file `distill cache` writes goes through `h5_on_disk`: a full disk becomes one OSError, never a crash.

Why: when a write fails inside HDF5 (no space, quota, file-size limit), h5py raises, and closing the file then
retries the failed flush inside HDF5, which segfaults the process (h5py 3.16 / HDF5 2.0: exit 139, after a
traceback and "internal error"). Here HDF5 writes through a Python file object (`DiskFile`, h5py's fileobj
driver): the first failed write is recorded and every later write is dropped, so HDF5 never sees an error and
closes cleanly; the recorded OSError (errno kept, the file named) is raised once the file is closed, and the
caller removes its temporary. Only files about to be discarded see dropped writes: the error is always raised.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator

import h5py
import numpy as np


def pwrite_all(fd: int, data, offset: int) -> None:
    """Write all of `data` at `offset` (os.pwrite may write less than asked)."""
    mv = memoryview(data).cast("B")
    while len(mv):
        n = os.pwrite(fd, mv, offset)
        mv, offset = mv[n:], offset + n


class DiskFile(io.RawIOBase):
    """A file object for h5py that records the first failed write and drops the rest (see the module docstring).

    `sparse`: leave a hole where HDF5 writes zero pages (a segment allocates every checksummed chunk at creation,
    and a zero chunk's fletcher32 is zero too: writing those zeros would write the data twice).
    """

    PAGE = 1 << 16

    def __init__(self, path: str, mode: str = "w", sparse: bool = False):
        super().__init__()
        flags = os.O_RDWR | (os.O_CREAT | os.O_TRUNC if mode == "w" else 0)
        self.fd = os.open(path, flags, 0o644)
        self.name, self.sparse = path, sparse
        self.pos, self.size = 0, os.fstat(self.fd).st_size
        self.error: OSError | None = None

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, off: int, whence: int = 0) -> int:
        self.pos = off if whence == 0 else self.pos + off if whence == 1 else self.size + off
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, b) -> int:
        mv = memoryview(b).cast("B")
        n = os.preadv(self.fd, [mv], self.pos)
        want = min(len(mv), max(0, self.size - self.pos))
        if n < want:  # a trailing hole not yet extended (sparse), or a dropped write: zeros
            mv[n:want] = bytes(want - n)
            n = want
        self.pos += n
        return n

    def write(self, b) -> int:
        mv = memoryview(b).cast("B")
        n = len(mv)
        if self.error is None:
            try:
                self._write(mv)
            except OSError as e:  # recorded, never raised into HDF5 (see the module docstring)
                self.error = e
        self.pos += n
        self.size = max(self.size, self.pos)
        return n

    def _write(self, mv: memoryview) -> None:
        n, p = len(mv), self.PAGE
        if not self.sparse:
            pwrite_all(self.fd, mv, self.pos)
            return
        pages = np.frombuffer(mv[: n // p * p], np.uint8).reshape(-1, p).any(axis=1) if n >= p else np.zeros(0, bool)
        keep = np.r_[pages, bool(np.frombuffer(mv[n // p * p :], np.uint8).any())] if n % p else pages
        edges = np.flatnonzero(np.diff(np.r_[0, keep.astype(np.int8), 0]))
        for a, z in zip(edges[::2].tolist(), edges[1::2].tolist()):  # runs of non-zero pages
            pwrite_all(self.fd, mv[a * p : min(n, z * p)], self.pos + a * p)

    def truncate(self, size: int | None = None) -> int:
        size = self.pos if size is None else size
        if self.error is None:
            try:
                os.ftruncate(self.fd, size)
            except OSError as e:
                self.error = e
        self.size = size
        return size

    def close(self) -> None:
        """Extend the file to its full size (a sparse file's trailing hole), fsync, close; errors recorded."""
        if self.fd >= 0:
            if self.error is None:
                try:
                    os.ftruncate(self.fd, max(self.size, os.fstat(self.fd).st_size))
                    os.fsync(self.fd)
                except OSError as e:
                    self.error = e
            os.close(self.fd)
            self.fd = -1
        super().close()


@contextlib.contextmanager
def h5_on_disk(path: str, mode: str = "w", sparse: bool = False, **kw) -> Iterator[h5py.File]:
    """`h5py.File(path, mode)` ("w" or "r+") written through a `DiskFile`, fsynced on close; a failed write is
    raised after the close as OSError(errno, strerror, path). The caller removes a temporary `path` on error."""
    fo = DiskFile(path, mode, sparse)
    try:
        with h5py.File(fo, mode, **kw) as f:
            yield f
    except BaseException as e:
        fo.close()
        if fo.error is not None:  # the write that failed first is the cause of whatever HDF5 said next
            raise _named(fo.error, path) from e
        raise
    fo.close()
    if fo.error is not None:
        raise _named(fo.error, path)


def _named(e: OSError, path: str) -> OSError:
    return OSError(e.errno, e.strerror or str(e), path) if e.errno is not None else e
