"""`data.decode: device`: JPEGs leave the DataLoader workers compressed and are decoded on the training device.

Why: decoding and resizing a ~0.5 MP JPEG is most of a worker's CPU time (`benchmarks/input_pipeline.py`), so on a
GPU node the loader, not the model, can set the pace. Here a worker reads the file's bytes and its header (for the
crop box) only; the main process decodes the batch with torchvision's `decode_jpeg` (nvJPEG, batched, on CUDA), and
crops, flips and resizes each image on the device. The crop boxes are drawn in the workers exactly as for worker
decoding (same generator, same relative box, cut by `apply_view`'s own `teachers.transforms.view_box`), so a run differs
from `data.decode: worker` only by the resampling (torchvision's antialiased tensor resize instead of PIL's, and no
reduced JPEG "draft" decode of large images): pixel values differ slightly, not the crops. Anything that is not an
RGB or greyscale JPEG (PNG, CMYK, an unreadable header) is decoded in the worker as before. On a CPU run the
decode only moves from the workers to the main process. (torchvision 0.29 marks its image decoders deprecated in
favour of TorchCodec; they are what nvJPEG is reachable through in the pinned versions.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as F

from teachers.transforms import adjust_colour, view_box


@dataclass
class EncodedImages:
    """The batch positions whose image is still a compressed JPEG, with the view to cut from it."""

    data: list[Tensor]  # 1-D uint8 JPEG bytes, one per image; stay on the CPU (decode_jpeg reads them there)
    params: list[list[float]]  # relative view (x0, y0, w, h, flip[, brightness, contrast, saturation]) per image
    index: list[int]  # positions in the batch

    def __len__(self) -> int:
        return len(self.data)


def _decode(data: list[Tensor], device: torch.device) -> list[Tensor]:
    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:  # nvJPEG refuses some streams libjpeg reads: those go through the CPU, one at a time
        return [_decode_one(d).to(device) for d in data]


def _decode_one(d: Tensor) -> Tensor:
    return decode_jpeg(d, mode=ImageReadMode.RGB)


def decode_into(images: Tensor, encoded: EncodedImages, interpolation: str, rows: Sequence[int] = ()) -> Tensor:
    """Fill `images` (B, 3, H, W) uint8 on its device at `encoded.index` with the decoded, cropped, resized views.

    A JPEG that neither nvJPEG nor libjpeg can decode is a ValueError naming its corpus rows (`rows`: the batch's).
    """
    if not len(encoded):
        return images
    try:
        decoded = _decode(encoded.data, images.device)
    except RuntimeError as e:
        bad = ", ".join(str(rows[i]) for i in encoded.index) if len(rows) else "?"
        raise ValueError(
            f"a JPEG among corpus rows {bad} cannot be decoded ({e}); fix or remove it, or set "
            f"data.decode=worker to have it reported and skipped like any bad sample"
        ) from e
    size = list(images.shape[-2:])
    mode = F.InterpolationMode(interpolation)
    for img, params, i in zip(decoded, encoded.params, encoded.index):
        left, top, right, bottom = view_box(params, img.shape[-1], img.shape[-2])
        x = img[:, top:bottom, left:right]
        if float(params[4]) > 0.5:
            x = x.flip(-1)
        images[i] = adjust_colour(F.resize(x, size, interpolation=mode, antialias=True), params)
    return images


__all__ = ["EncodedImages", "decode_into"]
