"""The whole pipeline, as a user runs it: cache -> train (hybrid) -> export -> eval, through the CLI.

One test uses real MedPix captions and images, and evaluates on MedMNIST and MedPix (skipped where
../shared/data is absent); the other runs `distill demo`, the README's main-job command, on generated data.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from distill.cli import main
from teachers import load_teacher

ROOT = Path(__file__).resolve().parents[1]


def _medpix_slice(shared: Path, out: Path, n: int = 48) -> Path:
    """The first n MedPix train rows as a corpus CSV with absolute image paths (real captions)."""
    src = shared / "medpix2" / "train.csv"
    rows = list(csv.DictReader(open(src)))[:n]
    path = out / "medpix_corpus.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption", "key"])
        for i, r in enumerate(rows):
            w.writerow([str((src.parent / r["image"]).resolve()), r["caption"], f"medpix-{i}"])
    return path


def _finite_numbers(obj) -> list[float]:
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in _finite_numbers(v)]
    if isinstance(obj, list):
        return [x for v in obj for x in _finite_numbers(v)]
    return [float(obj)] if isinstance(obj, (int, float)) and not isinstance(obj, bool) else []


@pytest.mark.slow
def test_cache_train_export_eval_on_real_data(shared_data, tiny_teachers, tmp_path, monkeypatch):
    monkeypatch.setenv("BIOMED_DISTILL_DATA", str(shared_data))
    corpus = _medpix_slice(shared_data, tmp_path)
    features, run, student, report = (
        tmp_path / "features.h5",
        tmp_path / "run",
        tmp_path / "student",
        tmp_path / "report",
    )
    teacher_args = [a for name, spec in tiny_teachers.items() for a in ("--teacher", f"{name}={spec}")]

    assert (
        main(
            [
                "cache",
                "--data",
                str(corpus),
                *teacher_args,
                "--out",
                str(features),
                "--batch-size",
                "16",
                "--num-workers",
                "0",
                "--device",
                "cpu",
                "--views",
                "2",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "train",
                "--config",
                str(ROOT / "configs" / "tiny-hybrid.yaml"),
                f"data.corpus={corpus}",
                f"data.features={features}",
                f"train.output_dir={run}",
                "train.max_steps=12",
                "train.checkpoint_every=6",
            ]
        )
        == 0
    )
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert len(log) == 12 and {"loss", "infonce", "affinity"} <= set(log[-1])
    assert all(math.isfinite(r["loss"]) for r in log)

    assert main(["export", str(run), "--out", str(student)]) == 0
    assert (student / "open_clip_model.safetensors").is_file() and (student / "README.md").is_file()

    assert (
        main(
            [
                "eval",
                "--model",
                f"student=local-dir:{student}",
                *[a for name, spec in tiny_teachers.items() for a in ("--model", f"{name}={spec}")],
                "--task",
                "pneumoniamnist-zeroshot",
                "--task",
                "medpix-retrieval",
                "--out",
                str(report),
                "--bootstrap",
                "50",
                "--max-samples",
                "48",
                "--device",
                "cpu",
            ]
        )
        == 0
    )

    rep = json.loads((report / "report.json").read_text())
    results = rep["results"]
    assert set(results) == {"student", "oc", "hf"}
    for model in results.values():
        assert set(model) == {"pneumoniamnist-zeroshot", "medpix-retrieval"}
        assert {"accuracy", "balanced_accuracy", "macro_f1", "macro_auroc"} <= set(model["pneumoniamnist-zeroshot"])
        assert {"image_to_text_R@1", "text_to_image_R@10"} <= set(model["medpix-retrieval"])
    numbers = _finite_numbers(rep)
    assert numbers and all(math.isfinite(x) for x in numbers)
    for model in results.values():
        for metrics in model.values():
            assert all(0.0 <= v <= 1.0 for v in metrics.values())
    md = (report / "report.md").read_text()
    assert "student − best teacher" in md and "| pneumoniamnist-zeroshot | accuracy |" in md
    assert sorted(p.name for p in (report / "charts").glob("*.png")) == [
        "medpix-retrieval.png",
        "pneumoniamnist-zeroshot.png",
    ]


@pytest.mark.slow
def test_demo_runs_the_whole_pipeline(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "12", "--teacher-steps", "8", "--rows", "48"]) == 0
    summary = json.loads((out / "demo_summary.json").read_text())
    assert summary["train"]["step"] == 12
    for rel in [
        "features.h5",
        "run/log.jsonl",
        "run/loss_curves.png",
        "student/open_clip_model.safetensors",
        "student/open_clip_config.json",
        "report/report.json",
        "report/report.md",
    ]:
        assert (out / rel).is_file(), rel
    card = (out / "student" / "README.md").read_text()
    assert "teacher_a" in card and "teacher_b" in card and "demo-retrieval" in card
    # the teachers are exported students (an export is itself a SPEC), of their own embedding sizes
    assert load_teacher(f"local-dir:{out / 'teachers' / 'teacher_b'}").embed_dim == 96
    # the exported student embeds like the trained one: reload through the same SPEC the report used
    t = load_teacher(f"local-dir:{out / 'student'}")
    emb = t.encode_text(t.tokenize(["ct image of a red circle in the centre"]))
    assert emb.shape == (1, t.embed_dim) and torch.isfinite(emb).all()
