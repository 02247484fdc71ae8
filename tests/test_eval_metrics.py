"""Metrics, retrieval ranks and bootstrap intervals against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from distill.eval import metrics as M
from distill.eval.bootstrap import bootstrap
from distill.eval.chance import retrieval_chance
from distill.eval.classification import classification_metrics
from distill.eval.retrieval import dedupe_captions, image_groups, positives, retrieval_hits, retrieval_metrics


def test_rankdata_averages_ties():
    assert M.rankdata(np.array([0.3, 0.1, 0.3, 0.2])).tolist() == [3.5, 1.0, 3.5, 2.0]


def test_auroc_hand_cases():
    # positives 0.8, 0.4 vs negatives 0.6, 0.2: 3 of 4 pairs ordered correctly
    assert M.auroc(np.array([1, 0, 1, 0]), np.array([0.8, 0.6, 0.4, 0.2])) == pytest.approx(0.75)
    # a tie between a positive and a negative counts one half: (0.5 + 1) / 2
    assert M.auroc(np.array([1, 0, 0]), np.array([0.5, 0.5, 0.1])) == pytest.approx(0.75)
    y = np.array([0, 1, 1, 0, 1])
    assert M.auroc(y, y * 2.0 + 1) == 1.0
    assert M.auroc(y, -y.astype(float)) == 0.0
    assert M.auroc(y, np.full(5, 0.3)) == 0.5
    assert math.isnan(M.auroc(np.ones(4), np.arange(4.0)))


def test_label_metrics_hand_case():
    y = np.array([0, 0, 0, 1, 1, 2])
    pred = np.array([0, 0, 1, 1, 2, 2])
    assert M.accuracy(y, pred) == pytest.approx(4 / 6)
    assert M.balanced_accuracy(y, pred, 3) == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    # F1 per class: 2*2/(3+2), 2*1/(2+2), 2*1/(1+2)
    assert M.macro_f1(y, pred, 3) == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    # a class absent from y and pred is not averaged in (scikit-learn's label set)
    assert M.macro_f1(y, pred, 5) == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)


def test_perfect_and_constant_models():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 60)
    perfect = np.eye(3)[y] * 0.9 + 0.05
    res = classification_metrics(y, perfect, ["a", "b", "c"], resamples=50)
    assert {k: v.point for k, v in res.items()} == {
        "accuracy": 1.0,
        "balanced_accuracy": 1.0,
        "macro_f1": 1.0,
        "macro_auroc": 1.0,
    }
    assert res["accuracy"].ci_low == res["accuracy"].ci_high == 1.0

    y = np.array([0] * 7 + [1] * 3)
    const = np.tile([0.6, 0.4], (10, 1))  # always predicts the majority class
    res = classification_metrics(y, const, ["a", "b"], resamples=0)
    assert res["accuracy"].point == pytest.approx(0.7)  # the majority share
    assert res["balanced_accuracy"].point == pytest.approx(0.5)
    assert res["macro_f1"].point == pytest.approx(2 * 7 / (7 + 10) / 2)  # F1(a) = 2*7/(7+10), F1(b) = 0
    assert res["macro_auroc"].point == pytest.approx(0.5)


def test_multilabel_auroc_skips_undefined_classes():
    t = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 0]])
    s = np.array([[0.9, 0.1, 0.5], [0.2, 0.8, 0.5], [0.7, 0.3, 0.5], [0.1, 0.4, 0.5]])
    per = M.per_class_auroc(t > 0, s)
    assert per[0] == 1.0 and per[1] == pytest.approx(0.75) and math.isnan(per[2])  # class 2 never positive
    res = classification_metrics(t, s, ["x", "y", "z"], multilabel=True, resamples=0)
    assert res["mean_auroc"].point == pytest.approx(0.875)
    assert res["auroc/x"].point == 1.0 and res["auroc/z"].ci_low != res["auroc/z"].ci_low  # NaN


def test_hit_probabilities_without_and_with_ties():
    sim = np.array(
        [
            [0.9, 0.5, 0.1],  # positive 2nd
            [0.2, 0.2, 0.2],  # constant row, 1 positive of 3: chance
            [0.7, 0.7, 0.1],  # positive tied with one negative for first place
            [0.3, 0.3, 0.3],
        ]
    )  # constant row, 2 positives of 3
    pos = np.array([[False, True, False], [True, False, False], [False, True, False], [True, False, True]])
    hits = M.hit_probabilities(sim, pos, (1, 2, 3))
    assert hits[0].tolist() == [0.0, 1.0, 1.0]
    assert hits[1] == pytest.approx([1 / 3, 2 / 3, 1.0])  # k / G for one positive among G items
    assert hits[2] == pytest.approx([0.5, 1.0, 1.0])
    assert hits[3] == pytest.approx([2 / 3, 1.0, 1.0])  # 1 - P(the negative comes first)


def test_retrieval_with_shared_captions():
    captions = ["left lung nodule", "left  lung nodule ", "brain mass", "liver cyst"]  # images 0, 1 share one
    unique, owner = dedupe_captions(captions)
    assert unique == ["left lung nodule", "brain mass", "liver cyst"] and owner.tolist() == [0, 0, 1, 2]
    text = torch.eye(3)
    images = torch.tensor(
        [
            [0.9, 0.1, 0.0],  # caption A, ranks A first
            [0.2, 0.8, 0.0],  # caption A, ranks B first -> miss at 1
            [0.1, 0.9, 0.05],  # caption B -> hit at 1
            [0.7, 0.0, 0.6],
        ]
    )  # caption C, ranks A first -> miss at 1
    i2t, t2i = retrieval_hits(images, text, owner)
    assert i2t.tolist() == [[1, 1, 1], [0, 1, 1], [1, 1, 1], [0, 1, 1]]
    assert t2i[:, 0].tolist() == [1, 1, 1]  # text A is right when ANY of images 0, 1 comes first
    res = retrieval_metrics(i2t, t2i, resamples=0)
    assert res["image_to_text_R@1"].point == 0.5 and res["image_to_text_R@1"].n == 4
    assert res["image_to_text_R@5"].point == 1.0
    assert res["text_to_image_R@1"].point == 1.0 and res["text_to_image_R@1"].n == 3


def test_retrieval_with_several_captions_per_image_counts_any_caption():
    """COCO-style rows: each image listed once per caption. Rows naming the same file are one image query; it hits
    when ANY of its captions comes first, and each caption query hits when its image comes first."""
    paths = ["img/a.png", "img/./a.png", "img/b.png", "img/b.png", "img/c.png", "img/c.png"]
    captions = ["a cat", "a small cat", "a dog", "a brown dog", "a bird", "a blue bird"]
    group, first = image_groups(paths)
    assert group.tolist() == [0, 0, 1, 1, 2, 2] and first.tolist() == [0, 2, 4]
    assert image_groups(np.zeros((3, 4, 4), np.uint8))[0].tolist() == [0, 1, 2]  # arrays: one image per row
    unique, owner = dedupe_captions(captions)
    pos = positives(owner, group)
    assert pos.astype(int).tolist() == [[1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1]]
    text = torch.eye(6)
    images = torch.tensor(
        [
            [0.1, 0.9, 0.0, 0.0, 0.0, 0.0],  # image a ranks its SECOND caption first: a hit (any caption counts)
            [0.0, 0.0, 0.5, 0.0, 0.6, 0.0],  # image b ranks a bird caption first: a miss at 1, a hit at 5
            [0.0, 0.0, 0.0, 0.0, 0.0, 1.0],  # image c: a hit
        ]
    )
    i2t, t2i = retrieval_hits(images, text, pos)
    assert i2t[:, 0].tolist() == [1, 0, 1] and i2t[:, 1].tolist() == [1, 1, 1]
    # caption queries among the 3 images: "a brown dog" (column 3) has all-zero similarities, a 3-way tie (1/3 at 1);
    # "a bird" (column 4) finds image b first, a miss
    assert t2i[:, 0].tolist() == pytest.approx([1.0, 1.0, 1.0, 1 / 3, 0.0, 1.0])
    res = retrieval_metrics(i2t, t2i, resamples=0)
    assert res["image_to_text_R@1"].n == 3 and res["text_to_image_R@1"].n == 6
    # chance: an image has 2 of 6 captions, a caption 1 of 3 images
    table = retrieval_chance(pos)
    assert table["image_to_text_R@1"] == pytest.approx(2 / 6) and table["text_to_image_R@1"] == pytest.approx(1 / 3)
    assert table["image_to_text_R@5"] == pytest.approx(1.0)  # 5 of 6 captions always include one of 2


def test_retrieval_of_perfect_and_constant_models():
    rng = np.random.default_rng(0)
    owner = np.repeat(np.arange(20), 2)  # 40 images, 20 captions, two images each
    text = torch.nn.functional.normalize(torch.as_tensor(rng.normal(size=(20, 8)), dtype=torch.float32), dim=-1)
    perfect = retrieval_metrics(*retrieval_hits(text[owner], text, owner), resamples=0)
    assert all(e.point == pytest.approx(1.0) for e in perfect.values())
    const = retrieval_metrics(*retrieval_hits(torch.ones(40, 8), torch.ones(20, 8), owner), resamples=0)
    for k in (1, 5, 10):
        assert const[f"image_to_text_R@{k}"].point == pytest.approx(k / 20)  # one right caption of 20
        # two right images of 40: 1 - C(38, k) / C(40, k)
        assert const[f"text_to_image_R@{k}"].point == pytest.approx(1 - (40 - k) * (39 - k) / (40 * 39))


def test_bootstrap_contains_point_narrows_and_is_seeded():
    rng = np.random.default_rng(1)
    widths = []
    for n in (40, 2000):
        y = rng.integers(0, 2, n)
        pred = np.where(rng.random(n) < 0.8, y, 1 - y)
        est = bootstrap({"acc": lambda i, y=y, pred=pred: M.accuracy(y[i], pred[i])}, n, resamples=300, seed=3)["acc"]
        assert est.ci_low <= est.point <= est.ci_high and est.n == n
        widths.append(est.ci_high - est.ci_low)
        again = bootstrap({"acc": lambda i, y=y, pred=pred: M.accuracy(y[i], pred[i])}, n, resamples=300, seed=3)["acc"]
        assert again == est
    assert widths[1] < widths[0] / 3  # ~1/sqrt(n): 40 -> 2000 samples is ~7x narrower


def test_bootstrap_skips_undefined_resamples():
    y = np.array([1] + [0] * 9)
    s = np.linspace(1, 0, 10)
    est = bootstrap({"auc": lambda i: M.auroc(y[i], s[i])}, 10, resamples=200, seed=0)["auc"]
    assert est.point == 1.0 and est.ci_low == 1.0 and est.ci_high == 1.0  # resamples without the positive skipped
