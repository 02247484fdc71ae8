"""Image-text retrieval both ways (R@1, R@5, R@10) where several images can share one caption and one image can
have several captions.

Captions are deduplicated (whitespace-normalised), so the gallery for image->text holds each text once; rows that
name the same image file are one image (a dataset may list an image once per caption, as COCO does). An image query
is correct when ANY of its captions is in the top k; a caption query is correct when ANY of the images that carry it
is in the top k. Ties are broken at random in expectation, so a constant model scores chance.
Intervals resample the queries of each direction (both directions in one bootstrap, as two strata);
`mean_recall`, the mean of the six recalls, is the task's headline metric.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch

from distill.eval import metrics as M
from distill.eval.bootstrap import Estimate, Metric, bootstrap
from distill.eval.context import EvalContext
from distill.eval.datasets import image_paths
from distill.eval.embeddings import encode_texts
from distill.eval.kinds import register_kind
from teachers import Teacher

KS = (1, 5, 10)


def dedupe_captions(captions: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """(unique captions in first-seen order, caption index of each image)."""
    index: dict[str, int] = {}
    unique: list[str] = []
    owner = np.empty(len(captions), dtype=np.int64)
    for i, cap in enumerate(captions):
        norm = " ".join(cap.split())
        if norm not in index:
            index[norm] = len(unique)
            unique.append(cap)
        owner[i] = index[norm]
    return unique, owner


def image_groups(images) -> tuple[np.ndarray, np.ndarray]:
    """(image id of each row, first row of each image): rows naming the same file (after normalising the path) are
    one image; images given as arrays or read from a corpus are one per row."""
    n, paths = len(images), image_paths(images)
    if paths is None:
        return np.arange(n, dtype=np.int64), np.arange(n, dtype=np.int64)
    index: dict[str, int] = {}
    first: list[int] = []
    group = np.empty(n, dtype=np.int64)
    for i, item in enumerate(paths):
        key = os.path.normpath(item)
        if key not in index:
            index[key] = len(first)
            first.append(i)
        group[i] = index[key]
    return group, np.asarray(first, dtype=np.int64)


def positives(owner: np.ndarray, group: np.ndarray | None = None) -> np.ndarray:
    """(N_images, N_captions) bool: image g carries caption j when some row of g has caption j (`owner`: each row's
    caption index, `group`: each row's image index; None: one image per row)."""
    owner = np.asarray(owner, dtype=np.int64)
    group = np.arange(len(owner)) if group is None else np.asarray(group, dtype=np.int64)
    pos = np.zeros((int(group.max()) + 1 if len(group) else 0, int(owner.max()) + 1 if len(owner) else 0), bool)
    pos[group, owner] = True
    return pos


def retrieval_hits(
    image_emb: torch.Tensor, text_emb: torch.Tensor, owner: np.ndarray, ks: Sequence[int] = KS
) -> tuple[np.ndarray, np.ndarray]:
    """Per-query probability of a hit in the top k, (Q, len(ks)): (images among texts, texts among images).
    `owner`: each image's caption index (N_img,), or an (N_img, N_txt) bool mask of the captions each image has."""
    sim = (image_emb.float() @ text_emb.float().T).numpy()  # (N_img, N_txt)
    owner = np.asarray(owner)
    pos = owner if owner.ndim == 2 else owner[:, None] == np.arange(text_emb.shape[0])[None, :]
    return M.hit_probabilities(sim, pos, ks), M.hit_probabilities(sim.T, pos.T, ks)


def retrieval_metrics(
    i2t_hits: np.ndarray, t2i_hits: np.ndarray, resamples: int = 1000, seed: int = 0, ks: Sequence[int] = KS
) -> dict[str, Estimate]:
    """R@k both ways and their mean (`mean_recall`, the headline) with bootstrap CIs over the queries.

    `*_hits` come from `retrieval_hits` with the same `ks`. One bootstrap resamples image queries and text queries
    separately (two strata) in each resample, so `mean_recall` has an interval and every model shares the resamples.
    """
    n_img, n_txt = len(i2t_hits), len(t2i_hits)
    hits = {"image_to_text": i2t_hits, "text_to_image": t2i_hits}

    def part(idx: np.ndarray, direction: str) -> np.ndarray:
        return idx[idx < n_img] if direction == "image_to_text" else idx[idx >= n_img] - n_img

    def recall(d: str, c: int) -> Metric:
        return lambda i: M.recall_at_k(hits[d][part(i, d), c])

    fns: dict[str, Metric] = {f"{d}_R@{k}": recall(d, c) for d in hits for c, k in enumerate(ks)}
    fns["mean_recall"] = lambda i: float(
        np.mean([M.recall_at_k(hits[d][part(i, d), c]) for d in hits for c in range(len(ks))])
    )
    out = bootstrap(fns, n_img + n_txt, resamples, seed, strata=(n_img, n_txt))
    sizes = {"image_to_text": n_img, "text_to_image": n_txt}
    return {k: (replace(e, n=sizes[k.split("_R@")[0]]) if "_R@" in k else e) for k, e in out.items()}


@register_kind("retrieval", roles=("test",), needs_classes=False)
def evaluate_retrieval(task, model: Teacher, name: str, splits: dict, ctx: EvalContext) -> dict[str, Estimate]:
    test = splits["test"]
    unique, owner = dedupe_captions(test.captions)
    group, first = image_groups(test.images)
    img = ctx.cache.images(name, model, test, ctx.batch_size, ctx.num_workers)[torch.from_numpy(first)]
    txt = encode_texts(model, unique)
    return retrieval_metrics(*retrieval_hits(img, txt, positives(owner, group)), ctx.bootstrap, ctx.seed)
