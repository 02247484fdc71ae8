"""Per-teacher projection heads: map the student's embedding into each teacher's space for feature distillation.

Why separate from the student: the heads are trained with it and saved in checkpoints (`heads.*` keys), but
they belong to the distillation, not to the model, so `student.export` never writes them.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

MODALITIES = ("image", "text")


class ProjectionHeads(nn.Module):
    """One linear map per teacher and modality, student embed dim -> teacher embed dim.

    Outputs are not normalised: losses decide (cosine losses normalise, L2 losses may not).
    """

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
        self.image = nn.ModuleDict({n: nn.Linear(student_dim, d, bias=bias) for n, d in self.teacher_dims.items()})
        self.text = nn.ModuleDict({n: nn.Linear(student_dim, d, bias=bias) for n, d in self.teacher_dims.items()})

    @property
    def teachers(self) -> list[str]:
        return list(self.teacher_dims)

    def forward(self, image_emb: torch.Tensor | None, text_emb: torch.Tensor | None
                ) -> dict[str, dict[str, torch.Tensor]]:
        """`{teacher: {"image": (B, Dt), "text": (B, Dt)}}`; a modality given as None is left out."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        for name in self.teacher_dims:
            per: dict[str, torch.Tensor] = {}
            if image_emb is not None:
                per["image"] = self.image[name](image_emb)
            if text_emb is not None:
                per["text"] = self.text[name](text_emb)
            out[name] = per
        return out

    def extra_repr(self) -> str:
        return f"student_dim={self.student_dim}, teachers={self.teacher_dims}"
