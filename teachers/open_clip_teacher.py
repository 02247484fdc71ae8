"""open_clip back-end: built-in `MODEL/TAG`, `hf-hub:org/repo` and `local-dir:PATH` models.

Also the fix for moved exports: stock open_clip finds a Hugging Face text tower's config by the name in
`text_cfg.hf_model_name`, which goes stale when an exported folder is moved; `local_dir_overrides` points it
at the config inside the folder instead (used here and by `student.load_student`).
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.constants import HF_CONFIG_NAME, HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
from open_clip.model import get_model_preprocess_cfg
from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model

from teachers.base import Teacher
from teachers.hub import require_hub_file
from teachers.spec import Spec
from teachers.tokens import open_clip_visual_tokens
from teachers.transforms import PreprocessCfg
from teachers.weights import REDO_HINT, find_weights, reading_weights


def local_dir_overrides(path: str | os.PathLike) -> dict:
    """Model kwargs that make `create_model("local-dir:PATH")` work after the folder was moved.

    Returns `{"text_cfg": {...}}` with `hf_model_name`/`hf_tokenizer_name` pointing into PATH when PATH
    holds the text tower's own `config.json`; `{}` when nothing needs fixing.
    """
    path = Path(path)
    cfg_file = path / "open_clip_config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} not found: a local-dir: model folder needs open_clip_config.json")
    try:
        model_cfg = json.loads(cfg_file.read_text())["model_cfg"]
    except (json.JSONDecodeError, KeyError) as e:
        raise ValueError(f"{cfg_file}: not a valid open_clip config ({e})") from e
    text_cfg = dict(model_cfg.get("text_cfg", {}))
    if "hf_model_name" not in text_cfg or not (path / "config.json").is_file():
        return {}
    try:  # transformers would say "not a valid JSON file" only inside a long multi-line error
        json.loads((path / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path / 'config.json'}: the text tower's config is not valid JSON ({e}); {REDO_HINT}") from e
    text_cfg["hf_model_name"] = str(path.resolve())
    text_cfg["hf_model_pretrained"] = False  # weights come from the folder's safetensors
    if text_cfg.get("hf_tokenizer_name"):
        text_cfg["hf_tokenizer_name"] = str(path.resolve())
    return {"text_cfg": text_cfg}


def open_clip_args(spec: Spec) -> tuple[str, str | None, dict]:
    """(model_name, pretrained, kwargs) for `open_clip.create_model_and_transforms`, checked before any download.

    Every form must load real weights (`require_pretrained`): open_clip only warns and returns a randomly
    initialised model when an `hf-hub:` repo lacks weights, which would silently fill a cache with noise.
    A built-in `MODEL/TAG` whose tag was trained with QuickGELU (the `openai` tags) gets `force_quick_gelu`, as
    open_clip's README asks; otherwise the activations differ from training and the embeddings are wrong.
    """
    kwargs: dict = {"require_pretrained": True}
    if spec.kind == "local-dir":
        return f"local-dir:{spec.target}", None, {**kwargs, **local_dir_overrides(spec.target)}
    if spec.kind == "hf-hub":
        return f"hf-hub:{spec.target}", None, kwargs
    model_name, _, tag = spec.target.partition("/")
    if model_name not in open_clip.list_models():
        near = difflib.get_close_matches(model_name, open_clip.list_models(), n=3)
        raise ValueError(
            f"SPEC {spec.raw!r}: {model_name!r} is not an open_clip built-in model"
            + (f"; did you mean {', '.join(near)}?" if near else "; see open_clip.list_models()")
        )
    cfg = get_pretrained_cfg(model_name, tag)
    if not cfg:
        tags = list_pretrained_tags_by_model(model_name)
        raise ValueError(
            f"SPEC {spec.raw!r}: {tag!r} is not a pretrained tag of {model_name}; known tags: "
            f"{', '.join(tags) or 'none (use hf-hub:ORG/REPO or local-dir:PATH)'}"
        )
    if cfg.get("quick_gelu", False):
        kwargs["force_quick_gelu"] = True
    return model_name, tag, kwargs


def hub_files(spec: Spec) -> list[tuple[str, tuple[str, ...]]]:
    """(hub repo, the names open_clip tries for one file) for the first file open_clip will fetch for `spec`."""
    if spec.kind == "hf-hub":
        return [(spec.target, (HF_CONFIG_NAME,))]  # its first file; a missing weights file is open_clip's to name
    if spec.kind == "local-dir":
        return []
    model_name, _, tag = spec.target.partition("/")
    hub = (get_pretrained_cfg(model_name, tag) or {}).get("hf_hub")
    if not hub:
        return []  # a URL-only tag: open_clip downloads it without the Hub
    repo, filename = os.path.split(hub)  # open_clip's rule: "org/name/" means its default weights file
    filename = filename or HF_WEIGHTS_NAME
    safe = HF_SAFE_WEIGHTS_NAME if filename == HF_WEIGHTS_NAME else os.path.splitext(filename)[0] + ".safetensors"
    return [(repo, (safe, filename) if safe != filename else (filename,))]


def create_open_clip(spec: Spec, device: str | torch.device = "cpu"):
    """(model, preprocess, tokenizer) for an open_clip SPEC, offline-safe for our own exports."""
    name, pretrained, kwargs = open_clip_args(spec)
    for repo, files in hub_files(spec):  # before open_clip, whose downloads retry for ~25 s with no network
        require_hub_file(repo, files)
    weights = find_weights(spec.target) if spec.kind == "local-dir" else None  # named before open_clip warns
    with reading_weights(weights) if weights else nullcontext():
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=pretrained, device=device, **kwargs
        )
    tokenizer = open_clip.get_tokenizer(name)
    return model, preprocess, tokenizer


class OpenClipTeacher(Teacher):
    """A frozen open_clip model; its own preprocess and tokenizer come from open_clip."""

    def __init__(self, spec: Spec, device: str | torch.device = "cpu"):
        model, preprocess, tokenizer = create_open_clip(spec, device)
        cfg = PreprocessCfg.from_open_clip(get_model_preprocess_cfg(model))
        self._setup(model, preprocess, tokenizer, spec.raw, cfg, device)

    @classmethod
    def from_parts(
        cls,
        model,
        preprocess,
        tokenizer,
        *,
        spec: str,
        preprocess_cfg: PreprocessCfg,
        device: str | torch.device = "cpu",
    ) -> OpenClipTeacher:
        """A model with open_clip's interface (encode_image, encode_text, logit_scale) built by other code, e.g. a
        fork of open_clip (UniMed-CLIP), as a Teacher: what a `py:` adapter returns (docs/teachers.md).
        `preprocess_cfg` says what `preprocess` does (views are resized the same way)."""
        teacher = cls.__new__(cls)
        teacher._setup(model, preprocess, tokenizer, spec, preprocess_cfg, device)
        return teacher

    def _setup(self, model, preprocess, tokenizer, spec: str, cfg: PreprocessCfg, device) -> None:
        ctx: Any = getattr(tokenizer, "context_length", None) or getattr(model, "context_length", 77)
        with torch.no_grad():
            dim = model.encode_image(torch.zeros(1, 3, *cfg.image_size, device=device)).shape[-1]
        scale = float(model.logit_scale.detach().exp().item())
        bias = getattr(model, "logit_bias", None)  # open_clip's SigLIP models are sigmoid models
        Teacher.__init__(
            self,
            model,
            spec=spec,
            embed_dim=dim,
            logit_scale=scale,
            preprocess_cfg=cfg,
            context_length=ctx,
            logit_bias=None if bias is None else float(bias.detach().reshape(-1)[0]),
        )
        self._preprocess = preprocess
        self._tokenizer = tokenizer

    @property
    def image_transform(self):
        return self._preprocess

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self._tokenizer(list(texts))

    def _image_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.trunk.encode_image(images)

    def _text_features(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.trunk.encode_text(tokens)

    def _image_features_and_tokens(self, images: torch.Tensor):
        return open_clip_visual_tokens(self.trunk.visual, images)
