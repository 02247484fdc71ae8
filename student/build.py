"""Build the student: an open_clip model from a preset (random init) or a SPEC (pretrained init), plus its folder.

Why a folder: open_clip's Hugging Face text tower reads its BERT config with `AutoConfig.from_pretrained(
text_cfg.hf_model_name)`, so that config must live on disk. `build_student` writes a weightless export
(`open_clip_config.json`, the BERT `config.json`, the tokenizer files) into `out_dir` and points
`hf_model_name`/`hf_tokenizer_name` at it; `student.export` later adds the weights and the model card.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from huggingface_hub import hf_hub_download
from open_clip import CLIP, CustomTextCLIP
from open_clip.model import get_model_preprocess_cfg, set_model_preprocess_cfg
from open_clip.transform import PreprocessCfg, merge_preprocess_dict
from torch import nn
from transformers import AutoConfig, AutoTokenizer

from student.presets import PRESETS, StudentPreset
from teachers.open_clip_teacher import local_dir_overrides

log = logging.getLogger(__name__)

SPEC_PREFIXES = ("hf-hub:", "local-dir:")
# open_clip model_cfg top-level keys (CustomTextCLIP/CLIP constructor arguments) an override may set.
MODEL_CFG_KEYS = {
    "embed_dim",
    "vision_cfg",
    "text_cfg",
    "quick_gelu",
    "init_logit_scale",
    "init_logit_bias",
    "nonscalar_logit_scale",
    "output_dict",
    "custom_text",
}


@dataclass(frozen=True)
class StudentBundle:
    """What a training run needs from the student: the model, its configs, its tokenizer and its folder."""

    model: nn.Module  # open_clip CustomTextCLIP (or CLIP for a SPEC without an HF text tower)
    model_cfg: dict[str, Any]  # as written to student_dir/open_clip_config.json
    preprocess_cfg: dict[str, Any]  # full open_clip preprocess cfg (size, mean, std, interpolation, ...)
    tokenizer: Callable[..., torch.Tensor]  # texts -> (B, context_length) LongTensor (open_clip tokenizer)
    student_dir: Path  # weightless export: open_clip_config.json + text config.json + tokenizer files
    source: str  # the preset name or SPEC it was built from

    @property
    def embed_dim(self) -> int:
        return int(self.model_cfg["embed_dim"])

    @property
    def context_length(self) -> int:
        return int(getattr(self.tokenizer, "context_length", None) or self.model_cfg["text_cfg"]["context_length"])


def _deep_merge(base: dict, overlay: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in overlay.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def apply_overrides(
    model_cfg: dict, text_config: dict, preprocess_cfg: dict, overrides: dict[str, Any]
) -> tuple[dict, dict, dict]:
    """Merge `build_student(**overrides)` into the three configs.

    Keys: any open_clip model_cfg key (`embed_dim`, `vision_cfg={...}`, `text_cfg={...}`; dicts merge),
    `text_config={...}` for the BERT config, `preprocess_cfg={...}`, and shortcuts `image_size`,
    `context_length`, `patch_dropout`.
    """
    model_cfg, text_config, preprocess_cfg = map(copy.deepcopy, (model_cfg, text_config, preprocess_cfg))
    for key, value in overrides.items():
        if value is None:  # CLI defaults must not override preset values (timm's rule)
            continue
        if key == "text_config":
            text_config = _deep_merge(text_config, value)
        elif key == "preprocess_cfg":
            preprocess_cfg = _deep_merge(preprocess_cfg, value)
        elif key in ("image_size", "patch_dropout"):
            model_cfg["vision_cfg"][key] = value
            if key == "image_size" and "size" in preprocess_cfg:
                preprocess_cfg["size"] = value
        elif key == "context_length":
            model_cfg["text_cfg"][key] = value
        elif key in MODEL_CFG_KEYS:
            model_cfg[key] = (
                _deep_merge(model_cfg[key], value)
                if isinstance(value, dict) and isinstance(model_cfg.get(key), dict)
                else value
            )
        else:
            raise ValueError(
                f"unknown student override {key!r}; known: text_config, preprocess_cfg, image_size, "
                f"context_length, patch_dropout, {', '.join(sorted(MODEL_CFG_KEYS))}"
            )
    return model_cfg, text_config, preprocess_cfg


def write_text_config(text_config: dict[str, Any], out_dir: str | Path) -> Path:
    """Write the HF text tower's `config.json` (e.g. a BertConfig) into `out_dir`; return the file."""
    kw = dict(text_config)
    model_type = kw.pop("model_type", "bert")
    cfg = AutoConfig.for_model(model_type, **kw)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(str(out))
    return out / "config.json"


