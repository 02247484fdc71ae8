"""Patch tokens of a vision tower: the last layer's spatial tokens, for spatial (dense) distillation.

What "patch tokens" means here, for every back-end the same way: the last block's output AFTER the tower's final
norm (as AM-RADIO distils them), with every prefix token (CLS, registers, distillation tokens) removed, as
(B, h*w, D) in row-major grid order, D the tower's width (no projection). Per tower kind:
- open_clip's own `VisionTransformer`: `ln_post` applied to the tokens after `transformer` (what its
  `forward_intermediates(normalize_intermediates=True)` returns for the last block);
- a timm trunk (open_clip's `TimmModel`, BiomedCLIP): `trunk.forward_features` (ends with the trunk's `norm`)
  minus its `num_prefix_tokens`;
- `transformers` CLIP: `post_layernorm` applied to `last_hidden_state[:, 1:]` (CLIP normalises only its pooled
  CLS token; the same LayerNorm as open_clip's `ln_post` for the same weights); SigLIP: `last_hidden_state`, which
  is already normalised and has no CLS token.
Each function returns the pooled embedding of the same forward pass too, so a cache or a student pays one pass.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Grid = tuple[int, int]


class TokensUnsupported(ValueError):
    """This model cannot give patch tokens (not a ViT, or an attention-pooled tower); the message says which."""


def pool_tokens(tokens: Tensor, grid: Grid, size: int) -> Tensor:
    """(B, h*w, D) tokens on an (h, w) grid average-pooled to (B, size*size, D) (`adaptive_avg_pool2d`).

    A `size` above h or w would repeat tokens rather than pool them: refused.
    """
    h, w = grid
    b, n, d = tokens.shape
    if n != h * w:
        raise ValueError(f"{n} tokens do not fill a {h} x {w} grid")
    if not 0 < size <= min(h, w):
        raise ValueError(
            f"a {size} x {size} token grid needs a patch grid of at least that size; this one is {h} x {w}"
        )
    x = tokens.transpose(1, 2).reshape(b, d, h, w)
    return F.adaptive_avg_pool2d(x, size).flatten(2).transpose(1, 2)


def _grid(images: Tensor, patch: tuple[int, int]) -> Grid:
    return images.shape[-2] // patch[0], images.shape[-1] // patch[1]


def _pair(x) -> tuple[int, int]:
    return (int(x[0]), int(x[1])) if isinstance(x, (tuple, list)) else (int(x), int(x))


def open_clip_visual_tokens(visual: nn.Module, images: Tensor) -> tuple[Tensor, Tensor, Grid]:
    """(pooled image features (B, E), patch tokens (B, h*w, D), (h, w)) of an open_clip image tower, one pass.

    Patch dropout (training only) would drop tokens: the caller must keep it off when tokens are used.
    """
    tower: Any = visual  # open_clip's tower classes, duck-typed: the attributes used are checked below
    trunk = getattr(visual, "trunk", None)
    if trunk is not None:  # open_clip TimmModel: the timm trunk, then open_clip's head
        if not (hasattr(trunk, "forward_features") and hasattr(trunk, "patch_embed")):
            raise TokensUnsupported(f"the timm trunk {type(trunk).__name__} is not a ViT: it has no patch tokens")
        feats = trunk.forward_features(images)
        pooled = tower.head(trunk.forward_head(feats))
        grid = _grid(images, _pair(trunk.patch_embed.patch_size))
        return pooled, feats[:, int(getattr(trunk, "num_prefix_tokens", 1)) :], grid
    if not (hasattr(visual, "conv1") and hasattr(visual, "transformer") and hasattr(visual, "_pool")):
        raise TokensUnsupported(f"the image tower {type(visual).__name__} is not a ViT: it has no patch tokens")
    if getattr(visual, "attn_pool", None) is not None:
        raise TokensUnsupported(
            "this open_clip ViT pools by attention (CoCa): its final norm is sized for the pooler, not the patch tokens"
        )
    x = tower.transformer(tower._embeds(images))
    pooled, _ = tower._pool(x)
    if tower.proj is not None:
        pooled = pooled @ tower.proj
    return pooled, tower.ln_post(x[:, 1:]), _grid(images, _pair(tower.patch_size))


def hf_visual_tokens(model: nn.Module, images: Tensor) -> tuple[Tensor, Tensor, Grid]:
    """(projected image features (B, E), patch tokens (B, h*w, D), (h, w)) of a `transformers` CLIP-like model
    (`get_image_features` returning its vision output, `vision_model`, `config.vision_config.patch_size`)."""
    vision = getattr(model, "vision_model", None)
    cfg = getattr(getattr(model, "config", None), "vision_config", None)
    patch_size = getattr(cfg, "patch_size", None)
    if vision is None or patch_size is None:
        raise TokensUnsupported(f"{type(model).__name__} has no ViT vision_model with a patch size: no patch tokens")
    hf_model: Any = model  # a transformers CLIP-like model, duck-typed
    out = hf_model.get_image_features(pixel_values=images)
    if torch.is_tensor(out):  # an older transformers: the projected features only
        raise TokensUnsupported(
            "this transformers version returns image features without the vision model's hidden states"
        )
    hidden = out.last_hidden_state
    h, w = grid = _grid(images, _pair(patch_size))
    prefix = hidden.shape[1] - h * w
    if prefix < 0:
        raise TokensUnsupported(f"{hidden.shape[1]} hidden states for a {h} x {w} patch grid")
    tokens = hidden[:, prefix:]
    if prefix:  # CLIP: the last hidden state is before the final norm, which CLIP applies to the CLS token only
        tokens = vision.post_layernorm(tokens)
    return out.pooler_output, tokens, grid


def visual_token_shape(visual: nn.Module) -> tuple[int, int, int]:
    """(h, w, D) of an open_clip image tower's patch tokens at its own image size, without a forward pass."""
    trunk = getattr(visual, "trunk", None)
    if trunk is not None and hasattr(trunk, "patch_embed") and hasattr(trunk, "num_features"):
        h, w = _pair(trunk.patch_embed.grid_size)
        return h, w, int(trunk.num_features)
    if hasattr(visual, "grid_size") and hasattr(visual, "transformer") and hasattr(visual, "conv1"):
        tower: Any = visual  # open_clip's VisionTransformer: grid_size and transformer checked above
        h, w = _pair(tower.grid_size)
        return h, w, int(tower.transformer.width)
    raise TokensUnsupported(f"the image tower {type(visual).__name__} is not a ViT: it has no patch tokens")
