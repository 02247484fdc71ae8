"""A first hour with `distill eval` without surprises (issue 18): verdicts on the console, below-chance and one-class
models flagged in the verdict, accuracy's majority-class level, no absolute paths in what is shipped or shown, and
the small things (pluralisation, --help's "95%", legends, .gitignore, the run's student-config folder, the bench
extra)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from benchmarks import open_clip_baseline, train_overhead
from distill.cli import main
from distill.eval.bootstrap import Estimate
from distill.eval.chance import majority_share
from distill.eval.classification import classification_metrics
from distill.eval.compare import overall_summary
from distill.eval.report import build_report, console_lines, markdown_table, model_label
from distill.eval.runner import _task_info
from distill.eval.tasks import load_task
from student.card import CardTeacher, ModelCard, make_model_card
from student.run_files import student_config_dir
from student.shown_paths import shown_path, shown_spec

ROOT = Path(__file__).resolve().parents[1]
NAN = float("nan")


def est(point: float, lo: float, hi: float, reps, k: int | None = None) -> Estimate:
    return Estimate(point, lo, hi, 40, np.asarray(reps, dtype=float), classes_predicted=k)


def _flagged_report(student_collapsed: bool = True) -> dict:
    """A student beating a baseline whose AUROC interval lies far below chance, the student predicting one class."""
    row = {
        "s": {
            "macro_auroc": est(0.61, 0.55, 0.67, [0.6, 0.62, 0.61, 0.6]),
            "balanced_accuracy": est(0.5, 0.5, 0.5, [0.5] * 4, 1 if student_collapsed else 2),
            "accuracy": est(0.7, 0.6, 0.8, [0.7] * 4, 1 if student_collapsed else 2),
        },
        "b": {
            "macro_auroc": est(0.19, 0.12, 0.26, [0.2, 0.18, 0.19, 0.2]),
            "balanced_accuracy": est(0.4, 0.3, 0.5, [0.4] * 4, 2),
            "accuracy": est(0.4, 0.3, 0.5, [0.4] * 4, 2),
        },
    }
    models = {"s": {"spec": "local-dir:../student"}, "b": {"spec": "ViT-B-32/openai"}}
    return build_report(
        models,
        "s",
        {"T": {"kind": "zeroshot", "dataset": "t.csv", "n": {"test": 40}}},
        {"T": row},
        {"bootstrap": 4, "seed": 0, "confidence": 0.95},
        baselines=("b",),
        chance={"T": {"macro_auroc": 0.5, "balanced_accuracy": 0.5, "accuracy": 0.5}},
        majority={"T": {"accuracy": 0.7}},
    )


def test_better_than_a_below_chance_baseline_says_so_and_a_one_class_student_is_flagged():
    report = _flagged_report()
    v = report["tasks"]["T"]["verdict"]
    assert v["vs_baselines"] == {"b": "better"}
    assert v["below_chance"] == ["b"] and v["one_class"] == ["s"]
    assert report["tasks"]["T"]["flags"] == {"below_chance": ["b"], "one_class": ["s"]}
    assert v["text"] == (
        "s is better than baseline b beyond the interval (+0.420 [+0.400, +0.439]), though b is "
        "below chance (macro_auroc 0.190 [0.12, 0.26] against chance 0.500); caution: s predicts "
        "one class for every test image (balanced_accuracy 0.500 [0.50, 0.50])"
    )
    md = markdown_table(report, "T")
    assert "0.190 [0.12, 0.26] (below chance)" in md and "**0.500 [0.50, 0.50]** (one class)" in md
    acc = next(line for line in md.splitlines() if "| accuracy |" in line)
    assert "| 0.500 (majority 0.700) |" in acc  # accuracy: 1/C and the majority-class level side by side
    assert "caution: s predicts one class" in report["overall"]["text"]
    assert "note: b is below chance on T" in report["overall"]["text"]
    assert console_lines(report) == [f"T (headline metric macro_auroc): {v['text']}."]


def test_no_flags_when_nothing_is_wrong():
    v = _flagged_report(student_collapsed=False)["tasks"]["T"]["verdict"]
    assert v["one_class"] == [] and "caution" not in v["text"]


def test_classification_metrics_count_the_classes_predicted():
    y = np.array([0, 1, 2, 0, 1, 2, 0, 0])
    collapsed = np.tile([0.2, 0.5, 0.3], (8, 1)) + np.linspace(0, 0.01, 8)[:, None] * np.array([1, 0, 0])
    m = classification_metrics(y, collapsed, ["a", "b", "c"], resamples=20, seed=0)
    assert {k: e.classes_predicted for k, e in m.items()} == {
        "accuracy": 1,
        "balanced_accuracy": 1,
        "macro_f1": 1,
        "macro_auroc": None,
    }
    assert m["balanced_accuracy"].point == pytest.approx(1 / 3)
    assert m["accuracy"].to_dict()["classes_predicted"] == 1 and "classes_predicted" not in m["macro_auroc"].to_dict()
    assert majority_share(y, 3) == pytest.approx(4 / 8) and majority_share(np.eye(3)[y], 3) is None


def test_overall_text_for_one_task_is_grammatical():
    r = lambda *v: np.array(v, dtype=float)  # noqa: E731
    one = {
        "A": {
            "s": {"mean_recall": est(0.5, NAN, NAN, r(0.5, 0.4, 0.6, 0.5))},
            "t": {"mean_recall": est(0.4, NAN, NAN, r(0.4, 0.4, 0.4, 0.4))},
            "b": {"mean_recall": est(0.3, NAN, NAN, r(0.3, 0.3, 0.3, 0.3))},
        }
    }
    o = overall_summary(one, "s", ["t"], ["b"], level=0.5)
    assert "1 task'" not in o["text"] and "Averaged" not in o["text"]
    assert o["text"].startswith("On A's headline metric (mean_recall), s is ") and "mean difference" not in o["text"]
    assert o["text"].endswith("on A)")  # the baseline's one task named, not "over 1 task"
    only_base = overall_summary(one, "s", [], ["b"], level=0.5)
    assert only_base["text"].startswith("On A's headline metric (mean_recall), s is better than baseline b")


def test_legend_and_header_never_repeat_a_name_that_is_its_role():
    assert model_label("student", "student", 3) == "student" and model_label("ours", "student", 3) == "ours (student)"
    assert model_label("baseline", "baseline", 2) == "baseline" and model_label("t", "teacher", 3) == "t"


def test_shown_paths_relative_within_two_levels_else_the_name(tmp_path):
    out = tmp_path / "demo" / "report"
    assert shown_path(tmp_path / "demo" / "student", out) == "../student"
    assert shown_path(out / "charts", out) == "charts"
    assert shown_path("/somewhere/else/data.csv", out) == "data.csv"
    assert shown_path("/somewhere/else/data.csv") == "data.csv"
    assert shown_spec(f"local-dir:{tmp_path / 'demo' / 'student'}", out) == "local-dir:../student"
    assert shown_spec("hf-clip:/models/x", out) == "hf-clip:x" and shown_spec("local-dir:/m/quilt") == "local-dir:quilt"
    for spec in ("hf-hub:org/repo", "ViT-B-32/openai", "biomedclip", "hf:org/model", "py:pkg.mod:fn"):
        assert shown_spec(spec, out) == spec


def test_model_card_names_no_absolute_path():
    card = make_model_card(
        ModelCard(
            source="local-dir:/home/alice/models/base",
            teachers=(
                CardTeacher("quilt", "local-dir:/home/alice/models/quilt", 0.5),
                CardTeacher("bmc", "hf-hub:microsoft/BiomedCLIP", 1.0),
            ),
            corpus="/home/alice/data/pmc.csv",
        ),
        {"vision_cfg": {}, "text_cfg": {}},
    )
    assert "/home/alice" not in card
    for needle in (
        "from `local-dir:base`",
        "| quilt | `local-dir:quilt` | 0.5 |",
        "`hf-hub:microsoft/BiomedCLIP`",
        "- corpus: `pmc.csv`",
    ):
        assert needle in card, needle


@pytest.fixture(scope="module")
def task_file(tmp_path_factory) -> Path:
    """A zero-shot task on 12 PNGs whose dataset lies far from the report folder (shown by name)."""
    root = tmp_path_factory.mktemp("far") / "a" / "b" / "c"
    (root / "img").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(12):
        label = i % 3
        arr = np.clip(rng.normal(50 + 75 * label, 20, (20, 20, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(root / "img" / f"{i}.png")
        rows.append(f"img/{i}.png,{['ct', 'mri', 'us'][label]}")
    (root / "data.csv").write_text("image,label\n" + "\n".join(rows) + "\n")
    (root / "zs.yaml").write_text(
        yaml.safe_dump(
            {
                "name": "zs",
                "kind": "zeroshot",
                "dataset": {"path": "data.csv"},
                "classes": ["ct", "mri", "us"],
                "templates": ["{} image"],
            }
        )
    )
    return root / "zs.yaml"


def test_cli_eval_prints_verdicts_and_ships_no_absolute_paths(task_file, tiny_teachers, tmp_path, capsys):
    out = tmp_path / "work" / "report"
    argv = [
        "eval",
        "--model",
        f"oc={tiny_teachers['oc']}",
        "--model",
        f"hf={tiny_teachers['hf']}",
        "--student",
        "oc",
        "--baseline",
        "hf",
        "--task",
        str(task_file),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--bootstrap",
        "30",
        "--batch-size",
        "6",
    ]
    assert main(argv) == 0
    captured = capsys.readouterr()
    report = json.loads((out / "report.json").read_text())
    verdict = report["tasks"]["zs"]["verdict"]["text"]
    assert captured.out.splitlines() == [
        f"zs (headline metric macro_auroc): {verdict}.",
        f"report written to {out / 'report.md'}",
    ]
    md = (out / "report.md").read_text()
    bars = captured.err  # tqdm's progress bars: "oc | data.csv (test)", not the dataset's absolute path
    assert "oc | data.csv (test)" in bars and str(task_file.parent) not in bars
    for text in (md, json.dumps(report)):
        assert str(tmp_path) not in text and str(task_file.parent) not in text
        assert str(Path(tiny_teachers["oc"].split(":", 1)[1]).parent) not in text
    assert "| oc | student | `local-dir:oc` |" in md and "`hf-clip:hf`" in md
    assert "on `data.csv` (test 12)" in md and report["tasks"]["zs"]["source"] == "zs.yaml"
    acc = next(line for line in md.splitlines() if line.startswith("| zs | accuracy |"))
    assert f"| 0.333 (majority {4 / 12:.3f}) |" in acc


def test_builtin_task_source_is_its_name(tmp_path):
    task = load_task("pneumoniamnist-zeroshot")
    info = _task_info(task, {}, tmp_path)
    assert info["source"] == "built-in task pneumoniamnist-zeroshot" and not info["dataset"].startswith("/")


def test_eval_help_prints_a_single_percent_sign(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = capsys.readouterr().out
    assert "95%%" not in text and "with 95% bootstrap intervals" in text


def test_gitignore_covers_segment_folders_and_benchmark_outputs():
    names = ["features.h5.segments/seg-0.bin", "multi-teacher-out/report.md", "demo-out/x"]
    p = subprocess.run(["git", "check-ignore", "--no-index", *names], cwd=ROOT, capture_output=True, text=True)
    assert p.stdout.split() == names
    fields = (ROOT / "benchmarks" / "multi_teacher.py").read_text()
    assert 'out: str = "multi-teacher-out"' in fields  # the default the .gitignore line follows


def test_run_student_config_folder_and_runs_from_before_the_rename(tmp_path):
    assert student_config_dir(tmp_path) == tmp_path / "student-config"
    (tmp_path / "student").mkdir()
    (tmp_path / "student" / "open_clip_config.json").write_text("{}")
    assert student_config_dir(tmp_path) == tmp_path / "student"  # an old run still exports
    (tmp_path / "student-config").mkdir()
    assert student_config_dir(tmp_path) == tmp_path / "student-config"


def test_train_overhead_without_the_bench_extra_says_which_extra(monkeypatch, capsys):
    monkeypatch.setattr(open_clip_baseline, "BENCH_MODULES", ("json", "no_such_module_for_this_test"))
    assert train_overhead.main([]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "no_such_module_for_this_test" in err and "pip install -e '.[bench]'" in err and "json" not in err
    assert "--skip-open-clip" in err