def _load_hf_tokenizer(preset: StudentPreset, tokenizer_dir: str | Path | None):
    """The transformers tokenizer for a preset: `tokenizer_dir`, else the preset's hub tokenizer if cached."""
    if tokenizer_dir is not None:
        path = Path(tokenizer_dir)
        if not path.is_dir():
            raise FileNotFoundError(f"tokenizer folder {path} not found; make one with `distill tokenizer`")
        try:
            return AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError) as e:
            raise ValueError(
                f"{path}: not a Hugging Face tokenizer folder ({e}); make one with "
                f"`distill tokenizer --data CORPUS --vocab-size N --out DIR`"
            ) from e
    if preset.tokenizer_hub_id:
        try:
            return AutoTokenizer.from_pretrained(preset.tokenizer_hub_id, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ValueError(
                f"preset {preset.name!r} uses the tokenizer {preset.tokenizer_hub_id}, which is not in the local "
                f"Hugging Face cache ({type(e).__name__}); pass tokenizer_dir= (train one with `distill tokenizer`) "
                f"or download that tokenizer first"
            ) from e
    raise ValueError(
        f"preset {preset.name!r} has no tokenizer of its own: pass tokenizer_dir= "
        f"(train one with `distill tokenizer --data CORPUS --vocab-size N --out DIR`)"
    )


def instantiate(model_cfg: dict[str, Any], preprocess_cfg: dict[str, Any] | None = None) -> nn.Module:
    """An open_clip model from a model_cfg, randomly initialised (honours the current device context, e.g. meta).

    Same class choice as `open_clip.create_model`: CustomTextCLIP for an HF text tower, CLIP otherwise.
    Refuses a timm tower whose trunk would not use `vision_cfg.image_size` (open_clip 3.3 ignores it).
    """
    cfg = copy.deepcopy(model_cfg)
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    is_timm, is_hf = "timm_model_name" in vision, "hf_model_name" in text
    if is_timm:
        vision["timm_model_pretrained"] = False
    if is_hf:
        text["hf_model_pretrained"] = False
    custom = cfg.pop("custom_text", False) or is_hf
    model = (CustomTextCLIP if custom else CLIP)(**cfg)
    if is_timm:
        trunk_size = getattr(getattr(model.visual.trunk, "patch_embed", None), "img_size", None)
        want = vision.get("image_size", 224)
        want = (want, want) if isinstance(want, int) else tuple(want)
        if trunk_size is not None and tuple(trunk_size) != want:
            raise ValueError(
                f"timm tower {vision['timm_model_name']} runs at {tuple(trunk_size)} but vision_cfg.image_size is "
                f"{want}: open_clip ignores image_size for timm towers, so such a model would not load in stock "
                f"open_clip; use a timm model made for that size, or open_clip's own ViT (like the tiny preset)"
            )
    pp = merge_preprocess_dict(asdict(PreprocessCfg()), preprocess_cfg or {})
    if getattr(model.visual, "image_size", None) is not None:
        pp["size"] = model.visual.image_size
    set_model_preprocess_cfg(model, pp)
    return model


def _write_open_clip_config(out_dir: Path, model_cfg: dict, preprocess_cfg: dict) -> None:
    (out_dir / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, indent=2) + "\n"
    )


def name_text_tower(model_cfg: dict, name: str) -> dict:
    """A copy of model_cfg whose HF text tower reads its config and tokenizer from `name` (a folder or hub id)."""
    cfg = copy.deepcopy(model_cfg)
    text = cfg["text_cfg"]
    if "hf_model_name" in text:
        text["hf_model_name"] = name
        if "hf_tokenizer_name" in text:
            text["hf_tokenizer_name"] = name
    text.pop("hf_model_pretrained", None)
    return cfg


def _point_text_at(model_cfg: dict, folder: Path) -> dict:
    """model_cfg with the HF text tower's config and tokenizer names pointing at `folder` (absolute)."""
    return name_text_tower(model_cfg, str(folder.resolve()))


