"""The `Teacher` contract: a frozen CLIP that embeds images and texts into L2-normalised float32 vectors.

Each back-end wraps its third-party model as `self.trunk` and owns its preprocessing and tokenizer, so no two
teachers are forced to share a transform (open_clip's distill FIXME does not carry over).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from teachers.tokens import TokensUnsupported
from teachers.transforms import PreprocessCfg, make_eval_transform, make_view_transform


class Teacher(nn.Module, ABC):
    """A frozen image-text model. Subclasses implement `_image_features`, `_text_features`, `tokenize`."""

    def __init__(
        self,
        trunk: nn.Module,
        *,
        spec: str,
        embed_dim: int,
        logit_scale: float,
        preprocess_cfg: PreprocessCfg,
        context_length: int,
        logit_bias: float | None = None,
    ):
        super().__init__()
        # the third-party model: each back-end calls its own methods on it (encode_image, get_text_features...)
        self.trunk: Any = trunk
        self.spec = spec
        self.embed_dim = int(embed_dim)
        self.logit_scale = float(logit_scale)
        # a sigmoid (SigLIP) model's learnt bias: its pair logit is logit_scale * cos + logit_bias; None: softmax
        self.logit_bias = None if logit_bias is None else float(logit_bias)
        self.preprocess_cfg = preprocess_cfg
        self.context_length = int(context_length)
        self.autocast_dtype: torch.dtype | None = None  # set by to_device() on GPU
        self.requires_grad_(False)
        self.eval()

    # -- what subclasses provide ---------------------------------------------------------------------
    @abstractmethod
    def _image_features(self, images: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def _text_features(self, tokens: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor: ...

    # -- preprocessing -------------------------------------------------------------------------------
    @property
    def image_transform(self) -> Callable[[Image.Image], torch.Tensor]:
        """This model's own eval transform (PIL image -> normalised tensor)."""
        return make_eval_transform(self.preprocess_cfg)

    @property
    def view_transform(self) -> Callable[[Image.Image, Sequence[float]], torch.Tensor]:
        """Stored view (crop box + flip) -> this model's resolution and normalisation."""
        return make_view_transform(self.preprocess_cfg)

    # -- encoding ------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    def to_device(self, device: str | torch.device) -> Teacher:
        """Move to `device`; on CUDA, encode under bf16 (or fp16) autocast."""
        device = torch.device(device)
        self.to(device)
        if device.type == "cuda":
            self.autocast_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return self

    def _autocast(self):
        if self.autocast_dtype is None or self.device.type != "cuda":
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.autocast_dtype)

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            feats = self._image_features(images.to(self.device))
        return F.normalize(feats.float(), dim=-1)

    # -- patch tokens (optional: spatial distillation) -------------------------------------------------
    def _image_features_and_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """(pooled features (B, E), patch tokens (B, h*w, D), (h, w)) from one forward (see `teachers.tokens`).

        Back-ends that can give patch tokens override this; a `py:` teacher that does not is refused clearly.
        """
        raise TokensUnsupported(
            f"teacher {self.spec!r} ({type(self).__name__}) gives no patch tokens: implement "
            f"_image_features_and_tokens, or cache it without --tokens"
        )

    @torch.no_grad()
    def encode_image_with_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """(L2-normalised embeddings (B, E), float32 patch tokens (B, h*w, D) NOT normalised, grid (h, w))."""
        with self._autocast():
            feats, tokens, grid = self._image_features_and_tokens(images.to(self.device))
        return F.normalize(feats.float(), dim=-1), tokens.float(), grid

    def encode_image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, h*w, D) patch tokens of the last layer, after the final norm, without prefix tokens (float32)."""
        return self.encode_image_with_tokens(images)[1]

    def token_shape(self) -> tuple[int, int, int]:
        """(h, w, D): the patch grid and token width at this teacher's own image size (one forward, memoised)."""
        if getattr(self, "_token_shape", None) is None:
            size = self.preprocess_cfg.image_size
            _, tokens, (h, w) = self.encode_image_with_tokens(torch.zeros(1, 3, *size))
            self._token_shape = (int(h), int(w), int(tokens.shape[-1]))
        return self._token_shape

    @torch.no_grad()
    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            feats = self._text_features(tokens.to(self.device))
        return F.normalize(feats.float(), dim=-1)

    def train(self, mode: bool = True) -> Teacher:
        """Teachers stay in eval mode whatever the caller asks (dropout off, norms frozen)."""
        return super().train(False)

    def describe(self) -> dict:
        """Metadata stored with a teacher's features in the cache."""
        bias = {} if getattr(self, "logit_bias", None) is None else {"logit_bias": self.logit_bias}
        return {
            "spec": self.spec,
            "embed_dim": self.embed_dim,
            "logit_scale": self.logit_scale,
            **bias,
            "context_length": self.context_length,
            **self.preprocess_cfg.to_attrs(),
        }
