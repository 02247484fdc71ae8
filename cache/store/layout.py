"""The HDF5 layout of the feature cache, named in this one module (format version 2; version 1 still reads).

    /                      attrs (`Root`): format, version, corpus_fingerprint, created_by, num_rows, corpus_source,
                           segments (the folder of segment files, relative), first_run
    /keys                  (N,) UTF-8 strings, corpus order
    /views/params          (N, K, 5) float32: relative crop box (x0, y0, w, h) + flip, when views were drawn;
                           (N, K, 8) with colour jitter: + brightness, contrast, saturation factors.
                           attrs (`ViewAttrs`): views, scale, ratio, flip_p, color, seed, layout
    /teachers/NAME/        attrs: spec, resolved_spec, embed_dim, logit_scale, image_size, mean, std,
                                  interpolation, resize_mode, context_length, views, dtype, since_run, folded
    /teachers/NAME/image   (N, D) or (N, K, D); /text (N, D); /done (N,) bool
    /teachers/NAME/tokens  (N, G*G, Dv) or (N, K, G*G, Dv): patch tokens pooled to a G x G grid (`--tokens G`;
                           attrs `tokens` = G, `token_dim` = Dv, the vision width), not normalised
    /teachers/NAME/stats/  image_mean, image_cov, text_mean, text_cov (attrs: count, image_count, text_count),
                           once a teacher completes
    /bad/rows, /bad/keys, /bad/reasons   samples that could not be embedded, with why

Format 2 (this package): the feature data are not in FEATURES.h5. Each process of each `distill cache` run writes
its rows once, into its own **segment** file in the folder `FEATURES.h5.segments/` (`run-RUN-rank-RANK-PID.h5`, the
same /teachers/NAME/{image,text,tokens} tree over the process's rows, chunked with fletcher32 checksums), and
FEATURES.h5's /teachers/NAME/{image,text,tokens}, /keys and /views/params are HDF5 *virtual datasets* mapping row
ranges of those files by a path relative to FEATURES.h5's folder (HDF5 looks a relative source up beside the file
that maps it, so the pair keeps working when moved together; h5py users and every reader here see one logical
file, a missing segment file is refused by name, `schema.check_root`). Only FEATURES.h5 (done flags, bad rows,
statistics, the mappings: megabytes at 24M rows) is ever rewritten, atomically; the merge copies no feature byte.
Why virtual datasets and not one index over a folder: every reader, `--verify` and any h5py user keep reading
`f["teachers/NAME/image"][rows]` unchanged. Why one file per (run, process), written in place, and not a file per
committed chunk: HDF5 keeps every source file of a virtual dataset open once read, with its own metadata and chunk
caches (~0.5 MB each, measured), so thousands of part files would cost every DataLoader worker a GB and a file
descriptor each; a few hundred files cost nothing. How a file written in place stays kill-safe: see
`cache.store.segment_writer`. Version 1 files (real datasets in the file) still read, train and resume.

Why one module: the writer, reader, inspector, verifier and builder all walk this tree; a path spelled in five
places drifts. Everything that knows a dataset's name, chunk shape or checksum rule asks here.
"""

from __future__ import annotations

import numpy as np

from teachers.kernel.modality import Modality

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

DONE_CHUNK_ROWS = 65536  # done flags: one bool per row, large chunks (checksummed: a flip would mark rows done)
DEFAULT_CHUNK_ROWS = 256
TOKEN_CHUNK_BYTES = 4 * 1024 * 1024


class ViewAttrs:
    """Names of /views/params's attributes: the distribution its views were drawn from
    (`cache.build.views.ViewDist`)."""

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
    SEGMENTS = "segments"  # the segment folder's name, relative to the file's folder (format 2)
    FIRST_RUN = "first_run"  # segments of earlier runs in that folder belong to an earlier file of that name


# -- format 2: segment files and the virtual datasets that map them ---------------------------------------------
SEGMENTS_SUFFIX = ".segments"
SEG_ROWS = "rows"  # (M,) int64: the cache row of each slot of a segment (-1: padding between chunks)
SEG_CHUNKS = "chunks"  # (J, 2) int64: slot start and length of each committed unit (a builder chunk)
SEG_NEED = "need"  # (M, T) bool: which teacher embeds which slot in this run; attrs `teachers` = the T names
CHUNK_ROWS = "chunk_rows"  # attr of a virtual dataset: its sources' HDF5 chunk rows (a virtual one has no chunks)
CHECKSUMMED = "fletcher32"  # attr of a virtual dataset: its sources carry fletcher32 checksums (segments do)
SINCE_RUN = "since_run"  # teacher attr: segments of earlier runs are not this teacher's (its group was recreated)
FOLDED = "folded"  # teacher attr: JSON {segment file: committed chunks folded in}


def chunk_rows_of(ds) -> int:
    """Rows per stored HDF5 chunk of dataset `ds`, real (its chunks) or virtual (its sources', recorded)."""
    if ds.chunks:
        return int(ds.chunks[0])
    return int(ds.attrs.get(CHUNK_ROWS, 1))


def checksummed(ds) -> bool:
    """Whether `ds`'s stored chunks carry fletcher32: its own filter, or (virtual) its segments', recorded."""
    return bool(ds.fletcher32 or ds.attrs.get(CHECKSUMMED, False))


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


def feature_dataset_args(
    num_rows: int, dim: int, views: int, dtype, chunk_rows: int, modality: Modality, tokens: int = 0
) -> dict:
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
    return {
        "shape": (num_rows,),
        "dtype": bool,
        "chunks": (row_chunk(num_rows, DONE_CHUNK_ROWS),),
        "fletcher32": True,
    }  # a flipped byte would mark rows done that were never written


def view_chunks(num_rows: int, views: int, chunk_rows: int, fields: int = VIEW_FIELDS) -> tuple[int, int, int]:
    return (row_chunk(num_rows, chunk_rows), views, fields)
