"""Decoding one corpus image safely: a pixel limit checked before decoding, and reduced JPEG decodes.

Hostile or unlucky images must cost a recorded bad sample, never a worker's memory or a traceback:

- `Image.open` only reads the header, so width x height is checked against `DecodeLimits.max_pixels` before a
  single pixel is decoded (a 17 KB PNG can claim 12000 x 12000 = 144 Mpx, ~430 MB as RGB). PIL's own
  decompression-bomb warning is replaced by that check; PIL's hard error (twice its limit) still applies and
  becomes the same bad sample.
- Only common raster formats are opened (`FORMATS`): PIL's EPS plugin, for one, would run Ghostscript.
- JPEGs much larger than any model needs are decoded at 1/2, 1/4 or 1/8 scale (`DecodeLimits.draft_side`).
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass

from PIL import Image

DEFAULT_MAX_PIXELS = 64_000_000  # below PIL's own warning limit (Image.MAX_IMAGE_PIXELS, ~89 Mpx)
FORMATS = ("JPEG", "PNG", "WEBP", "TIFF", "BMP", "GIF", "PPM", "JPEG2000")  # JPEG covers MPO
# The one list of image file name endings: class folders, WebDataset members (without the dot: IMAGE_EXTS).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
MAX_BYTES_PER_PIXEL = 8  # 16-bit RGBA, uncompressed: no image within the pixel limit is stored in more


class BadSampleError(Exception):
    """One sample cannot be used (missing or corrupt image, empty caption); the cache may skip it."""

    def __init__(self, key: str, reason: str, where: str | None = None):
        self.key = key
        self.reason = reason
        self.where = where
        super().__init__(f"{where or f'key {key!r}'}: {reason}")


@dataclass(frozen=True)
class DecodeLimits:
    """How far decoding one image may go.

    max_pixels: width x height above which the image is a bad sample, refused before decoding (None: PIL's own
        Image.MAX_IMAGE_PIXELS).
    draft_side: the shorter side the models need (0: decode in full). A JPEG whose shorter side is at least twice
        this is decoded by libjpeg at the largest 1/2, 1/4 or 1/8 scale that keeps its shorter side >= draft_side.
        This changes the pixels of such large JPEGs only (a DCT-domain downscale instead of a full decode), never
        of smaller JPEGs or of other formats.
    hint: the setting to name in the over-the-limit message.
    """

    max_pixels: int | None = DEFAULT_MAX_PIXELS
    draft_side: int = 0
    hint: str = "--max-pixels"

    def __post_init__(self):
        if self.max_pixels is not None and self.max_pixels < 1:
            raise ValueError(f"max_pixels must be >= 1 (or None for PIL's limit), got {self.max_pixels}")
        if self.draft_side < 0:
            raise ValueError(f"draft_side must be >= 0, got {self.draft_side}")

    @property
    def pixel_limit(self) -> int | None:
        return self.max_pixels if self.max_pixels is not None else Image.MAX_IMAGE_PIXELS

    @property
    def max_bytes(self) -> int | None:
        """No image within the pixel limit takes more bytes than this (tar members larger are not read)."""
        limit = self.pixel_limit
        return None if limit is None else limit * MAX_BYTES_PER_PIXEL + (16 << 20)


def _mpx(pixels: int) -> str:
    return f"{pixels / 1e6:.0f}" if pixels >= 10e6 else f"{pixels / 1e6:.2g}"


def check_size(img: Image.Image, limits: DecodeLimits) -> str | None:
    """Why an opened (not yet decoded) image is too large, or None."""
    w, h = img.size
    limit = limits.pixel_limit
    if limit is not None and w * h > limit:
        source = limits.hint if limits.max_pixels is not None else "PIL's Image.MAX_IMAGE_PIXELS"
        return f"image is {w}x{h} = {_mpx(w * h)} Mpx, over the {_mpx(limit)} Mpx limit ({source})"
    return None


def _draft(img: Image.Image, side: int) -> None:
    """Ask libjpeg for a reduced decode when the JPEG's shorter side is at least twice `side`."""
    if side > 0 and img.format in ("JPEG", "MPO") and min(img.size) >= 2 * side:
        img.draft("RGB", (side, side))  # PIL picks the scale so that both sides stay >= side


def _decode(fp, key: str, where: str, limits: DecodeLimits) -> Image.Image:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # replaced by check_size
        with Image.open(fp, formats=FORMATS) as img:
            too_big = check_size(img, limits)
            if too_big:
                raise BadSampleError(key, too_big, where)
            _draft(img, limits.draft_side)
            img.load()  # force the full decode: truncated files fail here, not inside a transform
            return img.convert("RGB")


def decode_image(
    data: bytes | None, path: str | None, key: str, where: str, limits: DecodeLimits | None = None
) -> Image.Image:
    """Open and decode an image (from bytes, or lazily from a path) as RGB, or raise BadSampleError saying why."""
    limits = limits or DecodeLimits()
    src = path if path is not None else "image bytes"
    try:
        if data is not None:
            return _decode(io.BytesIO(data), key, where, limits)
        if path is None or not os.path.isfile(path):
            raise BadSampleError(key, f"missing image file {path}", where)
        with open(path, "rb") as f:  # PIL reads what it needs: a huge non-image file is never read whole
            return _decode(f, key, where, limits)
    except BadSampleError:
        raise
    except Image.DecompressionBombError as e:
        raise BadSampleError(key, f"image over PIL's decompression-bomb limit ({e})", where) from e
    except Image.UnidentifiedImageError as e:
        raise BadSampleError(key, f"unreadable image {src} (not a {'/'.join(FORMATS)} image)", where) from e
    except Exception as e:  # PIL on hostile bytes raises many types (OSError, SyntaxError, struct.error, ...)
        raise BadSampleError(key, f"unreadable image {src} ({type(e).__name__}: {e})", where) from e


def read_bytes(path: str, key: str, where: str, limits: DecodeLimits | None = None) -> bytes:
    """An image file's bytes, undecoded; BadSampleError when missing, unreadable or larger than any image within
    the pixel limit could be (so a huge stray file is never read whole)."""
    limits = limits or DecodeLimits()
    try:
        size = os.path.getsize(path)
        if limits.max_bytes is not None and size > limits.max_bytes:
            raise BadSampleError(
                key,
                f"image file is {size / 2**20:.0f} MiB, larger than any image within the "
                f"pixel limit ({limits.hint}); not read",
                where,
            )
        with open(path, "rb") as f:
            return f.read()
    except BadSampleError:
        raise
    except OSError as e:
        raise BadSampleError(key, f"missing or unreadable image file {path} ({e.strerror or e})", where) from e


def jpeg_size(data: bytes, key: str, where: str, limits: DecodeLimits | None = None) -> tuple[int, int] | None:
    """(width, height) of an RGB or greyscale JPEG from its header alone, checked against the pixel limit
    (BadSampleError over it); None for anything else (PNG, CMYK, unreadable header), which is decoded by PIL.

    Why: decoding on the training device (`data.decode: device`) needs the size for the crop box, not the pixels.
    """
    if not data.startswith(b"\xff\xd8"):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=("JPEG",)) as img:
                if img.mode not in ("RGB", "L"):
                    return None
                too_big = check_size(img, limits or DecodeLimits())
                if too_big:
                    raise BadSampleError(key, too_big, where)
                return img.size
    except BadSampleError:
        raise
    except Exception:  # an unreadable header: PIL's decode reports it with its reason
        return None
