"""Hostile image bytes for the image-limit and fuzz tests, made without ever holding a decoded image in memory."""

from __future__ import annotations

import functools
import io
import struct
import zlib

from PIL import Image


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


@functools.lru_cache(maxsize=4)
def png_bomb(width: int = 12000, height: int = 12000) -> bytes:
    """A valid 1-bit grayscale PNG of width x height black pixels: ~17 KB for 12000 x 12000 (144 Mpx).

    Written row by row through zlib, so making it costs one row of memory, unlike Image.new (1 byte per pixel)."""
    row = b"\x00" + bytes((width + 7) // 8)  # filter type 0, then the packed 1-bit pixels
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, grayscale
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def png_bytes(color: tuple[int, int, int], size: tuple[int, int] = (6, 5)) -> bytes:
    """A small solid-colour RGB PNG."""
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()
