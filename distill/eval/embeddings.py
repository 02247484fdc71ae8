"""Image and text embeddings of evaluation data, computed once per (model, dataset split) and reused.

Why a cache: the same test split serves zero-shot, retrieval and the probe's test set, and several tasks can share
a dataset; encoding is the expensive part of an evaluation. The cache lives in memory and, when given a folder,
on disk as safetensors keyed by a hash of the model's spec and preprocessing and the split's identity.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from distill.eval.datasets import SplitData
from teachers import Teacher, parse_spec

log = logging.getLogger(__name__)


class ImageDataset(Dataset):
    """A split's images through a model's own eval transform."""

    def __init__(self, data: SplitData, transform: Callable):
        self.data, self.transform = data, transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(self.data.image(i))


def encode_images(
    model: Teacher, data: SplitData, batch_size: int = 64, num_workers: int = 0, desc: str = "images"
) -> torch.Tensor:
    """(N, D) L2-normalised float32 image embeddings on the CPU, in split order."""
    loader = DataLoader(
        ImageDataset(data, model.image_transform), batch_size=batch_size, shuffle=False, num_workers=num_workers
    )
    feats = []
    for batch in tqdm(loader, desc=desc, unit="batch", leave=False):
        feats.append(model.encode_image(batch).cpu())
    return torch.cat(feats)


def encode_texts(model: Teacher, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """(N, D) L2-normalised float32 text embeddings on the CPU, each text tokenised by the model's own tokenizer."""
    out = [
        model.encode_text(model.tokenize(list(texts[i : i + batch_size]))).cpu()
        for i in range(0, len(texts), batch_size)
    ]
    return torch.cat(out)


def weights_stamp(spec: str) -> list:
    """(name, size, mtime) of the weight files of a SPEC that names a local folder, else [].

    Why: a student re-exported into the same folder keeps its SPEC; without this the on-disk cache would hand
    back the old student's embeddings.
    """
    parsed = parse_spec(spec)
    folder = Path(parsed.target) if parsed.kind in ("local-dir", "hf-clip") else None
    if folder is None or not folder.is_dir():
        return []
    return [
        (f.name, f.stat().st_size, f.stat().st_mtime_ns)
        for f in sorted(folder.iterdir())
        if f.suffix in (".safetensors", ".bin", ".pt", ".pth")
    ]


def _read_cached(file: Path, rows: int) -> torch.Tensor | None:
    """Embeddings saved by an earlier eval, or None (recompute) when the file is damaged or of another size."""
    try:
        feats = load_file(str(file))["image"]
    except (SafetensorError, KeyError) as e:
        log.warning("%s is damaged (%s): computing these embeddings again", file, e)
        return None
    if feats.shape[0] != rows:
        log.warning("%s holds %d rows, not %d: computing these embeddings again", file, feats.shape[0], rows)
        return None
    return feats


class EmbeddingCache:
    """Image embeddings keyed by (model name, split key); optionally persisted under `folder`."""

    def __init__(self, folder: str | Path | None = None):
        self.folder = Path(folder) if folder else None
        self._mem: dict[tuple[str, str], torch.Tensor] = {}

    def _file(self, folder: Path, model: Teacher, data: SplitData) -> Path:
        ident = json.dumps(
            {"model": model.describe(), "weights": weights_stamp(model.spec), "split": data.key, "n": len(data)},
            sort_keys=True,
            default=str,
        )
        return folder / f"{hashlib.sha256(ident.encode()).hexdigest()[:24]}.safetensors"

    def images(
        self, name: str, model: Teacher, data: SplitData, batch_size: int = 64, num_workers: int = 0
    ) -> torch.Tensor:
        key = (name, data.key)
        if key in self._mem:
            return self._mem[key]
        file = self._file(self.folder, model, data) if self.folder else None
        feats = _read_cached(file, len(data)) if file is not None and file.is_file() else None
        if feats is not None:
            log.info("%s: reusing image embeddings of %s from %s", name, data.source, file)
        else:
            feats = encode_images(model, data, batch_size, num_workers, desc=f"{name} | {data.label}")
            if file is not None:
                file.parent.mkdir(parents=True, exist_ok=True)
                tmp = file.with_name(file.name + ".tmp")  # a kill mid-write never leaves a damaged cache file
                save_file({"image": feats.contiguous()}, str(tmp), metadata={"split": data.key, "model": name})
                os.replace(tmp, file)
        self._mem[key] = feats
        return feats

    def drop_model(self, name: str) -> None:
        """Forget a model's in-memory embeddings (after its last task)."""
        for key in [k for k in self._mem if k[0] == name]:
            del self._mem[key]
