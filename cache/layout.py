"""The HDF5 layout of the feature cache, named in this one module (format version 1, DESIGN.md).

    /                      attrs (`Root`): format, version, corpus_fingerprint, created_by, num_rows, corpus_source
    /keys                  (N,) UTF-8 strings, corpus order
    /views/params          (N, K, 5) float32: relative crop box (x0, y0, w, h) + flip, when views were drawn;
                           (N, K, 8) with colour jitter: + brightness, contrast, saturation factors.
                           attrs (`ViewAttrs`): views, scale, ratio, flip_p, color, seed, layout
    /teachers/NAME/        attrs: spec, resolved_spec, embed_dim, logit_scale, image_size, mean, std,
                                  interpolation, resize_mode, context_length, views, dtype
    /teachers/NAME/image   (N, D) or (N, K, D); /text (N, D); /done (N,) bool
    /teachers/NAME/tokens  (N, G*G, Dv) or (N, K, G*G, Dv): patch tokens pooled to a G x G grid (`--tokens G`;
                           attrs `tokens` = G, `token_dim` = Dv, the vision width), not normalised
    /teachers/NAME/stats/  image_mean, image_cov, text_mean, text_cov (attrs: count, image_count, text_count),
                           once a teacher completes
    /bad/rows, /bad/keys, /bad/reasons   samples that could not be embedded, with why

Why one module: the writer, reader, inspector, verifier and builder all walk this tree; a path spelled in five
places drifts. Everything that knows a dataset's name, chunk shape or checksum rule asks here.
"""
from __future__ import annotations

import numpy as np

from teachers.modality import Modality

KEYS = "keys"
TEACHERS = "teachers"
VIEWS = "views"
VIEW_PARAMS = "views/params"
BAD = "bad"
BAD_ROWS = "bad/rows"
BAD_KEYS = "bad/keys"
BAD_REASONS = "bad/reasons"
DONE = "done"
TOKENS = "tokens"
STATS = "stats"
STATS_FIELDS = tuple(f"{m}_{s}" for m in Modality for s in ("mean", "cov"))  # image_mean, image_cov, text_...
VIEW_COLUMNS = ("x0", "y0", "w", "h", "flip", "brightness", "contrast", "saturation")
VIEW_FIELDS = 5  # x0, y0, w, h, flip
VIEW_COLOR_FIELDS = 8  # + brightness, contrast, saturation (only when colour jitter was drawn)

DONE_CHUNK_ROWS = 65536  # done flags: one bool per row, large chunks (never checksummed: rewritten whole)
DEFAULT_CHUNK_ROWS = 256
TOKEN_CHUNK_BYTES = 4 * 1024 * 1024


class ViewAttrs:
    """Names of /views/params's attributes: the distribution its views were drawn from (`cache.views.ViewDist`)."""

    VIEWS = "views"
    SCALE = "scale"
    RATIO = "ratio"
    FLIP_P = "flip_p"
    COLOR = "color"
    SEED = "seed"
    LAYOUT = "layout"


class Root:
    """Names of the root attributes."""

    FORMAT = "format"
    VERSION = "version"
    FINGERPRINT = "corpus_fingerprint"
    CREATED_BY = "created_by"
    NUM_ROWS = "num_rows"
    SOURCE = "corpus_source"


def teacher(name: str) -> str:
    """The group of teacher NAME."""
    return f"{TEACHERS}/{name}"


def feature(name: str, modality: Modality) -> str:
    """Teacher NAME's embeddings of one modality."""
    return f"{teacher(name)}/{Modality(modality).value}"


def tokens(name: str) -> str:
    """Teacher NAME's pooled patch tokens (present when it was cached with --tokens)."""
    return f"{teacher(name)}/{TOKENS}"


def done(name: str) -> str:
    return f"{teacher(name)}/{DONE}"


def stats(name: str) -> str:
    return f"{teacher(name)}/{STATS}"


def row_chunk(num_rows: int, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> int:
    """Rows per HDF5 chunk: `chunk_rows`, but at least 1 and at most the file's rows."""
    return max(1, min(int(num_rows), int(chunk_rows)))


def feature_dataset_args(num_rows: int, dim: int, views: int, dtype, chunk_rows: int,
                         modality: Modality, tokens: int = 0) -> dict:
    """`create_dataset` arguments of one feature dataset: image (N, K, D) with K views, else (N, D); with
    `tokens` T (image only: patch tokens), (N, K, T, D) or (N, T, D).

    Token chunks hold at most TOKEN_CHUNK_BYTES (a divisor of the features' chunk rows): HDF5 reads a checksummed
    chunk whole even for one row.
    fletcher32: HDF5 checksums every chunk, so a changed byte raises on read (`distill info --verify`, training)
    instead of training on it; files written before it have none and still read.
    """
    c = row_chunk(num_rows, chunk_rows)
    inner = ((views,) if modality == Modality.IMAGE and views else ()) + ((tokens,) if tokens else ()) + (dim,)
    row_bytes = int(np.prod(inner)) * np.dtype(dtype).itemsize
    if tokens:  # the largest divisor of the feature chunk that fits, so feature blocks hold whole token chunks
        c = next(d for d in range(c, 0, -1) if c % d == 0 and (d * row_bytes <= TOKEN_CHUNK_BYTES or d == 1))
    return {"shape": (num_rows, *inner), "dtype": dtype, "chunks": (c, *inner), "fletcher32": True}


def done_dataset_args(num_rows: int) -> dict:
    return {"shape": (num_rows,), "dtype": bool, "chunks": (row_chunk(num_rows, DONE_CHUNK_ROWS),)}


def view_chunks(num_rows: int, views: int, chunk_rows: int, fields: int = VIEW_FIELDS) -> tuple[int, int, int]:
    return (row_chunk(num_rows, chunk_rows), views, fields)
