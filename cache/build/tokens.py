"""Patch tokens in the cache (`distill cache --tokens G`): pooling, the checks before a run, its size on disk.

Each teacher's patch tokens (`teachers.tokens`: the last layer after the final norm, no prefix tokens) are
average-pooled to a G x G grid and stored float16 (or --dtype) as /teachers/NAME/tokens (N, [K,] G*G, D), D the
teacher's vision width. They are G*G*D numbers per row and view where a feature row has E, so the size is
estimated and printed before anything is written, and a run over `--max-gb` is refused in one line.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cache.store.schema import CacheError
from teachers.tokens import TokensUnsupported, pool_tokens


def embed_images(teacher, images: torch.Tensor, grid: int, dtype: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(L2-normalised embeddings (B, E), patch tokens pooled to (B, G*G, D) in the storage `dtype`, or None when
    `grid` is 0) from one forward pass. Cast on the device: a chunk's tokens wait there until it is committed."""
    if not grid:
        return teacher.encode_image(images), None
    emb, tokens, hw = teacher.encode_image_with_tokens(images)
    return emb, pool_tokens(tokens, hw, grid).to(getattr(torch, dtype))


@dataclass(frozen=True)
class TokenSize:
    """What the tokens of one run take on disk: per teacher (D, bytes) and the total."""

    grid: int
    rows: int
    views: int
    per_teacher: dict[str, tuple[int, int]]  # name -> (token width D, bytes)

    @property
    def total(self) -> int:
        return sum(b for _, b in self.per_teacher.values())

    def __str__(self) -> str:
        each = ", ".join(f"{n} {d}-wide {b / 1e9:.3g} GB" for n, (d, b) in self.per_teacher.items())
        views = f" x {self.views} views" if self.views else ""
        return (
            f"patch tokens: {self.grid} x {self.grid} grid, {self.rows} rows{views}: ~{self.total / 1e9:.3g} GB "
            f"on disk ({each})"
        )


def token_dims(teachers: dict, grid: int, out: str) -> dict[str, int]:
    """{name: D} of each teacher's tokens; a teacher without tokens, or a patch grid smaller than G x G, is a
    CacheError naming it (before anything is written)."""
    dims = {}
    for name, t in teachers.items():
        try:
            h, w, d = t.token_shape()
        except TokensUnsupported as e:
            raise CacheError(f"{out}: --tokens {grid}: teacher {name!r}: {e}") from None
        if grid > min(h, w):
            raise CacheError(
                f"{out}: --tokens {grid} asks a {grid} x {grid} grid, but teacher {name!r} has a "
                f"{h} x {w} patch grid; use --tokens {min(h, w)} or less"
            )
        dims[name] = d
    return dims


def check_token_size(
    dims: dict[str, int], grid: int, rows: int, views: int, dtype: str, max_gb: float, out: str
) -> TokenSize:
    """The tokens' size on disk (rows x [views] x G*G x D x bytes, per teacher); over `max_gb` GB: CacheError."""
    item = np.dtype(dtype).itemsize
    size = TokenSize(
        grid, rows, views, {n: (d, rows * max(views, 1) * grid * grid * d * item) for n, d in dims.items()}
    )
    if max_gb and size.total > max_gb * 1e9:
        raise CacheError(
            f"{out}: --tokens {grid} would store ~{size.total / 1e9:.3g} GB of patch tokens, over "
            f"--max-gb {max_gb:g}: lower --tokens, cache fewer teachers or views, or raise --max-gb "
            f"(0: no bound)"
        )
    return size
