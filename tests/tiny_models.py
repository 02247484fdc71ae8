"""Tiny, randomly initialised teachers written to folders, loaded back through the real loading paths.

Why: no weights can be downloaded on CI or on an offline laptop, yet tests and benchmarks need teachers of
different kinds and dimensions. Each builder writes exactly what the real back-end reads (`local-dir:` for
open_clip, `hf-clip:` for transformers), so loading is not mocked.
Why in tests/ and not in `teachers/`: it is test scaffolding, and it builds its tokenizer with
`student.tokenizer`, which the bottom room may not import. Tests import it by module name (pytest puts tests/
on sys.path); the benchmarks put tests/ on sys.path themselves.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

DEFAULT_TEXTS = ["a ct scan of the chest", "an mri of the brain", "dermoscopy of a melanoma",
                 "a chest x-ray with pneumonia", "histology of a tumour", "ultrasound of the breast"]


def make_tiny_open_clip(out_dir: str | Path, embed_dim: int = 24, image_size: int = 32, width: int = 32,
                        layers: int = 2, seed: int = 0) -> Path:
    """An open_clip CLIP with its own ViT and text transformer, saved as a `local-dir:` folder."""
    import open_clip
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_cfg = {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": image_size, "layers": layers, "width": width, "patch_size": 8,
                       "head_width": 16},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": width, "heads": 2, "layers": layers},
    }
    preprocess_cfg = {"size": image_size, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
                      "interpolation": "bicubic", "resize_mode": "shortest"}
    torch.manual_seed(seed)
    model = open_clip.CLIP(**model_cfg)
    (out / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, indent=2))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "open_clip_model.safetensors"))
    return out


def make_tiny_hf_clip(out_dir: str | Path, projection_dim: int = 40, image_size: int = 32, hidden: int = 32,
                      layers: int = 2, texts: Sequence[str] = DEFAULT_TEXTS, seed: int = 0) -> Path:
    """A `transformers.CLIPModel` with a WordPiece tokenizer and CLIPImageProcessor, as an `hf-clip:` folder."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel

    from student.tokenizer import train_wordpiece

    out = Path(out_dir)
    train_wordpiece(list(texts) * 4, out, vocab_size=200, model_max_length=32)
    tok = AutoTokenizer.from_pretrained(str(out))
    cfg = CLIPConfig(
        text_config={"vocab_size": len(tok), "hidden_size": hidden, "intermediate_size": 2 * hidden,
                     "num_hidden_layers": layers, "num_attention_heads": 2, "max_position_embeddings": 32,
                     "pad_token_id": tok.pad_token_id, "bos_token_id": tok.cls_token_id,
                     "eos_token_id": tok.sep_token_id},
        vision_config={"hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": layers,
                       "num_attention_heads": 2, "image_size": image_size, "patch_size": 8},
        projection_dim=projection_dim)
    torch.manual_seed(seed)
    CLIPModel(cfg).save_pretrained(str(out))
    CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                       image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.25, 0.25]).save_pretrained(str(out))
    return out
