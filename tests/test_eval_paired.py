"""Paired bootstrap differences, verdicts, the mean over tasks and chance levels against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from distill.eval import metrics as M
from distill.eval.bootstrap import Difference, Estimate, bootstrap, mean_difference, paired_difference
from distill.eval.chance import classification_chance, retrieval_chance, uniform_guess_macro_f1
from distill.eval.classification import classification_metrics
from distill.eval.compare import headline_metric, overall_summary, verdict, verdict_word
from distill.eval.report import build_report
from distill.eval.retrieval import retrieval_hits, retrieval_metrics

NAN = float("nan")


def est(point: float, reps) -> Estimate:
    return Estimate(point, NAN, NAN, 10, None if reps is None else np.asarray(reps, dtype=float))


def test_paired_difference_value_and_percentile_interval():
    a = est(0.8, [0.8, 0.7, 0.9, 0.6, 1.0])
    b = est(0.6, [0.5, 0.6, 0.6, 0.5, 0.6])
    # per-resample differences 0.3, 0.1, 0.3, 0.1, 0.4 -> sorted 0.1, 0.1, 0.3, 0.3, 0.4
    d = paired_difference(a, b, level=0.5)  # quantiles 0.25, 0.75: positions 1 and 3 of the sorted five
    assert d.value == pytest.approx(0.2) and (d.ci_low, d.ci_high) == pytest.approx((0.1, 0.3))
    d95 = paired_difference(a, b)  # 0.025 -> position 0.1 (0.1); 0.975 -> position 3.9: 0.3 + 0.9 * 0.1
    assert (d95.ci_low, d95.ci_high) == pytest.approx((0.1, 0.39))
    assert d95.to_dict() == {"value": pytest.approx(0.2), "ci": [pytest.approx(0.1), pytest.approx(0.39)]}
    assert str(d) == "+0.200 [+0.100, +0.300]"


def test_paired_difference_skips_nan_resamples_and_needs_replicates():
    a = est(0.7, [0.5, NAN, 0.7, 0.9])
    b = est(0.4, [0.4, 0.4, NAN, 0.5])
    d = paired_difference(a, b, level=0.5)  # finite differences: 0.1 and 0.4 -> quantiles 0.175, 0.325
    assert (d.ci_low, d.ci_high) == pytest.approx((0.175, 0.325))
    assert math.isnan(d.replicates[1]) and math.isnan(d.replicates[2])  # kept aligned with the resamples
    none = paired_difference(est(0.7, None), b)  # bootstrap 0: a value, no interval
    assert none.value == pytest.approx(0.3) and math.isnan(none.ci_low) and math.isnan(none.ci_high)
    assert none.to_dict() == {"value": pytest.approx(0.3), "ci": [None, None]} and str(none) == "+0.300"
    all_nan = paired_difference(est(0.5, [NAN, NAN]), est(0.5, [0.1, 0.2]))
    assert all_nan.value == 0.0 and math.isnan(all_nan.ci_low)
    with pytest.raises(ValueError, match="cannot pair 4 with 2 bootstrap replicates"):
        paired_difference(a, est(0.5, [0.1, 0.2]))


def test_estimate_replicates_stay_out_of_json_and_equality():
    e = bootstrap({"m": lambda i: float(np.mean(i))}, 5, resamples=7, seed=0)["m"]
    assert e.replicates.shape == (7,) and set(e.to_dict()) == {"point", "ci_low", "ci_high", "n"}
    assert e == Estimate(e.point, e.ci_low, e.ci_high, e.n)


def test_mean_difference_averages_replicates_over_tasks():
    d1 = Difference(0.2, NAN, NAN, np.array([0.1, 0.2, 0.3, NAN]))
    d2 = Difference(0.1, NAN, NAN, np.array([0.3, 0.0, 0.1, 0.2]))
    m = mean_difference([d1, d2], level=0.5)
    # replicates of the mean: 0.2, 0.1, 0.2, NaN -> finite 0.1, 0.2, 0.2: quantiles 0.15 and 0.2
    assert m.value == pytest.approx(0.15) and (m.ci_low, m.ci_high) == pytest.approx((0.15, 0.2))
    no_reps = mean_difference([d1, Difference(0.1, NAN, NAN)])
    assert no_reps.value == pytest.approx(0.15) and math.isnan(no_reps.ci_low)
    assert math.isnan(mean_difference([]).value)


@pytest.mark.parametrize(
    "lo,hi,word",
    [
        (0.0, 0.2, "within"),
        (1e-12, 0.2, "better"),
        (-0.2, 0.0, "within"),
        (-0.2, -1e-12, "worse"),
        (-0.1, 0.1, "within"),
        (NAN, 0.1, None),
    ],
)
def test_verdict_word_at_the_boundaries(lo, hi, word):
    assert verdict_word(Difference(0.05, lo, hi)) == word


def test_verdict_word_without_a_difference_or_value():
    assert verdict_word(None) is None and verdict_word(Difference(NAN, 0.1, 0.2)) is None


def test_verdict_text_names_best_teacher_and_baseline():
    diffs = {
        "student_minus_best_teacher": ("X", Difference(0.031, 0.012, 0.050)),
        "student_minus_baseline": {"Y": Difference(0.004, -0.010, 0.018), "Z": Difference(-0.2, -0.3, -0.1)},
    }
    v = verdict("macro_auroc", "ours", diffs)
    assert v["vs_teachers"] == "better" and v["vs_baselines"] == {"Y": "within", "Z": "worse"}
    assert v["text"] == (
        "ours is better than every teacher beyond the 95% interval (+0.031 [+0.012, +0.050] over "
        "best teacher X); within the interval of baseline Y (+0.004 [-0.010, +0.018]); worse than "
        "baseline Z beyond the interval (-0.200 [-0.300, -0.100])"
    )
    only_base = verdict(
        "m", "ours", {"student_minus_best_teacher": None, "student_minus_baseline": {"Y": Difference(0.1, 0.05, 0.2)}}
    )
    assert only_base["vs_teachers"] is None and only_base["text"].startswith("ours is better than baseline Y")


def test_headline_metric_per_kind():
    assert headline_metric(["accuracy", "balanced_accuracy", "macro_f1", "macro_auroc"]) == "macro_auroc"
    assert headline_metric(["mean_auroc", "auroc/a", "auroc/b"]) == "mean_auroc"
    assert headline_metric(["image_to_text_R@1", "text_to_image_R@10", "mean_recall"]) == "mean_recall"
    probe = ["1-shot/accuracy", "1-shot/macro_auroc", "16-shot/macro_auroc", "2-shot/macro_auroc"]
    assert headline_metric(probe) == "16-shot/macro_auroc"
    assert headline_metric(probe + ["full/macro_auroc"]) == "full/macro_auroc"
    assert headline_metric(["4-shot/mean_auroc", "4-shot/auroc/a", "full/mean_auroc"]) == "full/mean_auroc"


def _two_tasks() -> dict:
    r = lambda *v: np.array(v, dtype=float)  # noqa: E731
    a = {
        "s": {"macro_auroc": est(0.8, r(0.8, 0.7, 0.9, 0.8)), "accuracy": est(0.5, None)},
        "t1": {"macro_auroc": est(0.7, r(0.6, 0.7, 0.7, 0.8)), "accuracy": est(0.9, None)},
        "t2": {"macro_auroc": est(0.75, r(0.7, 0.7, 0.8, 0.7)), "accuracy": est(0.4, None)},
        "b": {"macro_auroc": est(0.6, r(0.6, 0.5, 0.6, 0.7)), "accuracy": est(0.4, None)},
    }
    b = {
        "s": {"mean_recall": est(0.5, r(0.5, 0.4, 0.6, 0.5))},
        "t1": {"mean_recall": est(0.6, r(0.6, 0.5, 0.6, 0.7))},
        "t2": {"mean_recall": est(0.4, r(0.4, 0.4, 0.4, 0.4))},
        "b": {"mean_recall": est(0.5, r(0.5, 0.5, 0.5, 0.5))},
    }
    return {"A": a, "B": b}


def test_overall_summary_mean_over_tasks_by_hand():
    o = overall_summary(_two_tasks(), "s", ["t1", "t2"], ["b"], level=0.5)
    assert o["headlines"] == {"A": "macro_auroc", "B": "mean_recall"}
    t = o["student_minus_best_teacher"]
    # A: best teacher t2, differences 0.1, 0.0, 0.1, 0.1 (value 0.05); B: t1, -0.1, -0.1, 0.0, -0.2 (value -0.1)
    # mean: value -0.025, replicates 0.0, -0.05, 0.05, -0.05 -> quantiles 0.25, 0.75: -0.05, 0.0125
    assert t["teachers"] == {"A": "t2", "B": "t1"} and t["tasks"] == ["A", "B"]
    assert t["value"] == pytest.approx(-0.025) and t["ci"] == pytest.approx([-0.05, 0.0125])
    assert t["verdict"] == "within"
    base = o["student_minus_baseline"]["b"]
    # A: 0.2, 0.2, 0.3, 0.1 (0.2); B: 0.0, -0.1, 0.1, 0.0 (0.0) -> mean 0.1, replicates 0.1, 0.05, 0.2, 0.05
    assert base["value"] == pytest.approx(0.1) and base["ci"] == pytest.approx([0.05, 0.125])
    assert base["verdict"] == "better"
    assert (
        o["text"].startswith(
            "Averaged over 2 tasks' headline metrics, s is within the 50% interval of the best teacher"
        )
        and "better than baseline b beyond the interval" in o["text"]
    )
    assert overall_summary(_two_tasks(), None, ["t1"], ["b"]) is None


def test_report_roles_gain_over_teachers_only_and_differences():
    tasks = _two_tasks()
    models = {m: {"spec": m} for m in ("s", "t1", "t2", "b")}
    rep = build_report(
        models,
        "s",
        {"A": {"kind": "zeroshot"}, "B": {"kind": "retrieval"}},
        tasks,
        {"bootstrap": 4, "seed": 0, "confidence": 0.5},
        baselines=("b",),
        chance={"A": {"macro_auroc": 0.5, "accuracy": 0.25}, "B": {"mean_recall": 0.1}},
    )
    assert rep["baselines"] == ["b"] and rep["teachers"] == ["t1", "t2"]
    assert {m: v["role"] for m, v in rep["models"].items()} == {
        "s": "student",
        "t1": "teacher",
        "t2": "teacher",
        "b": "baseline",
    }
    a = rep["tasks"]["A"]
    assert a["headline"] == "macro_auroc" and a["chance"] == {"macro_auroc": 0.5, "accuracy": 0.25}
    assert a["gain"]["accuracy"] == pytest.approx(0.5 - 0.9)
    d = a["differences"]["macro_auroc"]
    assert d["student_minus_best_teacher"] == {
        "teacher": "t2",
        "value": pytest.approx(0.05),
        "ci": pytest.approx([0.075, 0.1]),
    }
    assert d["student_minus_baseline"]["b"]["value"] == pytest.approx(0.2)
    # every teacher too (a teacher's own domain task): t1 differences 0.2, 0.0, 0.2, 0.0 -> [0.0, 0.2]
    assert d["student_minus_teacher"]["t1"] == {"value": pytest.approx(0.1), "ci": pytest.approx([0.0, 0.2])}
    assert d["student_minus_teacher"]["t2"]["ci"] == d["student_minus_best_teacher"]["ci"]
    assert a["differences"]["accuracy"]["student_minus_best_teacher"]["ci"] == [None, None]  # no replicates
    assert a["verdict"]["metric"] == "macro_auroc" and a["verdict"]["vs_teachers"] == "better"
    assert a["verdict"]["vs_baselines"] == {"b": "better"}
    assert rep["tasks"]["B"]["verdict"]["vs_teachers"] == "worse"  # -0.1, -0.1, 0.0, -0.2: [-0.125, -0.075]
    assert rep["overall"]["student_minus_best_teacher"]["value"] == pytest.approx(-0.025)
    # a baseline better than every teacher does not count as the best teacher (gain over teachers only)
    tasks["A"]["b"]["macro_auroc"] = est(0.95, [0.9, 0.9, 0.9, 0.9])
    rep2 = build_report(models, "s", {"A": {"kind": "zeroshot"}}, {"A": tasks["A"]}, {}, baselines=("b",))
    assert rep2["tasks"]["A"]["gain"]["macro_auroc"] == pytest.approx(0.05)
    assert rep2["tasks"]["A"]["differences"]["macro_auroc"]["student_minus_best_teacher"]["teacher"] == "t2"


def test_same_seed_same_resamples_a_model_against_itself_is_zero():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 40)
    scores = rng.random((40, 3))
    other = rng.random((40, 3))
    a = classification_metrics(y, scores, ["a", "b", "c"], resamples=200, seed=5)
    a2 = classification_metrics(y, scores, ["a", "b", "c"], resamples=200, seed=5)
    b = classification_metrics(y, other, ["a", "b", "c"], resamples=200, seed=5)
    for m in a:
        d = paired_difference(a[m], a2[m])
        assert d.value == 0.0 and (d.ci_low, d.ci_high) == (0.0, 0.0), m
    # the resamples are the same index sets: replicate r of a metric equals the metric on resample r
    idx = np.random.default_rng(5).integers(0, 40, 40)
    assert a["accuracy"].replicates[0] == M.accuracy(y[idx], scores.argmax(1)[idx])
    assert b["accuracy"].replicates[0] == M.accuracy(y[idx], other.argmax(1)[idx])


def test_pairing_cancels_shared_noise_for_a_constant_shift():
    """Two models whose per-query hits differ by a constant 0.05: the paired interval is [0.05, 0.05], far narrower
    than the two unpaired intervals (which overlap) suggest."""
    rng = np.random.default_rng(1)
    i2t, t2i = rng.random((12, 3)) * 0.9, rng.random((8, 3)) * 0.9
    a = retrieval_metrics(i2t, t2i, resamples=300, seed=2)
    b = retrieval_metrics(i2t + 0.05, t2i + 0.05, resamples=300, seed=2)
    for m in a:
        d = paired_difference(b[m], a[m])
        assert d.value == pytest.approx(0.05) and (d.ci_low, d.ci_high) == pytest.approx((0.05, 0.05)), m
        assert b[m].ci_high - b[m].ci_low > 0.05 and a[m].ci_high - a[m].ci_low > 0.05
        assert a[m].ci_high > b[m].ci_low  # unpaired, the intervals overlap: no verdict possible from them
        assert verdict_word(d) == "better"
    assert a["mean_recall"].point == pytest.approx(np.mean([e.point for k, e in a.items() if k != "mean_recall"]))
    assert a["mean_recall"].n == 20 and a["image_to_text_R@1"].n == 12 and a["text_to_image_R@1"].n == 8


def test_bootstrap_strata_resample_each_block():
    est_ = bootstrap(
        {"lo": lambda i: float(np.mean(i < 3)), "hi": lambda i: float(np.mean(i >= 3))},
        5,
        resamples=50,
        seed=0,
        strata=(3, 2),
    )
    assert np.all(est_["lo"].replicates == 0.6) and np.all(est_["hi"].replicates == 0.4)  # 3 + 2 drawn every time
    with pytest.raises(ValueError, match="strata"):
        bootstrap({"m": lambda i: 0.0}, 5, strata=(3, 3))


def test_chance_macro_f1_by_hand_and_by_simulation():
    y = np.array([0, 0, 0, 1])  # p = 3/4, 1/4, 0 with C = 3: F1_c = 2 p_c (1/3) / (p_c + 1/3)
    assert uniform_guess_macro_f1(y, 3) == pytest.approx((6 / 13 + 2 / 7 + 0) / 3)  # = 68 / 273
    assert classification_chance("macro_f1", y, 3) == pytest.approx(68 / 273)
    assert classification_chance("2-shot/macro_f1", y, 3) == pytest.approx(68 / 273)
    assert classification_chance("accuracy", y, 4) == 0.25 and classification_chance("balanced_accuracy", y, 3) == 1 / 3
    for m in ("macro_auroc", "mean_auroc", "auroc/effusion", "full/macro_auroc", "8-shot/auroc/x"):
        assert classification_chance(m, y, 3) == 0.5
    assert classification_chance("something_else", y, 3) is None
    rng = np.random.default_rng(0)
    y = rng.choice(3, 60000, p=[0.6, 0.3, 0.1])
    guess = rng.integers(0, 3, len(y))
    assert M.macro_f1(y, guess, 3) == pytest.approx(uniform_guess_macro_f1(y, 3), abs=0.005)
    assert M.balanced_accuracy(y, guess, 3) == pytest.approx(1 / 3, abs=0.01)


def test_chance_retrieval_by_hand_and_equal_to_a_constant_model():
    c = retrieval_chance(np.array([0, 0, 1, 2]))  # 4 images, 3 captions, caption 0 carried by two images
    assert c["image_to_text_R@1"] == pytest.approx(1 / 3) and c["image_to_text_R@5"] == 1.0
    # caption 0: 1 - C(2, 1) / C(4, 1) = 1/2; captions 1, 2: 1 - 3/4 = 1/4 -> mean 1/3
    assert c["text_to_image_R@1"] == pytest.approx(1 / 3) and c["text_to_image_R@10"] == 1.0
    assert c["mean_recall"] == pytest.approx((1 / 3 + 1 + 1 + 1 / 3 + 1 + 1) / 6)
    one_each = retrieval_chance(np.arange(20))  # one image per caption: K / N both ways
    assert all(
        one_each[f"{d}_R@{k}"] == pytest.approx(k / 20) for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)
    )
    owner = np.repeat(np.arange(20), 2)
    const = retrieval_metrics(*retrieval_hits(torch.ones(40, 8), torch.ones(20, 8), owner), resamples=0)
    chance = retrieval_chance(owner)
    assert {k: e.point for k, e in const.items()} == pytest.approx(chance)
