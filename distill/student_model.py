"""The one module the training loop prepares and optimises: the student plus its per-teacher projection heads.

Why one module: Accelerate prepares (and DDP wraps) a single model, and checkpoints hold its state dict with keys
`student.*` and `heads.*`, which `student.export` relies on. Teachers are not here: their features come from
the cache.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from distill.losses import StudentOutput


class DistillModel(nn.Module):
    def __init__(self, student: nn.Module, heads: nn.Module | None = None):
        super().__init__()
        self.student = student
        self.heads = heads

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> StudentOutput:
        image = self.student.encode_image(images, normalize=True)
        text = self.student.encode_text(tokens, normalize=True)
        projected = self.heads(image, text) if self.heads is not None else {}
        return StudentOutput(image=image, text=text, logit_scale=self.student.logit_scale.exp(), projected=projected)

    @torch.no_grad()
    def clamp_logit_scale(self, max_scale: float = 100.0) -> None:
        """CLIP's rule: keep exp(logit_scale) in [1, max_scale] after every optimizer step."""
        self.student.logit_scale.clamp_(0.0, math.log(max_scale))
