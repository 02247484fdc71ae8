"""Hugging Face `transformers` back-end: `hf:HUB_ID_OR_FOLDER`, any dual encoder (`hf-clip:` is the same back-end).

Why one back-end for CLIP, SigLIP (MedSigLIP, fixed-resolution SigLIP 2) and models shipping their own code
(ConceptCLIP): transformers gives every dual encoder `get_image_features(pixel_values=)` and
`get_text_features(input_ids=, attention_mask=)` beside its own image processor and tokenizer, so embeddings equal
calling the library directly. Models built on open_clip and shipped with their own code expose open_clip's
`encode_image` / `encode_text` instead (tensor, tuple or dict out); those are called when the pair is absent, as the
models' own evaluation code does. `hf:` exists because `hf-clip:` reads wrong for SigLIP; `hf-clip:` stays, for
the SPECs already written into caches and configs.
Captions are padded to the full context (SigLIP was trained on max-length padding, with pad = eos: transformers'
pipeline pads so for it); the attention mask goes to the model when its tokenizer returns one, as the model's own
processor does. Code from a model's repo runs only with `trust_remote_code` (the CLI's `--trust-remote-code`).
Out of scope: SigLIP 2 NaFlex (`Siglip2Model`), whose images are variable-length patch sequences, not one tensor.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext

import torch
from huggingface_hub import hf_hub_download
from PIL import Image
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer
from transformers.utils import logging as hf_logging

from teachers.base import Teacher
from teachers.hub import require_hub_file
from teachers.spec import Spec
from teachers.tokens import hf_visual_tokens
from teachers.transforms import PreprocessCfg, to_rgb
from teachers.weights import find_weights, reading_weights

_INTERPOLATION = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL resample codes transformers processors store
_UNSET_MAX_LENGTH = 10**6  # transformers' model_max_length when a tokenizer does not set it (VERY_LARGE_INTEGER)


class RemoteCodeRequired(RuntimeError):
    """The model's repo names its own code (config.json `auto_map`) and trust_remote_code was not given."""


class UnsupportedModelError(RuntimeError):
    """A transformers model this back-end cannot embed with (no feature methods, or NaFlex inputs)."""


def _from_pretrained(loader, path: str, trust_remote_code: bool):
    """`loader.from_pretrained(path)`, with transformers' multi-line remote-code refusal as one line."""
    try:
        return loader.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ValueError as e:
        if trust_remote_code or "trust_remote_code" not in str(e):
            raise
        raise RemoteCodeRequired(
            f"{path} contains its own model code (auto_map in its config.json), which runs "
            "only when asked: pass --trust-remote-code (trust_remote_code=True) if you trust "
            f"that repository"
        ) from e


# Files whose `auto_map` names code shipped in the repo: the model's, its tokenizer's and its image processor's.
_CODE_FILES = ("config.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json")


def _auto_map_files(path: str, local: bool) -> list[str]:
    """The files of `path` (a folder, or a hub repo's cached or fetched files) whose JSON has an `auto_map`."""
    found = []
    for name in _CODE_FILES:
        if local:
            file = os.path.join(path, name)
        else:
            try:
                file = hf_hub_download(path, name)
            except Exception:  # absent from the repo, or not cached offline: transformers decides for this file
                continue
        try:
            with open(file, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError):  # absent or unreadable: transformers reports it when it reads the file
            continue
        if isinstance(data, dict) and data.get("auto_map"):
            found.append(name)
    return found


def refuse_unasked_code(path: str, local: bool, trust_remote_code: bool) -> None:
    """Refuse a model whose repo ships its own code unless trust_remote_code, whatever its model_type.

    Why not leave it to transformers: with a model_type it knows (`clip`), transformers silently loads its own
    class and ignores the `auto_map`, so the same folder would load with or without the flag; the README promises
    that a repo that ships code stops until --trust-remote-code is given. Nothing from the repo is imported here.
    """
    if trust_remote_code:
        return
    files = _auto_map_files(path, local)
    if files:
        raise RemoteCodeRequired(
            f"{path} contains its own model code (auto_map in {', '.join(files)}), which runs "
            "only when asked: pass --trust-remote-code (trust_remote_code=True) if you trust "
            "that repository"
        )


@contextmanager
def _no_loading_bar():
    """transformers' "Loading weights" bar off while a local folder loads (a second, one bar per model, on
    stderr, which holds only warnings and errors); kept with -v (DEBUG logging), where everything shows."""
    if logging.getLogger(__name__).isEnabledFor(logging.DEBUG) or not hf_logging.is_progress_bar_enabled():
        yield
        return
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()


def _feature_calls(model) -> str:
    """ "transformers" (get_*_features) or "open_clip" (encode_*): how this model embeds; refuse what cannot."""
    if hasattr(model, "get_image_features") and hasattr(model, "get_text_features"):
        if "spatial_shapes" in inspect.signature(model.get_image_features).parameters:
            raise UnsupportedModelError(
                f"{type(model).__name__} is a NaFlex model (variable patch counts per "
                "image), which this back-end does not embed; use a fixed-resolution "
                "checkpoint (SigLIP 2: google/siglip2-*-patch16-224 and kin)"
            )
        return "transformers"
    if hasattr(model, "encode_image") and hasattr(model, "encode_text"):
        return "open_clip"
    raise UnsupportedModelError(
        f"{type(model).__name__} has neither get_image_features/get_text_features "
        "(transformers) nor encode_image/encode_text (open_clip); wrap it in a py: "
        "teacher (docs/teachers.md)"
    )


