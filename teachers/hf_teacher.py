"""Hugging Face `transformers` back-end: `hf-clip:HUB_ID_OR_FOLDER` (CLIPModel and its processors).

PLIP and PubMedCLIP are published this way. The eval transform is the model's own image processor, so
embeddings equal calling `transformers` directly; no `trust_remote_code` unless the user asks for it.
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from typing import Sequence

import torch
from PIL import Image

from .base import Teacher
from .hub import require_hub_file
from .spec import Spec
from .transforms import PreprocessCfg, to_rgb
from .weights import find_weights, reading_weights


class HFClipTeacher(Teacher):
    """A frozen `transformers.CLIPModel` (or any model with get_image/text_features)."""

    def __init__(self, spec: Spec, device: str | torch.device = "cpu", trust_remote_code: bool = False):
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

        path = spec.target
        if path.startswith(("/", ".", "~")) and not os.path.isdir(os.path.expanduser(path)):
            raise FileNotFoundError(f"SPEC {spec.raw!r}: folder {path} not found (hf-clip: takes a hub id "
                                    "ORG/NAME or a folder written by save_pretrained)")
        path = os.path.expanduser(path)
        local = os.path.isdir(path)
        if not local:  # before transformers, whose downloads retry for ~25 s with no network
            require_hub_file(path, ("config.json",))
        with reading_weights(find_weights(path, "model.safetensors")) if local else nullcontext():
            model = AutoModel.from_pretrained(path, trust_remote_code=trust_remote_code).to(device)
        processor = AutoImageProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        size = getattr(processor, "crop_size", None) or getattr(processor, "size", None) or {}
        if isinstance(size, (int, float)):
            h = w = int(size)
        else:  # dict or transformers' SizeDict
            get = (lambda k: size.get(k)) if isinstance(size, dict) else (lambda k: getattr(size, k, None))
            h = get("height") or get("shortest_edge") or 224
            w = get("width") or get("shortest_edge") or h
        cfg = PreprocessCfg(image_size=(int(h), int(w)), mean=tuple(processor.image_mean),
                            std=tuple(processor.image_std), interpolation="bicubic", resize_mode="shortest")
        ctx = int(getattr(model.config, "text_config", model.config).max_position_embeddings)
        ctx = min(ctx, getattr(tokenizer, "model_max_length", ctx) or ctx)
        dim = int(getattr(model.config, "projection_dim", 0) or model.text_projection.out_features)
        scale = float(model.logit_scale.exp().item()) if hasattr(model, "logit_scale") else 100.0
        super().__init__(model, spec=spec.raw, embed_dim=dim, logit_scale=scale, preprocess_cfg=cfg,
                         context_length=ctx)
        self._processor = processor
        self._tokenizer = tokenizer

    @property
    def image_transform(self):
        processor = self._processor

        def transform(img: Image.Image) -> torch.Tensor:
            return processor(images=to_rgb(img), return_tensors="pt")["pixel_values"][0]

        return transform

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Token ids padded with -1, so the attention mask survives the trip through a DataLoader."""
        out = self._tokenizer(list(texts), padding="max_length", truncation=True,
                              max_length=self.context_length, return_tensors="pt")
        return out["input_ids"].masked_fill(out["attention_mask"] == 0, -1)

    def _pad_id(self) -> int:
        pad = self._tokenizer.pad_token_id
        return 0 if pad is None else int(pad)

    def _image_features(self, images: torch.Tensor) -> torch.Tensor:
        out = self.trunk.get_image_features(pixel_values=images)
        return out if torch.is_tensor(out) else out.pooler_output

    def _text_features(self, tokens: torch.Tensor) -> torch.Tensor:
        mask = (tokens >= 0).long()
        ids = tokens.masked_fill(tokens < 0, self._pad_id())
        out = self.trunk.get_text_features(input_ids=ids, attention_mask=mask)
        return out if torch.is_tensor(out) else out.pooler_output
