"""`distill export` and `distill eval` through `distill.cli.main`: a tiny trained-looking run, exported, evaluated
against two teachers on a tiny dataset, then exported again with the report in its model card."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

from distill.cli import main
from distill.training.heads import ProjectionHeads
from student import build_student, load_student
from student.tokenizer import train_wordpiece

STEP = 4


@pytest.fixture(scope="module")
def run(tiny_corpus, tmp_path_factory) -> Path:
    """A run folder as the trainer leaves it: student/ (build_student), run_meta.json, checkpoint-4/."""
    with open(tiny_corpus, newline="") as f:
        captions = [row["caption"] for row in csv.DictReader(f)]
    tok = train_wordpiece(captions, tmp_path_factory.mktemp("tok"), vocab_size=300, model_max_length=32)
    run = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    bundle = build_student("tiny", run / "student", tokenizer_dir=tok)
    with torch.no_grad():  # "trained": weights that differ from a fresh build
        for p in bundle.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    heads = ProjectionHeads(64, {"oc": 24, "hf": 40})
    sd = {f"student.{k}": v.contiguous() for k, v in bundle.model.state_dict().items()}
    sd.update({f"heads.{k}": v.contiguous() for k, v in heads.state_dict().items()})
    ckpt = run / f"checkpoint-{STEP}"
    ckpt.mkdir()
    save_file(sd, str(ckpt / "model.safetensors"))
    (ckpt / "train_state.json").write_text(
        json.dumps({"step": STEP, "samples_seen": 8 * STEP, "last_losses": {"loss": 1.5, "feature/oc": 0.25}})
    )
    (run / "run_meta.json").write_text(
        json.dumps(
            {
                "teachers": {
                    "oc": {"spec": "local-dir:/teachers/oc", "weight": 1.0},
                    "hf": {"spec": "hf-clip:/teachers/hf", "weight": 0.5},
                },
                "corpus": {"path": str(tiny_corpus), "size": 32},
            }
        )
    )
    return run


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> dict[str, Path]:
    """12 PNGs, 3 modalities, distinct captions in the tiny corpus's words: zero-shot and retrieval task files."""
    root = tmp_path_factory.mktemp("data")
    (root / "img").mkdir()
    rng = np.random.default_rng(0)
    names = ["ct", "mri", "ultrasound"]
    colours, shapes = ["red", "green", "blue", "yellow"], ["circle", "square", "triangle", "cross"]
    rows = []
    for i in range(12):
        label = i % 3
        arr = np.clip(rng.normal(50 + 75 * label, 20, (24, 24, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(root / "img" / f"{i}.png")
        rows.append([f"img/{i}.png", names[label], f"{names[label]} image of a {colours[i % 4]} {shapes[i // 4]}"])
    with open(root / "data.csv", "w", newline="") as f:
        csv.writer(f).writerows([["image", "label", "caption"], *rows])
    files = {
        "zs": {
            "name": "zs",
            "kind": "zeroshot",
            "dataset": {"path": "data.csv"},
            "classes": names,
            "templates": ["{} image", "an {} image of a shape"],
        },
        "rt": {"name": "rt", "kind": "retrieval", "dataset": {"path": "data.csv"}},
        "bad": {
            "name": "bad",
            "kind": "zeroshot",
            "dataset": {"path": "data.csv", "label_column": "dx"},
            "classes": names,
        },
    }
    for name, t in files.items():
        (root / f"{name}.yaml").write_text(yaml.safe_dump(t))
    return {name: root / f"{name}.yaml" for name in files}


def _student_recalls(export: Path, data_csv: Path) -> dict[str, float]:
    """R@1/5/10 both ways of the exported student computed directly with load_student (no distill.eval code)."""
    model, preprocess, tokenizer = load_student(export)
    with open(data_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len({r["caption"] for r in rows}) == len(rows)  # one image per caption here: plain ranks
    with torch.no_grad():
        img = model.encode_image(
            torch.stack([preprocess(Image.open(data_csv.parent / r["image"]).convert("RGB")) for r in rows]),
            normalize=True,
        )
        txt = model.encode_text(tokenizer([r["caption"] for r in rows]), normalize=True)
    sim = (img @ txt.T).numpy()
    own = np.diag(sim)
    assert len(np.unique(sim)) == sim.size  # no ties, so plain ranks are the whole story
    ranks = {"image_to_text": (sim > own[:, None]).sum(1), "text_to_image": (sim.T > own[:, None]).sum(1)}
    return {f"{d}_R@{k}": float(np.mean(r < k)) for d, r in ranks.items() for k in (1, 5, 10)}


def test_cli_export_then_eval_then_export_with_report(run, tasks, tiny_teachers, tmp_path, capsys):
    export = tmp_path / "export"
    assert main(["export", str(run), "--out", str(export)]) == 0
    assert f"exported student to {export}" in capsys.readouterr().out
    assert {"open_clip_config.json", "open_clip_model.safetensors", "config.json", "tokenizer.json", "README.md"} <= {
        p.name for p in export.iterdir()
    }
    weights = load_file(str(export / "open_clip_model.safetensors"))
    trained = load_file(str(run / f"checkpoint-{STEP}" / "model.safetensors"))
    assert set(weights) == {k[len("student.") :] for k in trained if k.startswith("student.")}
    assert all(torch.equal(v, trained[f"student.{k}"]) for k, v in weights.items())

    report_dir = tmp_path / "report"
    argv = [
        "eval",
        "--model",
        f"oc={tiny_teachers['oc']}",
        "--model",
        f"hf={tiny_teachers['hf']}",
        "--model",
        f"distilled=local-dir:{export}",
        "--task",
        str(tasks["zs"]),
        "--task",
        str(tasks["rt"]),
        "--out",
        str(report_dir),
        "--device",
        "cpu",
        "--bootstrap",
        "40",
        "--batch-size",
        "5",
    ]
    assert main(argv) == 0
    report = json.loads((report_dir / "report.json").read_text())
    assert report["student"] == "distilled" and report["teachers"] == ["oc", "hf"]  # found as our export
    assert set(report["tasks"]) == {"zs", "rt"}
    for task in report["tasks"].values():
        for metric, row in task["metrics"].items():
            assert set(row) == {"oc", "hf", "distilled"}, metric
            for est in row.values():
                assert math.isfinite(est["point"]) and est["ci_low"] <= est["point"] <= est["ci_high"]
            assert task["gain"][metric] == pytest.approx(
                row["distilled"]["point"] - max(row["oc"]["point"], row["hf"]["point"])
            )
    direct = _student_recalls(export, tasks["zs"].parent / "data.csv")  # the CLI evaluated the exported weights
    direct["mean_recall"] = float(np.mean(list(direct.values())))
    assert {m: row["distilled"]["point"] for m, row in report["tasks"]["rt"]["metrics"].items()} == pytest.approx(
        direct
    )
    md = (report_dir / "report.md").read_text()
    assert "| task | metric | oc | hf | distilled (student) | chance | distilled − best teacher |" in md
    for name in ("zs", "rt"):
        assert (report_dir / "charts" / f"{name}.png").read_bytes()[:4] == b"\x89PNG" and f"(charts/{name}.png)" in md

    # export again, from the checkpoint folder itself, with the report in the card and a hub id for the text tower
    export2 = tmp_path / "export2"
    assert (
        main(
            [
                "export",
                str(run / f"checkpoint-{STEP}"),
                "--out",
                str(export2),
                "--report",
                str(report_dir),
                "--text-config-from-hub",
                "org/biomed-bert",
            ]
        )
        == 0
    )
    text = json.loads((export2 / "open_clip_config.json").read_text())["model_cfg"]["text_cfg"]
    assert text["hf_model_name"] == "org/biomed-bert"
    card = (export2 / "README.md").read_text()
    acc = report["results"]["distilled"]["zs"]["accuracy"]
    for needle in (
        "## Evaluation",
        "| metric | oc | hf | distilled |",
        "| zs/accuracy |",
        f"steps: {STEP}",
        "| oc | `local-dir:oc` | 1.0 |",
        "| hf | `hf-clip:hf` | 0.5 |",
        "- size: 32 image-text pairs",
        "| feature/oc | 0.25 |",
        "## Architecture",
    ):
        assert needle in card, needle
    zs_row = next(line for line in card.splitlines() if line.startswith("| zs/accuracy |"))
    assert zs_row.rstrip(" |").endswith(f"{acc:.4g}")
    model, _, tokenizer = load_student(export2)  # still loads offline: the folder holds the text config
    assert torch.equal(model.state_dict()["visual.proj"], weights["visual.proj"])


def test_cli_errors_are_clear(run, tasks, tiny_teachers, tmp_path, capsys):
    argv = ["eval", "--model", f"oc={tiny_teachers['oc']}", "--task", str(tasks["bad"]), "--out", str(tmp_path / "r")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "distill eval: error:" in err and "data.csv: column 'dx' not found" in err and "bad.yaml" in err
    assert not (tmp_path / "r").exists()  # validated before any model was loaded or anything written
    assert main(["export", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "distill export: error:" in err and f"checkpoint {tmp_path / 'nope'} not found" in err


def test_cli_eval_with_baseline(tasks, tiny_teachers, tmp_path, capsys):
    """--student and --baseline: roles, paired differences, verdicts, chance levels and the Overall section."""
    out = tmp_path / "report"
    argv = [
        "eval",
        "--model",
        f"oc={tiny_teachers['oc']}",
        "--model",
        f"hf={tiny_teachers['hf']}",
        "--model",
        f"oc2={tiny_teachers['oc']}",
        "--student",
        "oc",
        "--baseline",
        "oc2",
        "--baseline",
        "hf",
        "--task",
        str(tasks["zs"]),
        "--task",
        str(tasks["rt"]),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--bootstrap",
        "40",
        "--batch-size",
        "6",
    ]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["student"] == "oc" and report["baselines"] == ["hf", "oc2"] and report["teachers"] == []
    assert [v["role"] for v in report["models"].values()] == ["student", "baseline", "baseline"]
    for task in report["tasks"].values():
        for metric, d in task["differences"].items():
            assert d["student_minus_best_teacher"] is None and task["gain"][metric] is None  # no teachers
            assert d["student_minus_teacher"] == {}
            assert d["student_minus_baseline"]["oc2"] == {"value": 0.0, "ci": [0.0, 0.0]}  # the same model
            hf = d["student_minus_baseline"]["hf"]
            row = task["metrics"][metric]
            assert hf["value"] == pytest.approx(row["oc"]["point"] - row["hf"]["point"])
            assert hf["ci"][0] <= hf["value"] <= hf["ci"][1]
        v = task["verdict"]
        assert v["vs_teachers"] is None and v["vs_baselines"]["oc2"] == "within"
        assert v["vs_baselines"]["hf"] in ("better", "within", "worse")
    assert report["tasks"]["zs"]["chance"]["accuracy"] == pytest.approx(1 / 3)
    assert report["tasks"]["rt"]["chance"]["image_to_text_R@1"] == pytest.approx(1 / 12)  # 12 distinct captions
    assert report["overall"]["student_minus_best_teacher"] is None
    assert report["overall"]["student_minus_baseline"]["oc2"]["verdict"] == "within"
    md = (out / "report.md").read_text()
    assert "| task | metric | oc (student) | hf (baseline) | oc2 (baseline) | chance | oc − hf | oc − oc2 |" in md
    assert "## Overall" in md and "**Verdict** (headline metric macro_auroc): oc is " in md


def test_cli_eval_baseline_errors_and_help(tasks, tiny_teachers, tmp_path, capsys):
    base = [
        "eval",
        "--model",
        f"oc={tiny_teachers['oc']}",
        "--model",
        f"hf={tiny_teachers['hf']}",
        "--task",
        str(tasks["zs"]),
        "--out",
        str(tmp_path / "r"),
    ]
    assert main([*base, "--baseline", "clip"]) == 2
    err = capsys.readouterr().err
    assert "distill eval: error: baseline 'clip' is not one of the models (oc, hf)" in err
    assert main([*base, "--student", "oc", "--baseline", "oc"]) == 2
    assert "'oc' is the student; a baseline must be another model" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    with pytest.raises(SystemExit) as e:
        main(["eval", "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--baseline NAME" in text and "--student NAME" in text and "better / within / worse" in text