def _features(out, key: str) -> torch.Tensor:
    """The embedding in a feature call's output: a tensor, transformers' pooled output, a tuple's first item, or
    a dict's `image_features` / `text_features` (open_clip-style models)."""
    if torch.is_tensor(out):
        return out
    if isinstance(out, dict) and key in out:
        return out[key]
    if isinstance(out, (tuple, list)):
        return out[0]
    return out.pooler_output


def _size(size) -> tuple[int, int]:
    """(height, width) from a processor's size: an int, a dict or transformers' SizeDict."""
    if isinstance(size, (int, float)):
        return int(size), int(size)
    get = (lambda k: size.get(k)) if isinstance(size, dict) else (lambda k: getattr(size, k, None))
    h = get("height") or get("shortest_edge") or 224
    return int(h), int(get("width") or get("shortest_edge") or h)


def processor_preprocess_cfg(processor) -> PreprocessCfg:
    """The processor's resize as a PreprocessCfg (what views are resized with): CLIP resizes the shortest side and
    centre-crops; SigLIP resizes to height x width (squash). The eval transform is the processor itself."""
    crop = bool(getattr(processor, "do_center_crop", False))
    size = (getattr(processor, "crop_size", None) if crop else None) or getattr(processor, "size", None) or {}
    resample = getattr(processor, "resample", None)
    return PreprocessCfg(
        image_size=_size(size),
        mean=tuple(processor.image_mean),
        std=tuple(processor.image_std),
        interpolation=_INTERPOLATION.get(int(resample) if resample is not None else 3, "bicubic"),
        resize_mode="shortest" if crop else "squash",
    )


def _context_length(model, tokenizer) -> int:
    """The text tower's positions, capped by the tokenizer's own limit (77 when neither says)."""
    cfg = getattr(model.config, "text_config", None) or model.config
    found = [getattr(cfg, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    limits = [int(n) for n in found if isinstance(n, int) and 0 < n < _UNSET_MAX_LENGTH]
    return min(limits) if limits else 77


def _scalar(model, name: str) -> float | None:
    p = getattr(model, name, None)
    return float(p.detach().float().reshape(-1)[0]) if torch.is_tensor(p) else None


class HFTeacher(Teacher):
    """A frozen `transformers` dual encoder (CLIPModel, SiglipModel, or a repo's own class) and its processors."""

    def __init__(self, spec: Spec, device: str | torch.device = "cpu", trust_remote_code: bool = False):
        path = spec.target
        if path.startswith(("/", ".", "~")) and not os.path.isdir(os.path.expanduser(path)):
            raise FileNotFoundError(
                f"SPEC {spec.raw!r}: folder {path} not found ({spec.kind}: takes a hub id "
                "ORG/NAME or a folder written by save_pretrained)"
            )
        path = os.path.expanduser(path)
        local = os.path.isdir(path)
        if not local:  # before transformers, whose downloads retry for ~25 s with no network
            require_hub_file(path, ("config.json",))
        refuse_unasked_code(path, local, trust_remote_code)
        with (
            reading_weights(find_weights(path, "model.safetensors")) if local else nullcontext(),
            _no_loading_bar() if local else nullcontext(),
        ):
            model = _from_pretrained(AutoModel, path, trust_remote_code).to(device).eval()
        calls = _feature_calls(model)
        processor = _from_pretrained(AutoImageProcessor, path, trust_remote_code)
        tokenizer = _from_pretrained(AutoTokenizer, path, trust_remote_code)
        cfg = processor_preprocess_cfg(processor)
        scale = _scalar(model, "logit_scale")  # stored as its log, as CLIP and SigLIP train it
        super().__init__(
            model,
            spec=spec.raw,
            embed_dim=1,
            logit_scale=100.0 if scale is None else math.exp(scale),
            preprocess_cfg=cfg,
            context_length=_context_length(model, tokenizer),
            logit_bias=_scalar(model, "logit_bias"),
        )
        self._calls, self._processor, self._tokenizer = calls, processor, tokenizer
        self._mask = "attention_mask" in getattr(tokenizer, "model_input_names", ())
        with torch.no_grad():  # SiglipModel has no projection_dim: the dimension is what the model gives
            self.embed_dim = int(self._image_features(torch.zeros(1, 3, *cfg.image_size, device=device)).shape[-1])

    @property
    def image_transform(self):
        processor = self._processor

        def transform(img: Image.Image) -> torch.Tensor:
            return processor(images=to_rgb(img), return_tensors="pt")["pixel_values"][0]

        return transform

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Token ids padded with -1, so the attention mask survives the trip through a DataLoader."""
        out = self._tokenizer(
            list(texts),
            padding="max_length",
            truncation=True,
            max_length=self.context_length,
            return_attention_mask=True,
            return_tensors="pt",
        )
        return out["input_ids"].masked_fill(out["attention_mask"] == 0, -1)

    def _pad_id(self) -> int:
        pad = self._tokenizer.pad_token_id
        return 0 if pad is None else int(pad)

    def _image_features(self, images: torch.Tensor) -> torch.Tensor:
        if self._calls == "open_clip":
            return _features(self.trunk.encode_image(images), "image_features")
        return _features(self.trunk.get_image_features(pixel_values=images), "image_features")

    def _image_features_and_tokens(self, images: torch.Tensor):
        return hf_visual_tokens(self.trunk, images)

    def _text_features(self, tokens: torch.Tensor) -> torch.Tensor:
        ids = tokens.masked_fill(tokens < 0, self._pad_id())
        if self._calls == "open_clip":  # open_clip towers take ids only (its HF text tower masks pads itself)
            return _features(self.trunk.encode_text(ids), "text_features")
        mask = {"attention_mask": (tokens >= 0).long()} if self._mask else {}
        return _features(self.trunk.get_text_features(input_ids=ids, **mask), "text_features")


HFClipTeacher = HFTeacher  # the name `hf-clip:` was loaded by before `hf:` existed
