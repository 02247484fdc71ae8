"""Tiny, randomly initialised teachers written to folders, loaded back through the real loading paths.

Why: no weights can be downloaded on CI or on an offline laptop, yet tests and benchmarks need teachers of
different kinds and dimensions. Each builder writes exactly what the real back-end reads (`local-dir:` for
open_clip, `hf-clip:` and `hf:` for transformers), so loading is not mocked.
Why in `distill` (the top room): the tests and the benchmarks share these builders through one importable module,
and they build their tokenizer with `student.tokenizer`, which the bottom room (`teachers`) may not import.
"""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from student.tokenizer import train_wordpiece

DEFAULT_TEXTS = [
    "a ct scan of the chest",
    "an mri of the brain",
    "dermoscopy of a melanoma",
    "a chest x-ray with pneumonia",
    "histology of a tumour",
    "ultrasound of the breast",
]


def make_tiny_open_clip(
    out_dir: str | Path, embed_dim: int = 24, image_size: int = 32, width: int = 32, layers: int = 2, seed: int = 0
) -> Path:
    """An open_clip CLIP with its own ViT and text transformer, saved as a `local-dir:` folder."""
    import open_clip  # noqa: PLC0415 (lazy: heavy, per back-end)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_cfg = {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": image_size, "layers": layers, "width": width, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": width, "heads": 2, "layers": layers},
    }
    preprocess_cfg = {
        "size": image_size,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.25, 0.25],
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }
    torch.manual_seed(seed)
    model = open_clip.CLIP(**model_cfg)
    (out / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, indent=2)
    )
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "open_clip_model.safetensors"))
    return out


def make_tiny_hf_clip(
    out_dir: str | Path,
    projection_dim: int = 40,
    image_size: int = 32,
    hidden: int = 32,
    layers: int = 2,
    texts: Sequence[str] = DEFAULT_TEXTS,
    seed: int = 0,
) -> Path:
    """A `transformers.CLIPModel` with a WordPiece tokenizer and CLIPImageProcessor, as an `hf-clip:` folder."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel  # noqa: PLC0415 (lazy: heavy, per back-end)

    out = Path(out_dir)
    train_wordpiece(list(texts) * 4, out, vocab_size=200, model_max_length=32)
    tok = AutoTokenizer.from_pretrained(str(out))
    cfg = CLIPConfig(
        text_config={
            "vocab_size": len(tok),
            "hidden_size": hidden,
            "intermediate_size": 2 * hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": 2,
            "max_position_embeddings": 32,
            "pad_token_id": tok.pad_token_id,
            "bos_token_id": tok.cls_token_id,
            "eos_token_id": tok.sep_token_id,
        },
        vision_config={
            "hidden_size": hidden,
            "intermediate_size": 2 * hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": 2,
            "image_size": image_size,
            "patch_size": 8,
        },
        projection_dim=projection_dim,
    )
    torch.manual_seed(seed)
    CLIPModel(cfg).save_pretrained(str(out))
    CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.25, 0.25, 0.25],
    ).save_pretrained(str(out))
    return out


def _tiny_wordpiece(out: Path, texts: Sequence[str], context: int):
    """A WordPiece fast tokenizer saved into `out` (the tiny models' stand-in for each model's own tokenizer)."""
    from transformers import AutoTokenizer  # noqa: PLC0415 (lazy: heavy, per back-end)

    train_wordpiece(list(texts) * 4, out, vocab_size=200, model_max_length=context)
    return AutoTokenizer.from_pretrained(str(out))


def make_tiny_hf_siglip(
    out_dir: str | Path,
    hidden: int = 32,
    image_size: int = 32,
    context: int = 16,
    logit_scale: float = 7.0,
    logit_bias: float = -3.5,
    texts: Sequence[str] = DEFAULT_TEXTS,
    seed: int = 0,
) -> Path:
    """A `transformers.SiglipModel` (what MedSigLIP and fixed-resolution SigLIP 2 load as) with a
    SiglipImageProcessor (squash to height x width, mean/std 0.5) and a set logit scale and bias, as an `hf:` folder."""
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel  # noqa: PLC0415 (lazy: heavy, per back-end)

    out = Path(out_dir)
    tok = _tiny_wordpiece(out, texts, context)
    tower = {"hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": 2, "num_attention_heads": 2}
    cfg = SiglipConfig(
        text_config={
            **tower,
            "vocab_size": len(tok),
            "max_position_embeddings": context,
            "projection_size": hidden,
            "pad_token_id": tok.pad_token_id,
            "bos_token_id": tok.cls_token_id,
            "eos_token_id": tok.sep_token_id,
        },
        vision_config={**tower, "image_size": image_size, "patch_size": 8},
    )
    torch.manual_seed(seed)
    model = SiglipModel(cfg)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(logit_scale))
        model.logit_bias.fill_(logit_bias)
    model.save_pretrained(str(out))
    SiglipImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(str(out))
    return out


def make_tiny_hf_siglip2_naflex(out_dir: str | Path, hidden: int = 32, seed: int = 0) -> Path:
    """A SigLIP 2 NaFlex `Siglip2Model` (variable patch counts per image): only its weights and config."""
    from transformers import Siglip2Config, Siglip2Model  # noqa: PLC0415 (lazy: heavy, per back-end)

    tower = {"hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": 1, "num_attention_heads": 2}
    torch.manual_seed(seed)
    out = Path(out_dir)
    Siglip2Model(
        Siglip2Config(
            text_config={**tower, "vocab_size": 100}, vision_config={**tower, "num_patches": 16, "patch_size": 8}
        )
    ).save_pretrained(str(out))
    return out


REMOTE_MODELING = '''"""A tiny dual encoder shipped as a repo's own code (config.json auto_map)."""
import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel


