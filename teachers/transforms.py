"""Image transforms shared by teachers, the cache and the student.

A stored view is 5 numbers per sample: the relative crop box (x0, y0, w, h in [0, 1]) and a flip flag, or 8 with
brightness, contrast and saturation factors (`cache.build.views` draws them). Applying
it to the decoded PIL image *before* any model's resize lets each teacher (and later the student) see exactly
the same view at its own resolution.
Why the view transform stays in the bottom room, beside the eval transforms: the cache encodes every teacher on
the stored views through it (`Teacher.view_transform`), and the student must see exactly those pixels, so both
rooms need the one implementation. The student's own augmentation (drawing its random crops,
`distill.data.loader.random_crop_params`) lives with the trainer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

_INTERP = {
    "bicubic": InterpolationMode.BICUBIC,
    "bilinear": InterpolationMode.BILINEAR,
    "nearest": InterpolationMode.NEAREST,
}


@dataclass(frozen=True)
class PreprocessCfg:
    """What a model expects of an image: size, normalisation, interpolation."""

    image_size: tuple[int, int] = (224, 224)
    mean: tuple[float, ...] = OPENAI_MEAN
    std: tuple[float, ...] = OPENAI_STD
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"  # eval: resize shortest side then centre-crop ("squash": resize to size)

    @classmethod
    def from_open_clip(cls, pp: dict) -> PreprocessCfg:
        """open_clip's preprocess_cfg dict (size, mean, std, interpolation, resize_mode) as a PreprocessCfg."""
        size = pp.get("size", 224)
        size = (size, size) if isinstance(size, int) else tuple(size)
        return cls(
            image_size=size,
            mean=tuple(pp["mean"]),
            std=tuple(pp["std"]),
            interpolation=pp.get("interpolation", "bicubic"),
            resize_mode=pp.get("resize_mode", "shortest"),
        )

    def to_attrs(self) -> dict:
        return {
            "image_size": list(self.image_size),
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "resize_mode": self.resize_mode,
        }


def to_rgb(img: Image.Image) -> Image.Image:
    return img if img.mode == "RGB" else img.convert("RGB")


def view_box(params: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) pixels of a view's relative box (x0, y0, w, h), at least one pixel wide and tall."""
    x0, y0, w, h = (float(p) for p in params[:4])
    left, top = int(round(x0 * width)), int(round(y0 * height))
    right = max(left + 1, min(width, int(round((x0 + w) * width))))
    bottom = max(top + 1, min(height, int(round((y0 + h) * height))))
    return left, top, right, bottom


def adjust_colour(img, params: Sequence[float]):
    """A view's photometric factors params[5:8] (brightness, contrast, saturation; 1.0: none), in that fixed order,
    with torchvision's adjust_* (a PIL image, or a uint8 tensor image); a 5-number view is returned unchanged."""
    for adjust, factor in zip((TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation), params[5:8]):
        if float(factor) != 1.0:
            img = adjust(img, float(factor))
    return img


def apply_view(img: Image.Image, params: Sequence[float]) -> Image.Image:
    """Crop the relative box (x0, y0, w, h), flip horizontally when params[4] > 0.5, then, with 8 params, scale
    brightness, contrast and saturation by params[5:8] (`adjust_colour`)."""
    out = img.crop(view_box(params, *img.size))
    out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if float(params[4]) > 0.5 else out
    return adjust_colour(out, params)


def _normalise(t: torch.Tensor, cfg: PreprocessCfg) -> torch.Tensor:
    return TF.normalize(t, list(cfg.mean), list(cfg.std))


def make_eval_transform(cfg: PreprocessCfg) -> Callable[[Image.Image], torch.Tensor]:
    """Resize (shortest side, or squash), centre-crop, normalise: the usual CLIP eval transform."""
    interp = _INTERP[cfg.interpolation]
    size = list(cfg.image_size)

    def transform(img: Image.Image) -> torch.Tensor:
        img = to_rgb(img)
        if cfg.resize_mode == "squash":
            img = TF.resize(img, size, interpolation=interp)
        else:
            img = TF.resize(img, min(size), interpolation=interp)
            img = TF.center_crop(img, size)
        return _normalise(TF.to_tensor(img), cfg)

    return transform


def make_view_transform(cfg: PreprocessCfg) -> Callable[[Image.Image, Sequence[float]], torch.Tensor]:
    """Apply a stored view, then resize the crop to the model's size (as RandomResizedCrop does)."""
    interp = _INTERP[cfg.interpolation]
    size = list(cfg.image_size)

    def transform(img: Image.Image, params: Sequence[float]) -> torch.Tensor:
        img = apply_view(to_rgb(img), params)
        img = TF.resize(img, size, interpolation=interp)
        return _normalise(TF.to_tensor(img), cfg)

    return transform
