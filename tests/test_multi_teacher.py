"""benchmarks/multi_teacher.py: its pieces (flags, teacher plan, routing, verdict words, goal) and a smoke run."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import mt_setup, mt_verdict  # noqa: E402
from benchmarks.bench_common import parse_flags  # noqa: E402


def test_repeated_tuple_flags_accumulate():
    from benchmarks.multi_teacher import Flags

    f = parse_flags(Flags, ["--teacher", "a=x", "--teacher", "b=y", "--task", "t1.yaml,t2.yaml", "--budget", "smoke"])
    assert f.teacher == ("a=x", "b=y")
    assert f.task == ("t1.yaml", "t2.yaml")
    assert f.budget == "smoke"


def test_plan_teachers_domain_and_general():
    plans = mt_setup.plan_teachers(["derm", "rad"], {"derm": "hf-hub:o/derm", "big": "biomedclip"})
    by = {p.name: p for p in plans}
    assert by["derm"].spec == "hf-hub:o/derm" and by["derm"].domains == ("derm",)
    assert by["rad"].spec is None and by["rad"].domains == ("rad",)  # trained by the harness
    assert by["big"].domains == ("derm", "rad")  # a general teacher is routed to every domain
    value = mt_setup.routing_value(plans, ["derm", "rad"])
    assert value.startswith("loss.routing=")
    assert json.loads(value.split("=", 1)[1]) == {"column": "domain",
                                                  "teachers": {"derm": ["derm", "big"], "rad": ["rad", "big"]}}


def test_routing_placeholder_is_replaced():
    from benchmarks.multi_teacher import variant_overrides

    v = mt_setup.VARIANTS["routed-feature"]
    ov = variant_overrides(v, "loss.routing={}")
    assert "loss.routing={}" in ov and mt_setup.ROUTING not in ov


def test_every_builtin_variant_parses_as_a_config(tmp_path):
    from distill.config import Config

    for v in mt_setup.VARIANTS.values():
        ov = [o if o != mt_setup.ROUTING else 'loss.routing={"column": "domain", "teachers": {"a": ["a"]}}'
              for o in v.overrides]
        cfg = Config.from_yaml(ROOT / "configs" / "tiny-hybrid.yaml", overrides=ov)
        assert cfg.mode == "hybrid", v.name


def test_variant_file_and_errors(tmp_path):
    f = tmp_path / "v.yaml"
    f.write_text("mine: ['loss.combine.mode=random_teacher']\nother: {overrides: ['train.seed=3'], note: hi}\n")
    vs = mt_setup.load_variant_file(f)
    assert [(v.name, v.overrides, v.note) for v in vs] == [
        ("mine", ("loss.combine.mode=random_teacher",), ""), ("other", ("train.seed=3",), "hi")]
    f.write_text("bad: [no-equals-sign]\n")
    with pytest.raises(mt_setup.SetupError, match="variant 'bad'"):
        mt_setup.load_variant_file(f)


def test_domain_file_paths_resolve_against_the_yaml(tmp_path):
    (tmp_path / "d").mkdir()
    f = tmp_path / "d" / "dom.yaml"
    f.write_text("name: eyes\nsource: {path: data/train.csv, templates: ['{caption}']}\n"
                 "tasks: [{name: eyes-zs, kind: zeroshot, dataset: {path: data/test.csv}, classes: [a, b]}]\n")
    d = mt_setup.load_domain_file(f)
    assert d.source["path"] == str((tmp_path / "d" / "data" / "train.csv").resolve())
    assert d.tasks[0]["dataset"]["path"] == str((tmp_path / "d" / "data" / "test.csv").resolve())
    f.write_text("name: eyes\nsource: {path: x.csv}\n")
    with pytest.raises(mt_setup.SetupError, match="needs keys name, source, tasks"):
        mt_setup.load_domain_file(f)


def test_missing_data_root_is_a_clear_error(tmp_path):
    with pytest.raises(mt_setup.SetupError, match="--data-root"):
        mt_setup.resolve_domain(mt_setup.BUILTIN_DOMAINS["dermoscopy"], tmp_path)


@pytest.mark.parametrize("ci,expected", [([0.01, 0.2], "better"), ([-0.1, 0.0], "within"), ([-0.2, -0.001], "worse"),
                                         ([0.0, 0.1], "within"), ([None, 0.1], None)])
def test_verdict_words_at_the_boundaries(ci, expected):
    assert mt_verdict.word({"value": 0.0, "ci": ci}) == expected


def _fake_report():
    """A report shaped like `distill eval`'s, with hand-set numbers."""
    def est(p, lo, hi):
        return {"point": p, "ci_low": lo, "ci_high": hi, "n": 100}

    def diff(v, lo, hi, **kw):
        return {"value": v, "ci": [lo, hi], **kw}

    tasks = {
        "derm-zs": {"headline": "macro_auroc", "chance": {"macro_auroc": 0.5},
                    "metrics": {"macro_auroc": {"s": est(0.80, 0.78, 0.82), "baseline": est(0.75, 0.72, 0.78),
                                                "derm": est(0.81, 0.79, 0.83), "rad": est(0.6, 0.55, 0.65)}},
                    "differences": {"macro_auroc": {
                        "student_minus_best_teacher": diff(-0.01, -0.02, 0.005, teacher="derm"),
                        "student_minus_baseline": {"baseline": diff(0.05, 0.03, 0.07)},
                        "student_minus_teacher": {"derm": diff(-0.01, -0.02, 0.005),
                                                  "rad": diff(0.2, 0.15, 0.25)}}}},
        "rad-ret": {"headline": "mean_recall", "chance": {"mean_recall": 0.03},
                    "metrics": {"mean_recall": {"s": est(0.3, 0.25, 0.35), "baseline": est(0.31, 0.26, 0.36),
                                                "derm": est(0.1, 0.05, 0.15), "rad": est(0.4, 0.35, 0.45)}},
                    "differences": {"mean_recall": {
                        "student_minus_best_teacher": diff(-0.1, -0.15, -0.05, teacher="rad"),
                        "student_minus_baseline": {"baseline": diff(-0.01, -0.04, 0.02)},
                        "student_minus_teacher": {"rad": diff(-0.1, -0.15, -0.05), "derm": diff(0.2, 0.1, 0.3)}}}},
    }
    overall = {"student_minus_baseline": {"baseline": diff(0.02, 0.005, 0.035)},
               "student_minus_best_teacher": diff(-0.055, -0.08, -0.03)}
    return {"tasks": tasks, "overall": overall}


