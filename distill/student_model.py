"""The one module the training loop prepares and optimises: the student plus its per-teacher projection heads.

Why one module: Accelerate prepares (and DDP wraps) a single model, and checkpoints hold its state dict with keys
`student.*` and `heads.*`, which `student.export` relies on. Teachers are not here: their features come from
the cache.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from distill.heads import ProjectionHeads
from distill.losses import StudentOutput
from teachers.modality import MODALITIES, Modality
from teachers.transforms import OPENAI_MEAN, OPENAI_STD


def student_pixels(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) pixels as the student's normalised floats, by the ops of torchvision's to_tensor then
    normalize (so equal to the old worker-side path); float input is taken as already normalised."""
    if images.dtype != torch.uint8:
        return images
    return images.to(torch.get_default_dtype()).div(255).sub_(mean.view(-1, 1, 1)).div_(std.view(-1, 1, 1))


class DistillModel(nn.Module):
    """`pixel_mean`/`pixel_std`: the student's normalisation, applied here to the loader's uint8 images.

    Why on the device: uint8 crosses the worker queue and the host-to-device copy at a quarter of float32's bytes.
    The buffers are not persistent, so checkpoints keep only `student.*` and `heads.*`.
    """

    def __init__(self, student: nn.Module, heads: ProjectionHeads | None = None,
                 pixel_mean: Sequence[float] = OPENAI_MEAN, pixel_std: Sequence[float] = OPENAI_STD):
        super().__init__()
        self.student = student
        self.heads = heads
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32), persistent=False)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> StudentOutput:
        images = student_pixels(images, self.pixel_mean, self.pixel_std)
        image = self.student.encode_image(images, normalize=True)
        text = self.student.encode_text(tokens, normalize=True)
        projected = self.heads(image, text) if self.heads is not None else {}
        return StudentOutput(image=image, text=text, logit_scale=self.student.logit_scale.exp(), projected=projected)

    def freeze_unreached(self, uses_logit_scale: bool, head_modalities: dict[str, tuple[Modality, ...]],
                         student_modalities: tuple[Modality, ...] = MODALITIES) -> list[str]:
        """Freeze what no loss term reaches; returns the frozen parameter names.

        Why: DDP fails on trainable parameters that get no gradient unless `find_unused_parameters=True`, which
        costs a graph walk every step. Unreached here: the logit scale under a feature-only loss, the logit bias
        (no term uses one), heads of a modality no term reads, and a whole tower no term reads (a feature term on
        images only: the text tower).
        """
        frozen = []
        for name, p in self.student.named_parameters():
            tower = (Modality.IMAGE if name.startswith("visual.") else None if name.startswith("logit_")
                     else Modality.TEXT)
            if tower is not None and tower not in student_modalities and p.requires_grad:
                p.requires_grad_(False)
                frozen.append(f"student.{name}")
        for name in ("logit_scale", "logit_bias"):
            p = getattr(self.student, name, None)
            if isinstance(p, nn.Parameter) and p.requires_grad and (name == "logit_bias" or not uses_logit_scale):
                p.requires_grad_(False)
                frozen.append(f"student.{name}")
        if self.heads is not None:
            for modality in MODALITIES:
                for teacher, head in self.heads.of(modality).items():
                    if modality not in head_modalities.get(teacher, ()):
                        head.requires_grad_(False)
                        frozen += [f"heads.{modality}.{teacher}.{n}" for n, _ in head.named_parameters()]
        return frozen

    def unsqueeze_scalar_params(self) -> list[str]:
        """Make 0-dim parameters (open_clip's logit scale and bias) 1-element ones; returns their names.

        Why: FSDP (1 and 2) rejects scalar parameters ("Change logit_scale to a 1D tensor"). Only the trainer's
        FSDP path calls this, before the optimizer is built. Checkpoints then hold shape [1]; `load_state_dict` of the
        0-dim open_clip model (the export, a DDP resume from merged weights) accepts that shape.
        """
        changed = []
        for name, p in list(self.named_parameters()):
            if p.ndim == 0:
                owner, attr = self.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2]
                setattr(owner, attr, nn.Parameter(p.detach().reshape(1).clone(), requires_grad=p.requires_grad))
                changed.append(name)
        return changed

    @torch.no_grad()
    def clamp_logit_scale(self, max_scale: float = 100.0) -> None:
        """CLIP's rule: keep exp(logit_scale) in [1, max_scale] after every optimizer step."""
        self.student.logit_scale.clamp_(0.0, math.log(max_scale))
