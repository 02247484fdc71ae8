"""run_eval end to end: a student and two tiny teachers on tmp data (and on real data where present)."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from distill.eval import EvalJob, is_our_export, list_tasks, pick_student, run_eval
from distill.eval.bootstrap import Estimate
from distill.eval.compare import overall_summary
from distill.eval.datasets import load_splits
from distill.eval.embeddings import EmbeddingCache
from distill.eval.report import build_report, markdown_table
from distill.eval.tasks import load_task
from distill.tiny_models import make_tiny_open_clip
from teachers import Teacher, load_teacher

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def student_spec(tmp_path_factory) -> str:
    """A third tiny open_clip model dressed as our export (its model card names biomed-distill)."""
    d = make_tiny_open_clip(tmp_path_factory.mktemp("student") / "s", embed_dim=24, seed=7)
    (d / "README.md").write_text("# student\nDistilled with biomed-distill from two teachers.\n")
    return f"local-dir:{d}"


@pytest.fixture(scope="module")
def tmp_tasks(tmp_path_factory) -> list[str]:
    """A CSV zero-shot task, a CSV retrieval task (shared captions) and an npz linear-probe task."""
    root = tmp_path_factory.mktemp("evaldata")
    rng = np.random.default_rng(0)
    (root / "img").mkdir()
    rows = []
    for i in range(18):
        label = i % 3
        arr = np.clip(rng.normal(60 + 70 * label, 25, (20, 20, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(root / "img" / f"{i}.png")
        rows.append(
            f"img/{i}.png,{['dark', 'grey', 'bright'][label]},a {['dark', 'grey', 'bright'][label]} scan {i % 6}"
        )
    (root / "data.csv").write_text("image,label,caption\n" + "\n".join(rows) + "\n")
    arrays: dict[str, np.ndarray] = {
        f"{s}_images": rng.integers(0, 255, (n, 28, 28), dtype=np.uint8)
        for s, n in (("train", 30), ("val", 12), ("test", 20))
    }
    arrays.update({f"{s}_labels": (np.arange(n) % 2)[:, None] for s, n in (("train", 30), ("val", 12), ("test", 20))})
    np.savez(root / "toy.npz", **arrays)  # type: ignore[arg-type]  # numpy's stub: a **dict might fill allow_pickle
    tasks = {
        "toy-zeroshot": {
            "kind": "zeroshot",
            "dataset": {"path": "data.csv"},
            "classes": ["dark", "grey", "bright"],
            "templates": ["a {} scan", "an image that is {}"],
        },
        "toy-retrieval": {"kind": "retrieval", "dataset": {"path": "data.csv"}},
        "toy-probe": {
            "kind": "linear_probe",
            "dataset": {"path": "toy.npz"},
            "classes": ["no", "yes"],
            "linear_probe": {"shots": [2], "l2_grid": [1e-2, 1.0]},
        },
    }
    paths = []
    for name, t in tasks.items():
        (root / f"{name}.yaml").write_text(yaml.safe_dump({"name": name, **t}))
        paths.append(str(root / f"{name}.yaml"))
    return paths


def _check_estimates(report: dict) -> None:
    for task in report["tasks"].values():
        for row in task["metrics"].values():
            for e in row.values():
                if e["point"] is None:
                    continue
                assert 0.0 <= e["point"] <= 1.0 and e["n"] > 0
                if e["ci_low"] is not None:
                    assert e["ci_low"] - 1e-9 <= e["point"] <= e["ci_high"] + 1e-9


def test_report_student_vs_two_teachers(tmp_path, tiny_teachers, student_spec, tmp_tasks, monkeypatch):
    models = {"oc": tiny_teachers["oc"], "hf": tiny_teachers["hf"], "ours": student_spec}
    assert is_our_export(student_spec) and not is_our_export(tiny_teachers["oc"])
    encoded: dict[str, int] = {}
    real_encode = Teacher.encode_image

    def counting_encode(self, images):
        encoded[self.spec] = encoded.get(self.spec, 0) + len(images)
        return real_encode(self, images)

    monkeypatch.setattr(Teacher, "encode_image", counting_encode)
    job = EvalJob(
        models=models, tasks=tmp_tasks, out=str(tmp_path / "rep"), device="cpu", batch_size=8, bootstrap=100, seed=0
    )
    report = run_eval(job)
    # zero-shot and retrieval share data.csv's 18 test images, the probe adds npz train/val/test (30 + 12 + 20):
    # each model encodes every image once (without reuse it would be 18 + 18 + 62)
    assert encoded == {spec: 18 + 30 + 12 + 20 for spec in models.values()}
    assert report["student"] == "ours" and report["teachers"] == ["oc", "hf"]  # picked as our export
    on_disk = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert on_disk == report
    assert set(report["tasks"]) == {"toy-zeroshot", "toy-retrieval", "toy-probe"}
    zs = report["tasks"]["toy-zeroshot"]
    assert zs["n"] == {"test": 18}
    assert set(zs["metrics"]) == {"accuracy", "balanced_accuracy", "macro_f1", "macro_auroc"}
    assert set(zs["metrics"]["accuracy"]) == {"oc", "hf", "ours"}
    rt = report["tasks"]["toy-retrieval"]["metrics"]
    assert rt["text_to_image_R@1"]["oc"]["n"] == 6 and rt["image_to_text_R@1"]["oc"]["n"] == 18  # 6 unique captions
    assert all(rt["image_to_text_R@10"][m]["point"] == 1.0 for m in models)  # only 6 distinct captions to rank
    assert set(report["tasks"]["toy-probe"]["metrics"]) >= {"2-shot/accuracy", "full/macro_auroc"}
    _check_estimates(report)
    assert report["results"]["ours"]["toy-zeroshot"]["accuracy"] == zs["metrics"]["accuracy"]["ours"]["point"]
    for task in report["tasks"].values():  # gain = student minus the best teacher, row by row
        for metric, row in task["metrics"].items():
            want = row["ours"]["point"] - max(row["oc"]["point"], row["hf"]["point"])
            assert task["gain"][metric] == pytest.approx(want)
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| task | metric | oc | hf | ours (student) | chance | ours − best teacher |" in md
    acc = zs["metrics"]["accuracy"]
    best = max(acc, key=lambda m: acc[m]["point"])
    line = next(ln for ln in md.splitlines() if ln.startswith("| toy-zeroshot | accuracy |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[2 + list(models).index(best)].startswith("**")
    d = zs["differences"]["accuracy"]["student_minus_best_teacher"]
    assert cells[-1] == f"{d['value']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}] (vs {d['teacher']})"
    assert (
        d["value"] == pytest.approx(zs["gain"]["accuracy"]) and cells[-2] == "0.333 (majority 0.333)"
    )  # 1 / 3 classes, balanced
    for name in ("toy-zeroshot", "toy-retrieval", "toy-probe"):
        png = tmp_path / "rep" / "charts" / f"{name}.png"
        assert png.read_bytes()[:8] == PNG_MAGIC and f"](charts/{name}.png)" in md
        with Image.open(png) as im:
            assert im.size[0] > 300 and im.size[1] > 200


def test_same_seed_same_report_and_student_override(tmp_path, tiny_teachers, tmp_tasks):
    kw = dict(
        models={"a": tiny_teachers["oc"], "b": tiny_teachers["oc"]},
        tasks=tmp_tasks[:1],
        device="cpu",
        bootstrap=50,
        student="b",
    )
    r1 = run_eval(EvalJob(out=str(tmp_path / "1"), **kw))
    r2 = run_eval(EvalJob(out=str(tmp_path / "2"), **kw))
    assert r1["tasks"] == r2["tasks"] and r1["student"] == "b"
    # the same model under two names: identical numbers, zero gain
    row = r1["tasks"]["toy-zeroshot"]["metrics"]["accuracy"]
    assert row["a"] == row["b"] and r1["tasks"]["toy-zeroshot"]["gain"]["accuracy"] == 0.0
    with pytest.raises(ValueError, match="student 'c' is not one of the models"):
        EvalJob(out=str(tmp_path), student="c", **{k: v for k, v in kw.items() if k != "student"})


def test_embedding_cache_on_disk_is_reused(tmp_path, tiny_teachers, tmp_tasks):
    task = load_task(tmp_tasks[0])
    test = load_splits(task)["test"]
    model = load_teacher(tiny_teachers["hf"])
    first = EmbeddingCache(tmp_path / "emb").images("hf", model, test, batch_size=5)
    files = list((tmp_path / "emb").glob("*.safetensors"))
    assert len(files) == 1 and first.shape == (18, 40)
    assert torch.allclose(first.norm(dim=-1), torch.ones(18), atol=1e-5)
    again = EmbeddingCache(tmp_path / "emb")
    reloaded = again.images("hf", model, test, batch_size=7)
    assert torch.equal(first, reloaded) and len(list((tmp_path / "emb").glob("*.safetensors"))) == 1


def test_embedding_cache_on_disk_notices_new_weights(tmp_path, tiny_teachers, tmp_tasks):
    """A model re-exported into the same folder keeps its SPEC but must not get the old embeddings back."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_teachers["hf"].split(":", 1)[1], folder)
    test = load_splits(load_task(tmp_tasks[0]))["test"]
    model = load_teacher(f"hf-clip:{folder}")
    EmbeddingCache(tmp_path / "emb").images("m", model, test)
    weights = next(f for f in folder.iterdir() if f.suffix in (".safetensors", ".bin"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    EmbeddingCache(tmp_path / "emb").images("m", model, test)
    assert len(list((tmp_path / "emb").glob("*.safetensors"))) == 2


def test_markdown_table_bold_best_and_gain():
    e = lambda p, lo, hi: Estimate(p, lo, hi, 100)  # noqa: E731
    report = build_report(
        {"s": {"spec": "x"}, "t1": {"spec": "y"}, "t2": {"spec": "z"}},
        "s",
        {"task": {"kind": "zeroshot"}},
        {
            "task": {
                "s": {"acc": e(0.812, 0.78, 0.84), "auc": e(0.5, 0.4, 0.6)},
                "t1": {"acc": e(0.7, 0.6, 0.8), "auc": e(0.9, 0.85, 0.95)},
                "t2": {"acc": e(0.75, 0.7, 0.8), "auc": e(float("nan"), float("nan"), float("nan"))},
            }
        },
        {"bootstrap": 100, "seed": 0},
    )
    table = markdown_table(report, "task").splitlines()
    # no replicates here, so the differences have no interval; no chance levels given: empty cells
    assert table[2] == (
        "| task | acc | **0.812 [0.78, 0.84]** | 0.700 [0.60, 0.80] | 0.750 [0.70, 0.80] |  | +0.062 (vs t2) |"
    )
    assert table[3] == "| task | auc | 0.500 [0.40, 0.60] | **0.900 [0.85, 0.95]** | n/a |  | -0.400 (vs t1) |"
    assert report["tasks"]["task"]["metrics"]["auc"]["t2"]["point"] is None  # NaN -> null in JSON


def test_builtin_tasks_on_real_data(tmp_path, shared_data, monkeypatch, tiny_teachers, student_spec):
    monkeypatch.setenv("BIOMED_DISTILL_DATA", str(shared_data))
    job = EvalJob(
        models={"hf": tiny_teachers["hf"], "ours": student_spec},
        tasks=list_tasks(),
        out=str(tmp_path / "real"),
        device="cpu",
        batch_size=32,
        bootstrap=50,
        max_samples=48,
    )
    report = run_eval(job)
    assert set(report["tasks"]) == set(list_tasks())
    for name, task in report["tasks"].items():
        assert all(n == 48 for n in task["n"].values()), name
    medpix = report["tasks"]["medpix-retrieval"]["metrics"]["text_to_image_R@1"]["ours"]
    assert medpix["n"] <= 48  # captions shared by several images are deduplicated
    ham = report["tasks"]["ham10000-zeroshot"]["metrics"]
    assert ham["accuracy"]["ours"]["n"] == 48 and math.isfinite(ham["macro_auroc"]["ours"]["point"])
    _check_estimates(report)
    assert (tmp_path / "real" / "charts" / "pneumoniamnist-finetune.png").is_file()


def test_baseline_roles_and_paired_resamples_for_every_task_kind(tmp_path, tiny_teachers, tmp_tasks):
    """The same model under two names, as student and baseline: on every task kind (zero-shot, retrieval, linear
    probe, fine-tuning) the paired difference is exactly 0 with interval [0, 0], which holds only if both names
    were scored on identical bootstrap resamples."""
    root = Path(tmp_tasks[0]).parent
    ft = root / "toy-finetune.yaml"
    ft.write_text(
        yaml.safe_dump(
            {
                "name": "toy-finetune",
                "kind": "finetune",
                "dataset": {"path": "toy.npz"},
                "classes": ["no", "yes"],
                "finetune": {"epochs": 1, "batch_size": 16, "max_steps": 2},
            }
        )
    )
    job = EvalJob(
        models={"a": tiny_teachers["oc"], "b": tiny_teachers["oc"], "h": tiny_teachers["hf"]},
        tasks=[*tmp_tasks, str(ft)],
        out=str(tmp_path / "rep"),
        device="cpu",
        batch_size=8,
        bootstrap=60,
        student="b",
        baselines=("a",),
    )
    report = run_eval(job)
    assert report["student"] == "b" and report["baselines"] == ["a"] and report["teachers"] == ["h"]
    assert {m: v["role"] for m, v in report["models"].items()} == {"a": "baseline", "b": "student", "h": "teacher"}
    heads = {
        "toy-zeroshot": "macro_auroc",
        "toy-retrieval": "mean_recall",
        "toy-probe": "full/macro_auroc",
        "toy-finetune": "macro_auroc",
    }
    for name, task in report["tasks"].items():
        assert task["headline"] == heads[name]
        for metric, row in task["metrics"].items():
            d = task["differences"][metric]
            assert d["student_minus_baseline"] == {"a": {"value": 0.0, "ci": [0.0, 0.0]}}, (name, metric)
            assert d["student_minus_best_teacher"]["teacher"] == "h"
            assert d["student_minus_best_teacher"]["value"] == pytest.approx(row["b"]["point"] - row["h"]["point"])
            assert task["gain"][metric] == pytest.approx(row["b"]["point"] - row["h"]["point"])  # teachers only
        assert task["verdict"]["metric"] == heads[name] and task["verdict"]["vs_baselines"] == {"a": "within"}
        assert task["verdict"]["vs_teachers"] in ("better", "within", "worse")
        assert set(task["chance"]) == set(task["metrics"])
    zs, rt = report["tasks"]["toy-zeroshot"], report["tasks"]["toy-retrieval"]
    assert zs["chance"]["accuracy"] == pytest.approx(1 / 3) and zs["chance"]["macro_auroc"] == 0.5
    assert zs["chance"]["macro_f1"] == pytest.approx(1 / 3)  # balanced classes: 2 (1/3)(1/3) / (2/3) = 1/3
    assert rt["chance"]["image_to_text_R@1"] == pytest.approx(1 / 6)  # 6 distinct captions
    assert rt["chance"]["text_to_image_R@1"] == pytest.approx(1 - 15 / 18)  # 3 of 18 images carry each caption
    assert report["tasks"]["toy-probe"]["chance"]["2-shot/accuracy"] == 0.5
    o = report["overall"]
    assert o["student_minus_baseline"]["a"] == {
        "value": 0.0,
        "ci": [0.0, 0.0],
        "verdict": "within",
        "tasks": list(heads),
    }
    assert o["student_minus_best_teacher"]["teachers"] == {t: "h" for t in heads}
    assert json.loads((tmp_path / "rep" / "report.json").read_text()) == report
    # the replicates stay in memory: the harness can average over any subset of tasks
    assert report.estimates["toy-probe"]["b"]["full/macro_auroc"].replicates.shape == (60,)
    again = overall_summary(report.estimates, "b", ["h"], ["a"])
    assert again["student_minus_best_teacher"]["value"] == pytest.approx(o["student_minus_best_teacher"]["value"])
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| task | metric | a (baseline) | b (student) | h | chance | b − best teacher | b − a |" in md
    assert "## Overall" in md and "| b − a | +0.000 [+0.000, +0.000] | within |" in md
    assert "**Verdict** (headline metric mean_recall): b is " in md and "within the interval of baseline a" in md


def test_baseline_must_be_a_model_and_not_the_student(tmp_path, tiny_teachers, tmp_tasks):
    kw = dict(models={"a": tiny_teachers["oc"], "b": tiny_teachers["hf"]}, tasks=tmp_tasks[:1], out=str(tmp_path))
    with pytest.raises(ValueError, match=r"baseline 'c' is not one of the models \(a, b\)"):
        EvalJob(baselines=("c",), **kw)
    with pytest.raises(ValueError, match="'a' is the student; a baseline must be another model"):
        EvalJob(student="a", baselines=("a",), **kw)
    with pytest.raises(ValueError, match="every model is a baseline"):
        EvalJob(baselines=("a", "b"), **kw)
    assert pick_student(EvalJob(baselines=("a",), **kw)) == "b"  # the default student is never a baseline
