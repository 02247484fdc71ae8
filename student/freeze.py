"""Partial freezing, patch dropout and gradient checkpointing for the student's towers.

Why not open_clip's `lock_*_tower`: they count layer groups from the end ("unlock the last N"), the HF one
needs arch metadata BERT lacks in open_clip 3.3, and neither returns what it froze. Here "first N" is
explicit, both ViT kinds (timm and open_clip's own) and both text kinds (HF BERT and open_clip's) are
covered, and every function returns the parameter names it touched so tests and logs can check them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from open_clip.transformer import PatchDropout
from timm.layers import PatchDropout as TimmPatchDropout
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParamSummary:
    """Parameter counts, total and trainable, for the whole model and per tower."""

    total: int
    trainable: int
    image_total: int
    image_trainable: int
    text_total: int
    text_trainable: int

    def __str__(self) -> str:
        def pct(a: int, b: int) -> str:
            return f"{a / 1e6:.2f}M/{b / 1e6:.2f}M ({100 * a / max(b, 1):.0f}%)"

        return (
            f"trainable parameters: {pct(self.trainable, self.total)}; image tower "
            f"{pct(self.image_trainable, self.image_total)}; "
            f"text tower {pct(self.text_trainable, self.text_total)}"
        )


def parameter_summary(model: nn.Module) -> ParamSummary:
    """Counts by parameter name: `visual.*` is the image tower, logit scale/bias neither, the rest text."""
    tot = {"all": 0, "image": 0, "text": 0}
    train = dict.fromkeys(tot, 0)
    for name, p in model.named_parameters():
        tower = "image" if name.startswith("visual.") else None if name.startswith("logit_") else "text"
        for key in ("all", tower) if tower else ("all",):
            tot[key] += p.numel()
            train[key] += p.numel() if p.requires_grad else 0
    return ParamSummary(tot["all"], train["all"], tot["image"], train["image"], tot["text"], train["text"])


def _freeze(parts: Iterable[tuple[str, nn.Module | nn.Parameter | None]]) -> list[str]:
    names = []
    for prefix, part in parts:
        if part is None:
            continue
        if isinstance(part, nn.Parameter):
            part.requires_grad_(False)
            names.append(prefix)
            continue
        for n, p in part.named_parameters():
            p.requires_grad_(False)
            names.append(f"{prefix}.{n}")
    return names


def _image_stem_and_blocks(visual: Any) -> tuple[list[tuple[str, Any]], list[nn.Module], str]:
    """(stem parts, blocks, blocks prefix) of a timm ViT (`visual.trunk`) or open_clip's VisionTransformer.

    `visual` is duck-typed (either tower class): the attributes used are checked first."""
    trunk = getattr(visual, "trunk", None)
    if trunk is not None:
        if not hasattr(trunk, "blocks") or not hasattr(trunk, "patch_embed"):
            raise ValueError(
                f"freezing image blocks needs a ViT; the timm trunk {type(trunk).__name__} has no patch_embed/blocks"
            )
        stem = [
            ("visual.trunk.patch_embed", trunk.patch_embed),
            ("visual.trunk.cls_token", getattr(trunk, "cls_token", None)),
            ("visual.trunk.reg_token", getattr(trunk, "reg_token", None)),
            ("visual.trunk.pos_embed", getattr(trunk, "pos_embed", None)),
            ("visual.trunk.norm_pre", getattr(trunk, "norm_pre", None)),
        ]
        return stem, list(trunk.blocks), "visual.trunk.blocks"
    if hasattr(visual, "conv1") and hasattr(visual, "transformer"):
        stem = [
            ("visual.conv1", visual.conv1),
            ("visual.class_embedding", visual.class_embedding),
            ("visual.positional_embedding", visual.positional_embedding),
            ("visual.ln_pre", visual.ln_pre),
        ]
        return stem, list(visual.transformer.resblocks), "visual.transformer.resblocks"
    raise ValueError(f"freezing image blocks needs a ViT tower; got {type(visual).__name__}")


def freeze_image_blocks(model: nn.Module, n: int) -> list[str]:
    """Freeze the patch embedding (+ cls token, position embedding, pre-norm) and the first `n` ViT blocks.

    `n=0` freezes nothing. Returns the frozen parameter names (as in `model.named_parameters()`).
    """
    if n == 0:
        return []
    stem, blocks, prefix = _image_stem_and_blocks(model.visual)
    if not 0 < n <= len(blocks):
        raise ValueError(f"cannot freeze {n} image blocks: the image tower has {len(blocks)}")
    return _freeze(stem + [(f"{prefix}.{i}", blocks[i]) for i in range(n)])


def lock_text_layers(model: nn.Module, n: int) -> list[str]:
    """Freeze the text embeddings and the first `n` text layers (HF BERT tower or open_clip's text tower).

    `n=0` freezes nothing. Returns the frozen parameter names.
    """
    if n == 0:
        return []
    text = getattr(model, "text", None)
    hf = getattr(text, "transformer", None)
    if hf is not None and hasattr(hf, "embeddings"):  # HFTextEncoder around a BERT-like model
        encoder = getattr(hf, "encoder", hf)
        layers, prefix = list(encoder.layer), "text.transformer.encoder.layer"
        stem = [("text.transformer.embeddings", hf.embeddings)]
    else:  # open_clip TextTransformer (CustomTextCLIP.text) or CLIP's top-level text parts
        owner: Any = text if text is not None else model  # duck-typed: either text tower class
        root = "text" if text is not None else ""
        pre = f"{root}." if root else ""
        layers, prefix = list(owner.transformer.resblocks), f"{pre}transformer.resblocks"
        stem = [
            (f"{pre}token_embedding", owner.token_embedding),
            (f"{pre}positional_embedding", owner.positional_embedding),
            (f"{pre}cls_emb", getattr(owner, "cls_emb", None)),
        ]
    if not 0 < n <= len(layers):
        raise ValueError(f"cannot lock {n} text layers: the text tower has {len(layers)}")
    return _freeze(stem + [(f"{prefix}.{i}", layers[i]) for i in range(n)])


def set_patch_dropout(model: nn.Module, prob: float) -> None:
    """Drop a fraction `prob` of image patches in training (FLIP); 0 turns it off. Eval is never affected."""
    if not 0.0 <= prob < 1.0:
        raise ValueError(f"patch dropout must be in [0, 1), got {prob}")
    visual = model.visual
    trunk = getattr(visual, "trunk", None)
    if trunk is not None:
        if not hasattr(trunk, "patch_drop"):
            raise ValueError(f"the timm trunk {type(trunk).__name__} has no patch dropout")
        drop = TimmPatchDropout(prob, num_prefix_tokens=trunk.num_prefix_tokens) if prob > 0 else nn.Identity()
        trunk.patch_drop = drop
    elif hasattr(visual, "patch_dropout"):
        visual.patch_dropout = PatchDropout(prob) if prob > 0 else nn.Identity()
    else:
        raise ValueError(f"the image tower {type(visual).__name__} has no patch dropout")


def set_grad_checkpointing(model: nn.Module, enable: bool = True) -> None:
    """Recompute activations in backward to save memory, in both towers."""
    clip: Any = model  # open_clip's CLIP or CustomTextCLIP, duck-typed
    clip.visual.set_grad_checkpointing(enable)
    hf = getattr(getattr(model, "text", None), "transformer", None)
    if hf is not None and hasattr(hf, "gradient_checkpointing_enable"):
        # open_clip's HFTextEncoder ignores enable=False; call transformers directly (5.x renamed the methods)
        kw = {"use_reentrant": False}
        if enable and hasattr(hf, "activation_checkpointing_enable"):
            hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
        elif enable:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
        elif hasattr(hf, "activation_checkpointing_disable"):
            hf.activation_checkpointing_disable()
        else:
            hf.gradient_checkpointing_disable()
    elif hasattr(model, "text"):
        clip.text.set_grad_checkpointing(enable)
    elif hasattr(model, "transformer"):
        clip.transformer.grad_checkpointing = enable


def apply_freezing(
    model: nn.Module,
    image_blocks: int = 0,
    text_layers: int = 0,
    patch_dropout: float | None = None,
    grad_checkpointing: bool = False,
) -> ParamSummary:
    """Apply the training-time settings in one call and log how many parameters remain trainable."""
    freeze_image_blocks(model, image_blocks)
    lock_text_layers(model, text_layers)
    if patch_dropout is not None:
        set_patch_dropout(model, patch_dropout)
    if grad_checkpointing:
        set_grad_checkpointing(model, True)
    summary = parameter_summary(model)
    log.info("%s", summary)
    return summary
