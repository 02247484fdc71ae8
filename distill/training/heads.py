"""Per-teacher projection heads: map the student's embedding into each teacher's space for feature distillation.

Why in `distill/`, not `student/`: the heads are trained with the student and saved in checkpoints (`heads.*`
keys), but they belong to the distillation, not to the model, so `student.export` never writes them.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from teachers.kernel.modality import MODALITIES, Modality, Pair
from teachers.tokens import pool_tokens


class ProjectionHeads(nn.Module):
    """One linear map per teacher and modality, student embed dim -> teacher embed dim.

    Outputs are not normalised: losses decide (cosine losses normalise, L2 losses may not). The parameters are
    `image.<teacher>.*` and `text.<teacher>.*` (checkpoint keys `heads.image.<teacher>.weight`, ...).
    """

    image: nn.ModuleDict
    text: nn.ModuleDict

    def __init__(self, student_dim: int, teacher_dims: Mapping[str, int], bias: bool = False):
        super().__init__()
        if student_dim <= 0:
            raise ValueError(f"student_dim must be positive, got {student_dim}")
        for name, dim in teacher_dims.items():
            if not name or "." in name:
                raise ValueError(f"teacher name {name!r} cannot name a head: it must be non-empty without '.'")
            if int(dim) <= 0:
                raise ValueError(f"teacher {name!r}: embed dim must be positive, got {dim}")
        self.student_dim = int(student_dim)
        self.teacher_dims = {name: int(dim) for name, dim in teacher_dims.items()}
        for m in MODALITIES:  # image heads first, then text: the parameter (and init) order of checkpoints
            self.add_module(
                m.value, nn.ModuleDict({n: nn.Linear(student_dim, d, bias=bias) for n, d in self.teacher_dims.items()})
            )

    @property
    def teachers(self) -> list[str]:
        return list(self.teacher_dims)

    def of(self, modality: Modality) -> nn.ModuleDict:
        """The heads of one modality, {teacher: Linear}."""
        return getattr(self, Modality(modality).value)

    def forward(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> dict[str, Pair[torch.Tensor]]:
        """{teacher: Pair(image (B, Dt), text (B, Dt))}: the student's embeddings in each teacher's space."""
        return {name: Pair(self.image[name](image_emb), self.text[name](text_emb)) for name in self.teacher_dims}

    def extra_repr(self) -> str:
        return f"student_dim={self.student_dim}, teachers={self.teacher_dims}"


class TokenAdaptors(nn.Module):
    """Per-teacher adaptor heads for spatial distillation: an MLP per teacher, student token width -> that
    teacher's token width, applied to every student patch token, then average-pooled to the teacher's cached
    G x G grid (`teachers.tokens.pool_tokens`, the same pooling the cache used).

    Why an MLP (Linear, GELU, Linear; hidden = the larger width) per teacher: AM-RADIO and UNIC distil each
    teacher's features through its own small MLP head, so the shared trunk need not equal any one teacher. Why
    adapt, then pool: the cached tokens are averages of the teacher's own tokens, so matching them with averages
    of the adapted student tokens fits one per-patch mapping, usable on every patch after training.
    Parameters: `mlp.<teacher>.*` (checkpoint keys `adaptors.mlp.<teacher>.*`); never exported with the student.
    """

    def __init__(self, student_dim: int, teachers: Mapping[str, tuple[int, int]]):
        super().__init__()
        for name, (grid, dim) in teachers.items():
            if not name or "." in name or int(grid) <= 0 or int(dim) <= 0:
                raise ValueError(
                    f"teacher {name!r}: token adaptor needs a name without '.', a grid > 0 and a dim "
                    f"> 0, got grid {grid}, dim {dim}"
                )
        self.student_dim = int(student_dim)
        self.grids = {name: int(g) for name, (g, _) in teachers.items()}
        self.dims = {name: int(d) for name, (_, d) in teachers.items()}
        self.mlp = nn.ModuleDict(
            {
                n: nn.Sequential(
                    nn.Linear(student_dim, max(student_dim, d)), nn.GELU(), nn.Linear(max(student_dim, d), d)
                )
                for n, d in self.dims.items()
            }
        )

    @property
    def teachers(self) -> list[str]:
        return list(self.dims)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> dict[str, torch.Tensor]:
        """(B, h*w, Ds) student patch tokens on an (h, w) grid -> {teacher: (B, G*G, Dt)} adapted and pooled."""
        return {n: pool_tokens(mlp(tokens), grid, self.grids[n]) for n, mlp in self.mlp.items()}

    def extra_repr(self) -> str:
        return f"student_dim={self.student_dim}, grids={self.grids}, dims={self.dims}"
