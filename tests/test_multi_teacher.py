"""benchmarks/multi_teacher.py: its pieces (flags, teacher plan, routing, dev tasks, the baseline's augmentation,
verdict words) and a smoke run (test_multi_teacher_stats.py: the verdict maths)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import mt_setup, mt_verdict
from benchmarks.bench_common import parse_flags
from benchmarks.multi_teacher import (
    Flags,
    baseline_overrides,
    check_flags,
    dev_task,
    domain_sizes,
    main,
    sizes,
    student_overrides,
    uses_views,
    variant_overrides,
)
from cache.sources.corpus import open_corpus
from distill.config.train_config import Config
from distill.eval.tasks import task_from_dict

ROOT = Path(__file__).resolve().parents[1]


def test_repeated_tuple_flags_accumulate():
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
    assert json.loads(value.split("=", 1)[1]) == {
        "column": "domain",
        "teachers": {"derm": ["derm", "big"], "rad": ["rad", "big"]},
    }


def test_routing_placeholder_is_replaced():
    v = mt_setup.VARIANTS["routed-feature"]
    ov = variant_overrides(v, "loss.routing={}")
    assert "loss.routing={}" in ov and mt_setup.ROUTING not in ov


def test_domain_weights_placeholder_gives_sqrt_inverse_sizes(tmp_path):
    csv = tmp_path / "corpus.csv"
    csv.write_text(
        "image,caption,domain\n"
        + "".join(f"{i}.png,c{i},{d}\n" for i, d in enumerate(["big"] * 9 + ["small"] * 1 + ["mid"] * 4))
    )
    sizes = domain_sizes(csv)
    assert sizes == {"big": 9, "mid": 4, "small": 1}
    value = mt_setup.domain_weights_value(sizes)
    assert json.loads(value.split("=", 1)[1]) == {"big": 1.0, "mid": 1.5, "small": 3.0}  # sqrt(9/4), sqrt(9/1)
    ov = variant_overrides(mt_setup.VARIANTS["routed-affinity-x3-weighted"], "loss.routing={}", value)
    assert ov[-2:] == ["loss.routing={}", value] and mt_setup.DOMAIN_WEIGHTS not in ov


def test_every_builtin_variant_parses_as_a_config(tmp_path):
    fill = {
        mt_setup.ROUTING: 'loss.routing={"column": "domain", "teachers": {"a": ["a"]}}',
        mt_setup.DOMAIN_WEIGHTS: 'loss.routing.weights={"a": 2.0}',
    }
    for v in mt_setup.VARIANTS.values():
        cfg = Config.from_yaml(ROOT / "configs" / "tiny-hybrid.yaml", overrides=[fill.get(o, o) for o in v.overrides])
        assert cfg.mode == "hybrid", v.name


def test_variant_file_and_errors(tmp_path):
    f = tmp_path / "v.yaml"
    f.write_text("mine: ['loss.combine.mode=random_teacher']\nother: {overrides: ['train.seed=3'], note: hi}\n")
    vs = mt_setup.load_variant_file(f)
    assert [(v.name, v.overrides, v.note) for v in vs] == [
        ("mine", ("loss.combine.mode=random_teacher",), ""),
        ("other", ("train.seed=3",), "hi"),
    ]
    f.write_text("bad: [no-equals-sign]\n")
    with pytest.raises(mt_setup.SetupError, match="variant 'bad'"):
        mt_setup.load_variant_file(f)


def test_domain_file_paths_resolve_against_the_yaml(tmp_path):
    (tmp_path / "d").mkdir()
    f = tmp_path / "d" / "dom.yaml"
    f.write_text(
        "name: eyes\nsource: {path: data/train.csv, templates: ['{caption}']}\n"
        "tasks: [{name: eyes-zs, kind: zeroshot, dataset: {path: data/test.csv}, classes: [a, b]}]\n"
    )
    d = mt_setup.load_domain_file(f)
    assert d.source["path"] == str((tmp_path / "d" / "data" / "train.csv").resolve())
    assert d.tasks[0]["dataset"]["path"] == str((tmp_path / "d" / "data" / "test.csv").resolve())
    f.write_text("name: eyes\nsource: {path: x.csv}\n")
    with pytest.raises(mt_setup.SetupError, match="needs keys name, source, tasks"):
        mt_setup.load_domain_file(f)


def test_missing_data_root_is_a_clear_error(tmp_path):
    with pytest.raises(mt_setup.SetupError, match="--data-root"):
        mt_setup.resolve_domain(mt_setup.BUILTIN_DOMAINS["dermoscopy"], tmp_path)


@pytest.mark.parametrize(
    "ci,expected",
    [
        ([0.01, 0.2], "better"),
        ([-0.1, 0.0], "within"),
        ([-0.2, -0.001], "worse"),
        ([0.0, 0.1], "within"),
        ([None, 0.1], None),
    ],
)
def test_verdict_words_at_the_boundaries(ci, expected):
    assert mt_verdict.word({"value": 0.0, "ci": ci}) == expected


def test_flag_checks_name_the_flag():
    assert check_flags(Flags()) == (0,)
    assert check_flags(Flags(student_seed=4)) == (4,)
    assert check_flags(Flags(seeds=(0, 1, 2))) == (0, 1, 2)
    assert check_flags(Flags(student_fraction=0.9, dev_fraction=0.1)) == (0,)  # exactly 1: allowed
    for flags, msg in [
        (Flags(student_fraction=0.95, dev_fraction=0.1), "--dev-fraction 0.1 exceed 1"),
        (Flags(dev_fraction=1.0), "--dev-fraction must be in"),
        (Flags(pick_on="val"), "--pick-on"),
        (Flags(seeds=(0, 0)), "--seeds must be distinct"),
        (Flags(seeds=(1,), student_seed=2), "--seeds or --student-seed"),
        (Flags(ema=1.0), "--ema must be a decay in"),
        (Flags(ema=0.9, ema_start=1.0), "--ema-start must be a fraction"),
    ]:
        with pytest.raises(mt_setup.SetupError, match=msg):
            check_flags(flags)
    b = sizes(Flags(budget="cpu", teacher_width=128, student_width=64, student_layers=2))
    assert (b.teacher_width, b.teacher_layers, b.student_width, b.student_layers) == (128, 3, 64, 2)
    with pytest.raises(mt_setup.SetupError, match="--student-width must be >= 0"):
        sizes(Flags(student_width=-1))


def test_dev_tasks_read_the_dev_corpus(tmp_path):
    """The dev copy of a domain's own task: its own name, the dev corpus's columns, class names in label order."""
    dev = tmp_path / "corpus.csv"
    breast = mt_setup.BUILTIN_DOMAINS["breast_us"]
    t = dev_task(breast.tasks[0], dev, breast)
    assert t["name"] == "breast_us-zeroshot-dev" and t["classes"] == ["malignant", "benign"]
    assert t["dataset"] == {
        "path": str(dev.resolve()),
        "format": "csv",
        "image_column": "image",
        "caption_column": "caption",
        "label_column": "label",
    }
    assert t["label_values"] == ["malignant", "benign"]  # the corpus's `label` holds class names
    assert breast.tasks[0]["dataset"]["path"] == "medmnist/breastmnist.npz"  # the original is untouched
    task_from_dict(t)  # a valid task file
    rad = mt_setup.BUILTIN_DOMAINS["radiology"]
    r = dev_task(rad.tasks[0], dev, rad)
    assert r["kind"] == "retrieval" and r["dataset"]["caption_column"] == "caption" and "label_values" not in r
    probe = {"name": "p", "kind": "linear_probe", "dataset": {"path": "x.npz"}, "classes": ["a", "b"]}
    assert dev_task(probe, dev, breast)["dataset"]["split_fractions"] == [0.5, 0.1, 0.4]


def test_the_baseline_sees_the_students_augmentation(tmp_path):
    base = ["data.corpus=c.csv", "data.flip=false", "data.crop_scale=[0.8, 1.0]", "train.seed=1"]
    views = baseline_overrides(base, tmp_path / "f.h5", True)
    assert views == [
        "data.corpus=c.csv",
        "train.seed=1",
        f"data.features={tmp_path / 'f.h5'}",
        "data.use_views=true",
        "data.crop_scale=[0.9, 1.0]",
        "data.flip=false",
    ]
    assert student_overrides(base, True) == ["data.corpus=c.csv", "train.seed=1"]
    assert baseline_overrides(base, tmp_path / "f.h5", False) == base == student_overrides(base, False)
    own = mt_setup.VARIANTS["routed-affinity-own-crops"]
    assert uses_views(Flags(views=4), mt_setup.VARIANTS["routed-affinity"]) and not uses_views(Flags(views=4), own)
    assert not uses_views(Flags(views=0), mt_setup.VARIANTS["routed-affinity"])
    cfg = Config.from_yaml(ROOT / "configs" / "tiny-contrastive.yaml", overrides=views)
    assert cfg.mode == "contrastive" and cfg.data.use_views and cfg.data.features == str(tmp_path / "f.h5")


@pytest.mark.slow
def test_smoke_run_on_the_real_data_writes_consistent_verdicts(shared_data, tmp_path, monkeypatch):
    """The README's `--budget smoke` run, shrunk further: every stage on the four real domains, both outputs."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    rc = main(
        [
            "--budget",
            "smoke",
            "--data-root",
            str(shared_data),
            "--out",
            str(out),
            "--threads",
            "1",
            "--teacher-steps",
            "15",
            "--student-steps",
            "15",
            "--max-rows-per-domain",
            "120",
            "--variant",
            "routed-feature,confidence-feature,auto-routed-affinity-x3",
            "--ema",
            "0.9",
        ]
    )
    assert rc == 0
    entries = json.loads((out / "verdict.json").read_text())
    tasks = [e["task"] for e in entries]
    assert tasks == [
        "radiology-retrieval",
        "radiology-region-zeroshot",
        "dermoscopy-zeroshot",
        "chest_xray-zeroshot",
        "breast_us-zeroshot",
        "mean over domains",
    ]
    abl = json.loads((out / "ablation.json").read_text())
    picked = abl["picked"]
    assert abl["ranking"][0] == picked
    # --ema: every student is also reported from its EMA (trained with train.ema, exported with --ema)
    assert sorted(abl["variants"]) == sorted(
        n + e for n in ("routed-feature", "confidence-feature", "auto-routed-affinity-x3") for e in ("", "+ema")
    )
    ema_entry = abl["variants"]["routed-feature+ema"]["entries"][2]
    plain_entry = abl["variants"]["routed-feature"]["entries"][2]
    assert ema_entry["student"]["name"] == "routed-feature+ema" and ema_entry["baseline"] == plain_entry["baseline"]
    assert ema_entry["student"]["value"] != plain_entry["student"]["value"]
    # issue 20: the teacher report of the cache, and where auto routing sent each domain's rows (per seed)
    report = abl["setup"]["teacher_report"]
    assert [s["slice"] for s in report["by_domain"]] == ["breast_us", "chest_xray", "dermoscopy", "radiology"]
    assert [sum(c["domains"].values()) for c in report["by_clusters"]] == [c["rows"] for c in report["by_clusters"]]
    assert sum(c["rows"] for c in report["by_clusters"]) == sum(s["rows"] for s in report["by_domain"])
    routed = abl["setup"]["auto_routing_by_domain"]
    assert list(routed) == ["auto-routed-affinity-x3"] and list(routed["auto-routed-affinity-x3"]) == ["0"]
    per_domain = routed["auto-routed-affinity-x3"]["0"]
    assert sorted(per_domain) == ["breast_us", "chest_xray", "dermoscopy", "radiology"]
    for d in per_domain.values():
        assert 0 <= d["only_own"] <= d["own"] <= 1 and 1 <= d["teachers_per_row"] <= 4
    assert sum(d["rows"] for d in per_domain.values()) == sum(s["rows"] for s in report["by_domain"])
    assert "Where label-free routing sent each domain's rows" in (out / "report.md").read_text()
    assert entries == abl["variants"][picked]["entries"]  # verdict.json: the picked variant's test tasks
    for e in entries[:-1]:
        assert e["student"]["name"] == picked and e["baseline"]["name"] == "baseline"
        d = e["student_minus_baseline"]
        assert d["value"] == pytest.approx(e["student"]["value"] - e["baseline"]["value"], abs=1e-9)
        assert d["ci"][0] <= d["value"] <= d["ci"][1]
        assert e["vs_baseline"] == mt_verdict.word(d)
        assert e["seeds"][0]["seed"] == 0 and e["seeds"][0]["student_minus_baseline"] == d  # one seed: the same
        best = e["student_minus_best_teacher"]
        assert best["teacher"] in ("radiology", "dermoscopy", "chest_xray", "breast_us")
        assert e["best_teacher"]["value"] == pytest.approx(e["student"]["value"] - best["value"], abs=1e-9)
    own = {e["task"]: e["own_domain"] for e in entries}
    assert own["dermoscopy-zeroshot"] == "dermoscopy" and own["radiology-region-zeroshot"] is None
    assert entries[2]["student_minus_own_teacher"]["teacher"] == "dermoscopy"
    assert entries[2]["chance"] == pytest.approx(0.5)
    # the mean over domains: the two radiology tasks share MedPix dev and are averaged first; at-chance tasks out
    kept = {e["task"]: e["student_minus_baseline"]["value"] for e in entries[:-1] if not e["at_chance"]}
    assert entries[-1]["left_out_at_chance"] == [e["task"] for e in entries[:-1] if e["at_chance"]]
    by_domain = {}
    for e in entries[:-1]:
        if e["task"] in kept:
            by_domain.setdefault(e["domain"], []).append(kept[e["task"]])
    assert entries[-1]["student_minus_baseline"]["value"] == pytest.approx(
        sum(sum(v) / len(v) for v in by_domain.values()) / len(by_domain), abs=1e-9
    )
    assert entries[0]["test_set"] == entries[1]["test_set"] != entries[2]["test_set"]
    # dev tasks: one per domain, on rows the student never trained on and outside the test set
    dev = abl["variants"][picked]["dev_entries"]
    assert [e["task"] for e in dev] == [
        "radiology-retrieval-dev",
        "dermoscopy-zeroshot-dev",
        "chest_xray-zeroshot-dev",
        "breast_us-zeroshot-dev",
        "mean over domains",
    ]
    corpora = {k: out / v for k, v in abl["setup"]["corpora"].items()}  # shown relative to OUT, never absolute
    assert not any(Path(v).is_absolute() for v in abl["setup"]["corpora"].values())
    shown = json.dumps({k: abl["setup"][k] for k in ("teachers", "students", "corpora", "baseline_saw")})
    assert str(out.resolve()) not in shown and str(out) not in shown and "local-dir:work/" in shown

    def keys(name):
        return set(open_corpus(corpora[name]).keys)

    student_keys = keys("student")
    for dom in ("radiology", "dermoscopy", "chest_xray", "breast_us"):
        dev_keys = keys(f"dev-{dom}")
        assert dev_keys and not dev_keys & student_keys
    assert not keys("dev-dermoscopy") & keys("test-dermoscopy")
    # the same-views baseline: the trainer recorded the same stored views for it as for the student
    runs = out / "work" / "runs"
    metas = {
        p.name.rsplit("-", 1)[0]: json.loads((p / "run_meta.json").read_text())
        for p in runs.iterdir()
        if (p / "run_meta.json").is_file()
    }
    assert metas["baseline"]["stored_views"] and metas["baseline"]["mode"] == "contrastive"
    assert metas["baseline"]["augmentation"] == metas["student-routed-feature"]["augmentation"]
    assert not metas["reference"]["stored_views"]
    md = (out / "report.md").read_text()
    assert "**Goal " in md and "**dermoscopy-zeroshot** (macro_auroc, chance 0.500)" in md
    assert "The baseline saw the cache's 4 stored views per image" in md and "dev rows included" in md
    assert "-dev**" not in md  # the headline quotes test tasks only
    assert "| rows of domain | breast_us | chest_xray | dermoscopy | radiology |" in md  # cache order
    conf = json.loads((out / "ablation.json").read_text())["setup"]["confidence_by_domain"]
    for per_domain in conf.values():  # every row's weights sum to 1 over the teachers
        assert set(per_domain) == {"radiology", "dermoscopy", "chest_xray", "breast_us"}
        for w in per_domain.values():
            assert sum(w.values()) == pytest.approx(1.0, abs=0.01)
    assert (out / "ablation.png").read_bytes()[:4] == b"\x89PNG"
    other = next(n for n in ("routed-feature", "confidence-feature") if n != picked)
    table = (out / "ablation.md").read_text()
    assert f"| **{picked}** (picked) | stored views |" in table and f"| {other} | stored views |" in table
    meta = metas["student-routed-feature"]
    assert meta["routing"]["config"]["column"] == "domain"
    assert set(meta["routing"]["rows_per_teacher"]) == {"radiology", "dermoscopy", "chest_xray", "breast_us"}
    assert meta["routing"]["unrouted_rows"] == 0
