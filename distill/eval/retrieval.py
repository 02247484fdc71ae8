"""Image-text retrieval both ways (R@1, R@5, R@10) where several images can share one caption.

Captions are deduplicated (whitespace-normalised), so the gallery for image->text holds each text once. An image
query is correct when its own caption is in the top k; a caption query is correct when ANY of the images that
carry it is in the top k. Ties are broken at random in expectation, so a constant model scores chance.
Intervals resample the queries of each direction.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from teachers import Teacher

from . import metrics as M
from .bootstrap import Estimate, bootstrap
from .context import EvalContext
from .embeddings import encode_texts

KS = (1, 5, 10)


def dedupe_captions(captions: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """(unique captions in first-seen order, caption index of each image)."""
    index: dict[str, int] = {}
    unique, owner = [], np.empty(len(captions), dtype=np.int64)
    for i, cap in enumerate(captions):
        norm = " ".join(cap.split())
        if norm not in index:
            index[norm] = len(unique)
            unique.append(cap)
        owner[i] = index[norm]
    return unique, owner


def retrieval_hits(image_emb: torch.Tensor, text_emb: torch.Tensor, owner: np.ndarray,
                   ks: Sequence[int] = KS) -> tuple[np.ndarray, np.ndarray]:
    """Per-query probability of a hit in the top k, (Q, len(ks)): (images among texts, texts among images)."""
    sim = (image_emb.float() @ text_emb.float().T).numpy()          # (N_img, N_txt)
    pos = owner[:, None] == np.arange(text_emb.shape[0])[None, :]   # image i carries text j
    return M.hit_probabilities(sim, pos, ks), M.hit_probabilities(sim.T, pos.T, ks)


def retrieval_metrics(i2t_hits: np.ndarray, t2i_hits: np.ndarray, resamples: int = 1000,
                      seed: int = 0, ks: Sequence[int] = KS) -> dict[str, Estimate]:
    """R@k both ways with bootstrap CIs over the queries; `*_hits` from `retrieval_hits` with the same `ks`."""
    out = {}
    for direction, hits in (("image_to_text", i2t_hits), ("text_to_image", t2i_hits)):
        fns = {f"{direction}_R@{k}": (lambda i, c=c, h=hits: M.recall_at_k(h[i, c])) for c, k in enumerate(ks)}
        out.update(bootstrap(fns, len(hits), resamples, seed))
    return out


def evaluate_retrieval(task, model: Teacher, name: str, splits: dict, ctx: EvalContext) -> dict[str, Estimate]:
    test = splits["test"]
    unique, owner = dedupe_captions(test.captions)
    img = ctx.cache.images(name, model, test, ctx.batch_size, ctx.num_workers)
    txt = encode_texts(model, unique)
    return retrieval_metrics(*retrieval_hits(img, txt, owner), ctx.bootstrap, ctx.seed)
