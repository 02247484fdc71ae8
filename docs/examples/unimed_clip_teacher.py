"""A `py:` teacher for UniMed-CLIP (github.com/mbzuai-oryx/UniMed-CLIP), whose release loads only through its own
copy of open_clip (`src/open_clip`: a CLIP whose text tower is BiomedBERT, chosen by `text_encoder_name`).

Why an adapter and no alias: the fork is not on PyPI and shares the installed open_clip's package name, and the
weights are pickles (`*.pt`). This file imports the fork under another name (`unimed_open_clip`), loads the weights
from a safetensors copy made once by `convert` (tensors only: nothing is unpickled when a teacher loads), and wraps
the model with `OpenClipTeacher.from_parts`, with the fork's own eval transform (shortest side to the model's size,
centre crop, bicubic, OpenAI mean/std) and tokenizer (`HFTokenizer`, 256 tokens), as the release's README uses them.

Setup, once (licence of the weights: CC BY-NC 4.0):
    git clone https://github.com/mbzuai-oryx/UniMed-CLIP        # the fork; pip install ftfy regex (it imports them)
    hf download UzairK/unimed-clip-vit-b16 unimed-clip-vit-b16.pt --local-dir weights
    python docs/examples/unimed_clip_teacher.py convert weights/unimed-clip-vit-b16.pt weights/unimed-b16.safetensors
Use (BiomedBERT's tokenizer and config come from the Hugging Face cache, like any hub model):
    export UNIMED_CLIP_SRC=$PWD/UniMed-CLIP/src UNIMED_CLIP_WEIGHTS=$PWD/weights/unimed-b16.safetensors
    PYTHONPATH=docs/examples distill cache --data corpus.csv --teacher unimed=py:unimed_clip_teacher:vit_b16 ...
Released sizes (model name, text encoder, hub repo and file, from the release's README and its demo app.py):
    vit_b16             ViT-B-16-quickgelu      BiomedBERT-base   UzairK/unimed-clip-vit-b16 / unimed-clip-vit-b16.pt
    vit_l14_base_text   ViT-L-14-336-quickgelu  BiomedBERT-base   UzairK/unimed_clip_vit_l14_base_text_encoder /
                                                                  unimed_clip_vit_l14_base_text_encoder.pt
    vit_l14_large_text  ViT-L-14-336-quickgelu  BiomedBERT-large  UzairK/unimed_clip_vit_l14_large_text_encoder
                                                                  (file name not checked: list the repo's files)
Not run here: neither the fork nor the weights can be fetched on our machines. `convert` and the wrapping
(`from_parts`) are tested (tests/test_hf_backends.py); compare a few embeddings with the release's README example
before caching a corpus.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from teachers.open_clip_teacher import OpenClipTeacher
from teachers.transforms import OPENAI_MEAN, OPENAI_STD, PreprocessCfg

TEXT_BASE = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"
TEXT_LARGE = "microsoft/BiomedNLP-BiomedBERT-large-uncased-abstract"
CONTEXT_LENGTH = 256  # the release's HFTokenizer(..., context_length=256)


def convert(checkpoint: str, out: str) -> None:
    """The release's pickle -> safetensors, once. `weights_only` refuses anything but tensors, containers and the
    numpy scalars the release stores beside them (its training metadata); the weights are its `state_dict`."""
    scalar = (np._core if hasattr(np, "_core") else np.core).multiarray.scalar
    allowed = [
        np.dtype,
        scalar,
        (scalar, "numpy.core.multiarray.scalar"),  # numpy 2's name, and numpy 1's
        *(type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool")),
    ]
    with torch.serialization.safe_globals(allowed):
        ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else ckpt
    state = {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in state.items()}
    save_file({k: v.contiguous() for k, v in state.items() if torch.is_tensor(v)}, out)


def fork(src: str):
    """The fork's `src/open_clip` imported as `unimed_open_clip` (its imports are relative), beside open_clip."""
    name = "unimed_open_clip"
    if name not in sys.modules:
        init = Path(src) / "open_clip" / "__init__.py"
        if not init.is_file():
            raise FileNotFoundError(f"{init} not found: set UNIMED_CLIP_SRC to the src folder of a UniMed-CLIP clone")
        spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(init.parent)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def load(
    model_name: str, text_encoder: str, device="cpu", src: str | None = None, weights: str | None = None
) -> OpenClipTeacher:
    """UniMed-CLIP `model_name` + `text_encoder` with the weights converted by `convert`, as a Teacher."""
    oc = fork(src or os.environ["UNIMED_CLIP_SRC"])
    model, _, preprocess = oc.create_model_and_transforms(
        model_name, "", force_quick_gelu=True, mean=OPENAI_MEAN, std=OPENAI_STD, text_encoder_name=text_encoder
    )
    # strict: the fork's own loader uses strict=False, which would leave a missing tensor randomly initialised
    model.load_state_dict(load_file(weights or os.environ["UNIMED_CLIP_WEIGHTS"]), strict=True)
    size = model.visual.image_size
    cfg = PreprocessCfg(
        image_size=tuple(size) if isinstance(size, (tuple, list)) else (size, size),
        mean=OPENAI_MEAN,
        std=OPENAI_STD,
        interpolation="bicubic",
        resize_mode="shortest",
    )
    tokenizer = oc.HFTokenizer(text_encoder, context_length=CONTEXT_LENGTH)
    return OpenClipTeacher.from_parts(
        model.to(device).eval(),
        preprocess,
        tokenizer,
        spec=f"unimed-clip:{model_name}",
        preprocess_cfg=cfg,
        device=device,
    )


def vit_b16(device="cpu") -> OpenClipTeacher:
    return load("ViT-B-16-quickgelu", TEXT_BASE, device)


def vit_l14_base_text(device="cpu") -> OpenClipTeacher:
    return load("ViT-L-14-336-quickgelu", TEXT_BASE, device)


def vit_l14_large_text(device="cpu") -> OpenClipTeacher:
    return load("ViT-L-14-336-quickgelu", TEXT_LARGE, device)


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "convert":
        sys.exit("usage: python unimed_clip_teacher.py convert CHECKPOINT.pt OUT.safetensors")
    convert(sys.argv[2], sys.argv[3])
    print(f"wrote {sys.argv[3]}")