def test_verdict_entries_and_goal_from_a_report():
    entries = mt_verdict.verdict_entries(_fake_report(), "s", "baseline", {"derm-zs": "derm", "rad-ret": "rad"})
    derm, rad, mean = entries
    assert derm["student"]["value"] == 0.80 and derm["baseline"]["value"] == 0.75
    assert derm["best_teacher"] == {"name": "derm", "value": 0.81, "ci": [0.79, 0.83]}
    assert derm["student_minus_baseline"] == {"value": 0.05, "ci": [0.03, 0.07]}
    assert (derm["vs_baseline"], derm["vs_teachers"], derm["vs_own_teacher"]) == ("better", "within", "within")
    assert rad["vs_own_teacher"] == "worse" and rad["student_minus_own_teacher"]["teacher"] == "rad"
    assert mean["task"] == "mean over tasks" and mean["vs_baseline"] == "better"
    g = mt_verdict.goal(entries)
    assert g["beats_baseline_on_mean"] and g["below_own_teacher"] == ["rad-ret"] and not g["met"]
    line = mt_verdict.verdict_line(derm)
    assert "vs baseline +0.050 [+0.030, +0.070]: better" in line and "chance 0.500" in line


def test_ablation_outputs(tmp_path):
    entries = mt_verdict.verdict_entries(_fake_report(), "s", "baseline", {"derm-zs": "derm", "rad-ret": "rad"})
    v = mt_setup.VARIANTS["routed-feature"]
    results = {"a": {"variant": v, "entries": entries}, "b": {"variant": v, "entries": entries}}
    table = mt_verdict.ablation_table(results)
    assert table.count("\n") == 3 and "| a | +0.020 [+0.005, +0.035] |" in table and "not met" in table
    png = mt_verdict.plot_ablation(results, tmp_path / "a.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_smoke_run_on_the_real_data_writes_consistent_verdicts(shared_data, tmp_path, monkeypatch):
    """The README's `--budget smoke` run, shrunk further: every stage on the four real domains, both outputs."""
    from benchmarks.multi_teacher import main

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    rc = main(["--budget", "smoke", "--data-root", str(shared_data), "--out", str(out), "--threads", "1",
               "--teacher-steps", "15", "--student-steps", "15", "--max-rows-per-domain", "120",
               "--variant", "routed-feature,confidence-feature"])
    assert rc == 0
    entries = json.loads((out / "verdict.json").read_text())
    tasks = [e["task"] for e in entries]
    assert tasks == ["radiology-retrieval", "radiology-region-zeroshot", "dermoscopy-zeroshot",
                     "chest_xray-zeroshot", "breast_us-zeroshot", "mean over tasks"]
    for e in entries[:-1]:
        assert e["student"]["name"] == "routed-feature" and e["baseline"]["name"] == "baseline"
        d = e["student_minus_baseline"]
        assert d["value"] == pytest.approx(e["student"]["value"] - e["baseline"]["value"], abs=1e-9)
        assert d["ci"][0] <= d["value"] <= d["ci"][1]
        assert e["vs_baseline"] == mt_verdict.word(d)
        best = e["student_minus_best_teacher"]
        assert best["teacher"] in ("radiology", "dermoscopy", "chest_xray", "breast_us")
        assert e["best_teacher"]["value"] == pytest.approx(e["student"]["value"] - best["value"], abs=1e-9)
    own = {e["task"]: e["own_domain"] for e in entries}
    assert own["dermoscopy-zeroshot"] == "dermoscopy" and own["radiology-region-zeroshot"] is None
    assert entries[2]["student_minus_own_teacher"]["teacher"] == "dermoscopy"
    assert entries[2]["chance"] == pytest.approx(0.5)
    # the mean over tasks is the mean of the per-task differences
    mean = entries[-1]["student_minus_baseline"]["value"]
    assert mean == pytest.approx(sum(e["student_minus_baseline"]["value"] for e in entries[:-1]) / 5, abs=1e-9)
    md = (out / "report.md").read_text()
    assert "**Goal " in md and "**dermoscopy-zeroshot** (macro_auroc, chance 0.500)" in md
    assert "| rows of domain | breast_us | chest_xray | dermoscopy | radiology |" in md  # cache order
    conf = json.loads((out / "ablation.json").read_text())["setup"]["confidence_by_domain"]
    for per_domain in conf.values():  # every row's weights sum to 1 over the teachers
        assert set(per_domain) == {"radiology", "dermoscopy", "chest_xray", "breast_us"}
        for w in per_domain.values():
            assert sum(w.values()) == pytest.approx(1.0, abs=0.01)
    assert (out / "ablation.png").read_bytes()[:4] == b"\x89PNG"
    assert "| confidence-feature |" in (out / "ablation.md").read_text()
    meta = json.loads(next((out / "work" / "runs").glob("student-routed-feature-*/run_meta.json")).read_text())
    assert meta["routing"]["config"]["column"] == "domain"
    assert set(meta["routing"]["rows_per_teacher"]) == {"radiology", "dermoscopy", "chest_xray", "breast_us"}
    assert meta["routing"]["unrouted_rows"] == 0
