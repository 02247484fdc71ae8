"""Student architecture presets: an open_clip model_cfg + preprocess_cfg + the BERT text tower's config.

Why written out here: no hub access at build time, so BiomedCLIP's open_clip config and BiomedBERT's
`config.json` are spelled out in code (values from the published files) instead of fetched. Each preset's
`text_cfg.hf_model_name` is a placeholder; `student.build` points it at the folder holding `config.json`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from teachers.kernel.registry import Registry

OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]
BIOMEDBERT_HUB_ID = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"
BIOMEDCLIP_HUB_ID = "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"


@dataclass(frozen=True)
class StudentPreset:
    """One student architecture; the dicts are copied on every access so a preset can never be mutated."""

    name: str
    description: str
    _model_cfg: dict = field(repr=False)  # open_clip model_cfg (embed_dim, vision_cfg, text_cfg)
    _preprocess_cfg: dict = field(repr=False)  # open_clip preprocess_cfg (mean, std, ...)
    _text_config: dict = field(repr=False)  # transformers BertConfig kwargs of the text tower
    tokenizer_hub_id: str | None = None  # hub tokenizer used when no tokenizer folder is given (if cached)

    @property
    def model_cfg(self) -> dict[str, Any]:
        return copy.deepcopy(self._model_cfg)

    @property
    def preprocess_cfg(self) -> dict[str, Any]:
        return copy.deepcopy(self._preprocess_cfg)

    @property
    def text_config(self) -> dict[str, Any]:
        return copy.deepcopy(self._text_config)

    @property
    def uses_timm(self) -> bool:
        return "timm_model_name" in self._model_cfg["vision_cfg"]


PRESETS: Registry[StudentPreset] = Registry("student preset")


def register_preset(preset: StudentPreset) -> StudentPreset:
    PRESETS.add(preset.name, preset)
    return preset


def get_preset(name: str) -> StudentPreset:
    """The preset called `name`; an unknown name raises KeyError with near matches."""
    return PRESETS.get(name)


def list_presets(pattern: str = "*") -> list[str]:
    return PRESETS.list(pattern)


def _bert(
    vocab_size: int = 30522,
    hidden: int = 768,
    layers: int = 12,
    heads: int = 12,
    intermediate: int = 3072,
    max_positions: int = 512,
) -> dict[str, Any]:
    """BERT config kwargs; defaults are BiomedBERT-base-uncased-abstract's config.json."""
    return {
        "model_type": "bert",
        "architectures": ["BertModel"],
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": intermediate,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "max_position_embeddings": max_positions,
        "type_vocab_size": 2,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-12,
        "pad_token_id": 0,
    }


def _hf_text_cfg(context_length: int) -> dict[str, Any]:
    """BiomedCLIP's text_cfg; hf_model_name/hf_tokenizer_name are filled in by the builder."""
    return {
        "hf_model_name": BIOMEDBERT_HUB_ID,
        "hf_tokenizer_name": BIOMEDBERT_HUB_ID,
        "hf_proj_type": "mlp",
        "hf_pooler_type": "cls_last_hidden_state_pooler",
        "context_length": context_length,
    }


# BiomedCLIP-PubMedBERT_256-vit_base_patch16_224's open_clip_config.json, key for key.
register_preset(
    StudentPreset(
        name="biomedclip",
        description="BiomedCLIP: timm ViT-B/16 at 224 + BiomedBERT-base (12 layers, 768), embed 512, context 256",
        _model_cfg={
            "embed_dim": 512,
            "vision_cfg": {
                "timm_model_name": "vit_base_patch16_224",
                "timm_model_pretrained": False,
                "timm_pool": "",
                "timm_proj": "linear",
                "image_size": 224,
            },
            "text_cfg": _hf_text_cfg(256),
        },
        _preprocess_cfg={"mean": OPENAI_MEAN, "std": OPENAI_STD},
        _text_config=_bert(),
        tokenizer_hub_id=BIOMEDBERT_HUB_ID,
    )
)

register_preset(
    StudentPreset(
        name="biomedclip-small",
        description="Small BiomedCLIP: timm ViT-S/16 at 224 + 6-layer BERT (512 wide), embed 512, context 256",
        _model_cfg={
            "embed_dim": 512,
            "vision_cfg": {
                "timm_model_name": "vit_small_patch16_224",
                "timm_model_pretrained": False,
                "timm_pool": "",
                "timm_proj": "linear",
                "image_size": 224,
            },
            "text_cfg": _hf_text_cfg(256),
        },
        _preprocess_cfg={"mean": OPENAI_MEAN, "std": OPENAI_STD},
        _text_config=_bert(hidden=512, layers=6, heads=8, intermediate=2048),
        tokenizer_hub_id=BIOMEDBERT_HUB_ID,
    )
)

# open_clip's own ViT (it honours image_size, timm towers do not in open_clip 3.3): trains on a CPU in seconds.
register_preset(
    StudentPreset(
        name="tiny",
        description="Tiny: open_clip ViT (32px, patch 8, width 64, 2 layers) + 2-layer BERT (64 wide), embed 64",
        _model_cfg={
            "embed_dim": 64,
            "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
            "text_cfg": _hf_text_cfg(32),
        },
        _preprocess_cfg={"size": 32, "mean": OPENAI_MEAN, "std": OPENAI_STD},
        _text_config=_bert(hidden=64, layers=2, heads=2, intermediate=128, max_positions=64),
        tokenizer_hub_id=None,
    )
)