class TinyDualConfig(PretrainedConfig):
    model_type = "tiny-dual"

    def __init__(self, vocab_size=200, dim=20, image_size=16, max_position_embeddings=16, pad_token_id=0, **kwargs):
        self.vocab_size, self.dim, self.image_size = vocab_size, dim, image_size
        self.max_position_embeddings = max_position_embeddings
        super().__init__(pad_token_id=pad_token_id, **kwargs)


class _Towers(PreTrainedModel):
    config_class = TinyDualConfig

    def __init__(self, config):
        super().__init__(config)
        self.vision = nn.Linear(3 * config.image_size ** 2, config.dim)
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.text = nn.Linear(config.dim, config.dim)
        self.logit_scale = nn.Parameter(torch.tensor(2.5))
        self.post_init()

    def _init_weights(self, module):
        pass  # every weight comes from the checkpoint

    def _image(self, pixel_values):
        return self.vision(pixel_values.flatten(1))

    def _text(self, input_ids, attention_mask):
        m = attention_mask.unsqueeze(-1).float()
        return self.text((self.embed(input_ids) * m).sum(1) / m.sum(1))


class TinyDualModel(_Towers):
    """transformers' calls: get_image_features / get_text_features."""

    def get_image_features(self, pixel_values):
        return self._image(pixel_values)

    def get_text_features(self, input_ids, attention_mask=None):
        return self._text(input_ids, torch.ones_like(input_ids) if attention_mask is None else attention_mask)


class TinyOpenClipStyleModel(_Towers):
    """open_clip's calls, as models built on open_clip ship them: encode_image -> tuple, encode_text(ids) -> dict;
    the text tower masks pads itself (open_clip's HF text tower does)."""

    def encode_image(self, image):
        return self._image(image), None

    def encode_text(self, text):
        return {"text_features": self._text(text, (text != self.config.pad_token_id).long())}
'''


def make_tiny_remote_code(
    out_dir: str | Path,
    style: str = "transformers",
    image_size: int = 16,
    dim: int = 20,
    texts: Sequence[str] = DEFAULT_TEXTS,
    seed: int = 0,
) -> Path:
    """A model folder whose config.json names its own code (auto_map -> modeling_tiny_dual.py in the folder), as
    hub models with remote code are published; `style` picks transformers' or open_clip's feature calls."""
    from transformers import CLIPImageProcessor  # noqa: PLC0415 (lazy: heavy, per back-end)

    out = Path(out_dir)
    tok = _tiny_wordpiece(out, texts, 16)
    (out / "modeling_tiny_dual.py").write_text(REMOTE_MODELING)
    spec = importlib.util.spec_from_file_location(f"tiny_dual_{out.name}", out / "modeling_tiny_dual.py")
    if spec is None or spec.loader is None:  # a .py path always has a spec and loader
        raise ImportError(f"cannot load {out / 'modeling_tiny_dual.py'}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cls = "TinyDualModel" if style == "transformers" else "TinyOpenClipStyleModel"
    cfg = module.TinyDualConfig(vocab_size=len(tok), dim=dim, image_size=image_size, pad_token_id=tok.pad_token_id)
    cfg.auto_map = {"AutoConfig": "modeling_tiny_dual.TinyDualConfig", "AutoModel": f"modeling_tiny_dual.{cls}"}
    torch.manual_seed(seed)
    getattr(module, cls)(cfg).save_pretrained(str(out))
    CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.25, 0.25, 0.25],
    ).save_pretrained(str(out))
    return out
