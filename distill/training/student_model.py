"""The one module the training loop prepares and optimises: the student plus its per-teacher projection heads.

Why one module: Accelerate prepares (and DDP wraps) a single model, and checkpoints hold its state dict with keys
`student.*` and `heads.*`, which `student.export` relies on. Teachers are not here: their features come from
the cache.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from distill.losses import StudentOutput
from distill.training.heads import ProjectionHeads, TokenAdaptors
from teachers.kernel.modality import MODALITIES, Modality
from teachers.tokens import open_clip_visual_tokens
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
    The buffers are not persistent, so checkpoints keep only `student.*`, `heads.*` (and `adaptors.*` with a spatial
    term).
    """

    pixel_mean: torch.Tensor
    pixel_std: torch.Tensor

    def __init__(
        self,
        student: nn.Module,
        heads: ProjectionHeads | None = None,
        pixel_mean: Sequence[float] = OPENAI_MEAN,
        pixel_std: Sequence[float] = OPENAI_STD,
        adaptors: TokenAdaptors | None = None,
    ):
        super().__init__()
        self.student = student
        self.heads = heads
        self.adaptors = adaptors  # per-teacher patch-token adaptors, only with a spatial term
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32), persistent=False)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> StudentOutput:
        images = student_pixels(images, self.pixel_mean, self.pixel_std)
        image, spatial = self._encode_image(images)
        text = self._student_method("encode_text")(tokens, normalize=True)
        projected = self.heads(image, text) if self.heads is not None else {}
        return StudentOutput(
            image=image,
            text=text,
            logit_scale=self._logit_scale().exp(),
            projected=projected,
            logit_bias=getattr(self.student, "logit_bias", None),
            tokens=spatial,
        )

    def _encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The normalised image embeddings and, with token adaptors (a spatial term), {teacher: (B, G*G, Dt)}
        adapted patch tokens from the same forward pass (`teachers.tokens`: after the tower's final norm)."""
        if self.adaptors is None:
            return self._student_method("encode_image")(images, normalize=True), {}
        pooled, patches, grid = open_clip_visual_tokens(cast(nn.Module, self.student.visual), images)
        return F.normalize(pooled, dim=-1), self.adaptors(patches, grid)

    def _student_method(self, name: str) -> Callable[..., torch.Tensor]:
        """The open_clip student's `encode_text`/`encode_image` (nn.Module's attribute typing knows only
        tensors and modules)."""
        return cast("Callable[..., torch.Tensor]", getattr(self.student, name))

    def _logit_scale(self) -> torch.Tensor:
        """The open_clip student's logit scale parameter (log of the temperature's inverse)."""
        return cast(torch.Tensor, self.student.logit_scale)

    def freeze_unreached(
        self,
        uses_logit_scale: bool,
        head_modalities: dict[str, tuple[Modality, ...]],
        student_modalities: tuple[Modality, ...] = MODALITIES,
        uses_logit_bias: bool = False,
    ) -> list[str]:
        """Freeze what no loss term reaches; returns the frozen parameter names.

        Why: DDP fails on trainable parameters that get no gradient unless `find_unused_parameters=True`, which
        costs a graph walk every step. Unreached here: the logit scale under a feature-only loss, the logit bias
        unless a sigmoid term reads it (`uses_logit_bias`: siglip, affinity from a sigmoid teacher), heads of a
        modality no term reads, and a whole tower no term reads (a feature term on images only: the text tower).
        A loss that reads a logit bias the student lacks is refused here, before the first step.
        """
        if uses_logit_bias and not isinstance(getattr(self.student, "logit_bias", None), nn.Parameter):
            raise ValueError(
                "the loss reads the student's logit bias (a siglip term, or affinity from a teacher "
                "with a logit bias), but this student has none: build it with an init_logit_bias "
                "(student.overrides.init_logit_bias, e.g. -10 as SigLIP)"
            )
        frozen = []
        for name, p in self.student.named_parameters():
            tower = (
                Modality.IMAGE if name.startswith("visual.") else None if name.startswith("logit_") else Modality.TEXT
            )
            if tower is not None and tower not in student_modalities and p.requires_grad:
                p.requires_grad_(False)
                frozen.append(f"student.{name}")
        for name in ("logit_scale", "logit_bias"):
            scalar = getattr(self.student, name, None)
            used = uses_logit_bias if name == "logit_bias" else uses_logit_scale
            if isinstance(scalar, nn.Parameter) and scalar.requires_grad and not used:
                scalar.requires_grad_(False)
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
        self._logit_scale().clamp_(0.0, math.log(max_scale))