def _build_from_preset(preset: StudentPreset, out: Path, tokenizer_dir, overrides: dict):
    model_cfg, text_config, preprocess_cfg = apply_overrides(
        preset.model_cfg, preset.text_config, preset.preprocess_cfg, overrides
    )
    tok = _load_hf_tokenizer(preset, tokenizer_dir)
    text_config["vocab_size"] = len(tok)
    if tok.pad_token_id is not None:
        text_config["pad_token_id"] = tok.pad_token_id
    ctx = model_cfg["text_cfg"]["context_length"]
    if text_config.get("max_position_embeddings", ctx) < ctx:
        raise ValueError(
            f"context_length {ctx} exceeds the text tower's max_position_embeddings "
            f"{text_config['max_position_embeddings']}; raise text_config.max_position_embeddings"
        )
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out))
    write_text_config(text_config, out)
    model_cfg = _point_text_at(model_cfg, out)
    _write_open_clip_config(out, model_cfg, preprocess_cfg)
    return instantiate(model_cfg, preprocess_cfg), model_cfg


def _read_spec_config(spec: str) -> tuple[dict, dict, str | None]:
    """(model_cfg, preprocess_cfg, local folder or None) of an `hf-hub:`/`local-dir:` model."""
    if spec.startswith("local-dir:"):
        folder = Path(spec[len("local-dir:") :])
        cfg_file = folder / "open_clip_config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{cfg_file} not found: a local-dir: model folder needs open_clip_config.json")
        cfg = json.loads(cfg_file.read_text())
        return cfg["model_cfg"], cfg.get("preprocess_cfg", {}), str(folder)
    cfg = json.loads(Path(hf_hub_download(spec[len("hf-hub:") :], "open_clip_config.json")).read_text())
    return cfg["model_cfg"], cfg.get("preprocess_cfg", {}), None


def _build_from_spec(spec: str, out: Path, overrides: dict):
    source_cfg, preprocess_cfg, folder = _read_spec_config(spec)
    base = _deep_merge(source_cfg, local_dir_overrides(folder) if folder else {})
    model_cfg, text_config, preprocess_cfg = apply_overrides(base, {}, preprocess_cfg, overrides)
    if text_config:
        raise ValueError("text_config= cannot change a pretrained student's text tower (its weights fix it)")
    kwargs = {k: v for k, v in model_cfg.items() if source_cfg.get(k) != v}  # model kwargs replace whole keys
    model = open_clip.create_model(spec, pretrained_image=False, pretrained_text=False, **kwargs)
    model.train()
    out.mkdir(parents=True, exist_ok=True)
    if "hf_model_name" in model_cfg["text_cfg"]:
        model.text.config.save_pretrained(str(out))
    tokenizer = open_clip.get_tokenizer(spec)
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(out))
    model_cfg = _point_text_at(model_cfg, out)
    _write_open_clip_config(out, model_cfg, preprocess_cfg)
    return model, model_cfg


def build_student(
    preset_or_spec: str, out_dir: str | Path, tokenizer_dir: str | Path | None = None, **overrides: Any
) -> StudentBundle:
    """Build the student and write its weightless folder into `out_dir` (e.g. RUN/student-config).

    `preset_or_spec`: a preset name (`biomedclip`, `biomedclip-small`, `tiny`; random init, deterministic
    under `torch.manual_seed`) or a SPEC `hf-hub:ORG/REPO` / `local-dir:PATH` (initialised from its weights).
    `tokenizer_dir`: a Hugging Face tokenizer folder (`distill tokenizer`); the BERT vocab size follows it.
    `overrides`: see `apply_overrides` (e.g. `embed_dim=256`, `patch_dropout=0.5`, `text_config={...}`).
    """
    out = Path(out_dir)
    if preset_or_spec in PRESETS:
        model, model_cfg = _build_from_preset(PRESETS.get(preset_or_spec), out, tokenizer_dir, overrides)
    elif preset_or_spec.startswith(SPEC_PREFIXES):
        if tokenizer_dir is not None:
            raise ValueError(
                f"tokenizer_dir= cannot be used with the pretrained SPEC {preset_or_spec!r}: its "
                f"text tower was trained with its own tokenizer, which comes with it"
            )
        model, model_cfg = _build_from_spec(preset_or_spec, out, overrides)
    else:
        try:
            PRESETS.get(preset_or_spec)
        except KeyError as e:
            raise ValueError(
                f"{e.args[0]}; or give a SPEC starting with {' or '.join(SPEC_PREFIXES)} "
                f"to start from pretrained weights"
            ) from None
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    log.info(
        "built student %s in %s (%.1fM parameters)",
        preset_or_spec,
        out,
        sum(p.numel() for p in model.parameters()) / 1e6,
    )
    return StudentBundle(
        model=model,
        model_cfg=model_cfg,
        preprocess_cfg=dict(get_model_preprocess_cfg(model)),
        tokenizer=tokenizer,
        student_dir=out,
        source=preset_or_spec,
    )
