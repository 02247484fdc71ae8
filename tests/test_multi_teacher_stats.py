"""The multi-teacher harness's verdict maths (benchmarks/mt_stats.py, mt_verdict.py): intervals over seeds and test
rows, the mean over domains with a shared test set, the chance flag, picking on dev. Hand-made numbers; no training."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import mt_setup, mt_stats, mt_verdict
from benchmarks.mt_verdict import TaskInfo
from distill.eval.bootstrap import Estimate, paired_difference
from distill.eval.report import EvalReport


def test_seed_and_row_interval_by_hand():
    """2 seeds, 4 row resamples, the seed draws given: every replicate and both percentiles worked out by hand."""
    student = mt_stats.SeedValues([0.8, 0.7], [[0.80, 0.82, 0.78, 0.85], [0.70, 0.66, 0.74, 0.69]])
    baseline = mt_stats.SeedValues([0.6, 0.65], [[0.60, 0.61, 0.58, 0.64], [0.65, 0.62, 0.70, 0.60]])
    d = student - baseline  # seed 0: [.20 .21 .20 .21], seed 1: [.05 .04 .04 .09]
    draws = np.array([[0, 0], [0, 1], [1, 1], [1, 0]])
    got = mt_stats.interval(d, draws)
    # replicate r = mean of d[seed, r] over the seeds drawn for r: .20, (.21+.04)/2, .04, (.09+.21)/2
    assert got.replicates == pytest.approx([0.20, 0.125, 0.04, 0.15])
    assert got.value == pytest.approx((0.2 + 0.05) / 2)
    # sorted .04 .125 .15 .20; numpy's linear quantile: 2.5% at position 0.075, 97.5% at position 2.925
    assert got.ci_low == pytest.approx(0.04 + 0.075 * (0.125 - 0.04))
    assert got.ci_high == pytest.approx(0.15 + 0.925 * (0.20 - 0.15))
    # each seed alone: the plain row interval of that seed
    alone = mt_stats.interval(d.seed(1), None)
    assert alone.value == pytest.approx(0.05) and alone.replicates == pytest.approx([0.05, 0.04, 0.04, 0.09])


def test_one_seed_is_the_paired_row_bootstrap_of_distill_eval():
    rng = np.random.default_rng(3)
    a = Estimate(0.7, 0, 1, 50, rng.uniform(0.6, 0.8, 200))
    b = Estimate(0.6, 0, 1, 50, rng.uniform(0.5, 0.7, 200))
    ours = mt_stats.interval(mt_stats.SeedValues.of([a]) - mt_stats.SeedValues.of([b]), None)
    theirs = paired_difference(a, b)
    assert (ours.value, ours.ci_low, ours.ci_high) == pytest.approx((theirs.value, theirs.ci_low, theirs.ci_high))


def test_seed_draws_are_seeded_and_in_range():
    d = mt_stats.seed_draws(3, 500, seed=4)
    assert d.shape == (500, 3) and d.min() == 0 and d.max() == 2
    assert np.array_equal(d, mt_stats.seed_draws(3, 500, seed=4))
    assert not np.array_equal(d, mt_stats.seed_draws(3, 500, seed=5))
    with pytest.raises(ValueError, match="seed draws"):
        mt_stats.interval(mt_stats.SeedValues([0, 1], np.zeros((2, 4))), np.full((4, 2), 2))


def test_domain_weights_count_a_shared_test_set_once():
    w = mt_stats.domain_weights(
        ["ret", "zs", "derm", "x"],
        {"ret": "rad", "zs": "rad", "derm": "derm"},
        {"ret": "medpix-dev", "zs": "medpix-dev", "derm": "ham"},
    )
    # three domains (x is its own); radiology's two tasks read one test set and share its third
    assert w == pytest.approx({"ret": 1 / 6, "zs": 1 / 6, "derm": 1 / 3, "x": 1 / 3})
    w = mt_stats.domain_weights(["a", "b", "c"], {"a": "d", "b": "d", "c": "d"}, {"a": "s1", "b": "s2", "c": "s2"})
    assert w == pytest.approx({"a": 0.5, "b": 0.25, "c": 0.25})  # two test sets of one domain, then their tasks


@pytest.mark.parametrize(
    "intervals,chance,flag",
    [
        ([(0.4, 0.6), (0.45, 0.55)], 0.5, True),
        ([(0.4, 0.6), (0.51, 0.7)], 0.5, False),
        ([(0.4, 0.6), (0.3, 0.49)], 0.5, False),
        ([(0.4, 0.6)], None, False),
        ([(float("nan"), 0.6)], 0.5, False),
        ([], 0.5, False),
        ([(0.5, 0.5)], 0.5, True),
    ],
)
def test_chance_flag(intervals, chance, flag):
    assert mt_stats.at_chance(intervals, chance) is flag


# -- verdict entries from fake per-seed reports ------------------------------------------------------------
R = 6


def _est(point, reps):
    reps = np.asarray(reps, dtype=float)
    lo, hi = np.quantile(reps, [0.025, 0.975])
    return Estimate(point, float(lo), float(hi), 100, reps)


def _reports(seed_values: list[dict]) -> list[EvalReport]:
    """seed_values[i][task][model] = (point, replicates): one report per seed, headline `auc`, chance 0.5."""
    out = []
    for per_task in seed_values:
        r = EvalReport(
            {
                "teachers": ["T1", "T2"],
                "baselines": ["baseline", "reference"],
                "tasks": {t: {"headline": "auc", "chance": {"auc": 0.5}} for t in per_task},
            }
        )
        r.estimates = {t: {m: {"auc": _est(*v)} for m, v in models.items()} for t, models in per_task.items()}
        out.append(r)
    return out


def _fake_seeds():
    rng = np.random.default_rng(0)
    base = {"a": 0.70, "b": 0.60, "c": 0.80}
    seeds = []
    for s in range(2):
        per_task = {}
        for t, p in base.items():
            per_task[t] = {
                m: (p + off + 0.01 * s, p + off + 0.01 * s + rng.normal(0, 0.02, R))
                for m, off in (
                    ("s", 0.05 * (s + 1)),
                    ("baseline", 0.0),
                    ("reference", 0.02),
                    ("T1", 0.10 if t == "a" else 0.0),
                    ("T2", 0.03),
                )
            }
        # task d: every model's interval around chance (0.5)
        per_task["d"] = {
            m: (0.5, 0.5 + np.linspace(-0.04, 0.04, R)) for m in ("s", "baseline", "reference", "T1", "T2")
        }
        per_task["d"]["other-variant"] = (0.9, 0.9 + np.linspace(-0.01, 0.01, R))  # not compared: no say in the flag
        seeds.append(per_task)
    return seeds


INFO = {
    "a": TaskInfo("rad", "medpix", "T1"),
    "b": TaskInfo("rad", "medpix"),
    "c": TaskInfo("derm", "ham", "T2"),
    "d": TaskInfo("eye", "fundus"),
}


def _by_hand(seeds, task, x, y, draws):
    """Independent loop: value and replicate r of x - y over seeds and rows."""
    pts = [seeds[s][task][x][0] - seeds[s][task][y][0] for s in range(2)]
    reps = [np.mean([seeds[j][task][x][1][r] - seeds[j][task][y][1][r] for j in draws[r]]) for r in range(R)]
    return float(np.mean(pts)), np.array(reps)


def test_verdict_entries_over_two_seeds():
    seeds = _fake_seeds()
    entries = mt_verdict.verdict_entries(_reports(seeds), "s", "baseline", INFO, seeds=[0, 7], draw_seed=3)
    a, b, c, d, mean = entries
    draws = mt_stats.seed_draws(2, R, 3)
    value, reps = _by_hand(seeds, "a", "s", "baseline", draws)
    lo, hi = np.quantile(reps, [0.025, 0.975])
    assert a["student_minus_baseline"]["value"] == pytest.approx(value)
    assert a["student_minus_baseline"]["ci"] == pytest.approx([lo, hi])
    assert a["student"]["value"] == pytest.approx((seeds[0]["a"]["s"][0] + seeds[1]["a"]["s"][0]) / 2)
    # the home teacher of a is T1 (better there, and the best teacher); of c, T2; b and d have none
    assert a["student_minus_own_teacher"]["teacher"] == "T1" and a["best_teacher"]["name"] == "T1"
    assert a["student_minus_own_teacher"]["value"] == pytest.approx(_by_hand(seeds, "a", "s", "T1", draws)[0])
    assert c["best_teacher"]["name"] == "T2" and b["student_minus_own_teacher"] is None
    assert a["student_minus_other_baselines"]["reference"]["value"] == pytest.approx(
        _by_hand(seeds, "a", "s", "reference", draws)[0]
    )
    # every seed's own values, with that seed's row-only interval
    s7 = a["seeds"][1]
    assert s7["seed"] == 7 and s7["student"] == pytest.approx(seeds[1]["a"]["s"][0])
    assert s7["reference"] == pytest.approx(seeds[1]["a"]["reference"][0])
    row = seeds[1]["a"]["s"][1] - seeds[1]["a"]["baseline"][1]
    assert s7["student_minus_baseline"]["ci"] == pytest.approx(list(np.quantile(row, [0.025, 0.975])))
    # d: every model within the chance band -> flagged, left out of the mean
    assert d["at_chance"] and not (a["at_chance"] or b["at_chance"] or c["at_chance"])
    assert mean["task"] == mt_verdict.MEAN_TASK and mean["left_out_at_chance"] == ["d"]
    assert mean["domains"] == {"rad": ["a", "b"], "derm": ["c"]}
    # a and b share one test set: (a + b) / 2 is radiology's value, then the mean of two domains
    va, ra = _by_hand(seeds, "a", "s", "baseline", draws)
    vb, rb = _by_hand(seeds, "b", "s", "baseline", draws)
    vc, rc = _by_hand(seeds, "c", "s", "baseline", draws)
    m_reps = 0.25 * ra + 0.25 * rb + 0.5 * rc
    assert mean["student_minus_baseline"]["value"] == pytest.approx(0.25 * va + 0.25 * vb + 0.5 * vc)
    assert mean["student_minus_baseline"]["ci"] == pytest.approx(list(np.quantile(m_reps, [0.025, 0.975])))
    assert [s["seed"] for s in mean["seeds"]] == [0, 7]
    json.dumps(entries)  # plain JSON


def test_seeds_that_disagree_widen_the_interval():
    """Two seeds whose differences lie on either side of 0: each seed alone is 'better'/'worse', together 'within'."""

    def rep(p):
        return p, p + np.linspace(-0.01, 0.01, R)

    seeds = [
        {"t": {"s": rep(0.8), "baseline": rep(0.7), "T1": rep(0.6)}},
        {"t": {"s": rep(0.6), "baseline": rep(0.7), "T1": rep(0.6)}},
    ]
    reports = _reports(seeds)
    for r in reports:
        r["baselines"] = ["baseline"]
    e = mt_verdict.verdict_entries(reports, "s", "baseline", {}, seeds=[0, 1])[0]
    assert [mt_verdict.word(s["student_minus_baseline"]) for s in e["seeds"]] == ["better", "worse"]
    assert e["vs_baseline"] == "within" and e["student_minus_baseline"]["value"] == pytest.approx(0.0)


def _results(dev_scores: dict[str, float], test_scores: dict[str, float]) -> dict:
    def entries(v):
        d = {"value": v, "ci": [v - 0.01, v + 0.01]}
        task = {
            "task": "t",
            "metric": "auc",
            "own_domain": None,
            "at_chance": False,
            "chance": 0.5,
            "student": {"name": "s", "value": 0.7, "ci": [0.6, 0.8]},
            "student_minus_baseline": d,
            "student_minus_best_teacher": None,
            "student_minus_own_teacher": None,
            "vs_baseline": "better",
            "vs_teachers": None,
            "vs_own_teacher": None,
            "seeds": [{"seed": 0, "student_minus_baseline": d}],
        }
        mean = {**task, "task": mt_verdict.MEAN_TASK, "domains": {"t": ["t"]}, "left_out_at_chance": []}
        return [task, mean]

    v = mt_setup.VARIANTS["routed-feature"]
    return {
        n: {"variant": v, "baseline_saw": "own crops", "test": entries(test_scores[n]), "dev": entries(dev_scores[n])}
        for n in dev_scores
    }


def test_pick_on_dev_or_test_and_the_ablation_ranking():
    results = _results({"A": 0.01, "B": 0.03}, {"A": 0.05, "B": 0.00})
    assert mt_verdict.pick_variant(results, "dev") == "B" and mt_verdict.pick_variant(results, "test") == "A"
    table = mt_verdict.ablation_table(results, "dev")
    rows = table.splitlines()[2:]
    assert rows[0].startswith("| **B** (picked) | own crops | +0.030 [+0.020, +0.040] | +0.000")
    assert rows[1].startswith("| A | own crops | +0.010")
    with pytest.raises(ValueError, match="--pick-on"):
        mt_verdict.pick_variant(results, "train")


def test_outputs_quote_the_picked_variant_on_test_only(tmp_path):
    results = _results({"A": 0.011, "B": 0.033}, {"A": 0.055, "B": 0.022})
    (tmp_path / "eval" / "seed-0").mkdir(parents=True)
    (tmp_path / "eval" / "seed-0" / "report.md").write_text("# Evaluation report\n")
    setup = {
        "flags": {"budget": "smoke", "student_fraction": 0.2, "seed": 0, "reference": True, "dev_fraction": 0.1},
        "seeds": [0],
        "sizes": "teachers width 96 x 3 layers, student width 64 x 2 layers",
        "threads": 1,
        "timings_s": {"total": 1.0},
        "baseline_saw": {"A": "x", "B": "its own random crops"},
        "dev_tasks": ["t-dev"],
        "confidence_by_domain": {},
        "budget": {},
        "teachers": {},
        "routing": "",
    }
    paths = mt_verdict.write_outputs(tmp_path, results, setup, "dev")
    verdict = json.loads(paths["verdict"].read_text())
    assert verdict[-1]["student_minus_baseline"]["value"] == 0.022  # B's test mean, not its dev mean
    md = paths["report"].read_text()
    assert "student `B`" in md and "+0.022" in md and "+0.033" not in md  # no dev number in the headline
    assert "student width 64 x 2 layers" in md and "The baseline saw its own random crops" in md
    assert "dev rows included" in md and "| t | +0.022 [+0.012, +0.032] | +0.022 [+0.012, +0.032] |" in md
    assert "| **B** (picked) |" in (tmp_path / "ablation.md").read_text()
    assert json.loads((tmp_path / "ablation.json").read_text())["ranking"] == ["B", "A"]
