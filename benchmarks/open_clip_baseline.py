"""Comparison 3 of train_overhead.py: `python -m open_clip_train.main` on our student's own open_clip config.

Why a stock open_clip run: "ours is as fast as open_clip" is only worth saying against their trainer on the same
model, data, batch, precision and workers. It needs the `bench` extra (pandas, braceexpand, webdataset).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from benchmarks.train_overhead import Flags  # train_overhead imports this module

# Imports of torch and of the project's modules (which load torch) sit in the functions that use them, so that
# --help and a flag error answer at once, without loading torch.

BENCH_MODULES = ("pandas", "braceexpand", "webdataset")  # pyproject's `bench` extra: what open_clip_train imports


def missing_bench_modules() -> list[str]:
    """The `bench` extra's modules that are not installed (open_clip_train.main fails without them)."""
    return [m for m in BENCH_MODULES if importlib.util.find_spec(m) is None]


def _steady(values: list[float], warmup: int) -> float:
    return statistics.median(values[warmup:] or values)


def open_clip_model_dir(student_dir: Path, out: Path) -> Path:
    """Our student's folder (open_clip_config.json, BERT config.json, tokenizer) plus freshly initialised weights.

    Stock open_clip asks transformers for the BERT tower's pretrained weights unless the folder holds CLIP
    weights (open_clip_model.safetensors), so we write the same architecture's initial weights there."""
    from safetensors.torch import save_file  # noqa: PLC0415 (lazy: torch after the flags)

    from student.build import instantiate  # noqa: PLC0415 (lazy: torch after the flags)

    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(student_dir, out, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    cfg_path = out / "open_clip_config.json"
    cfg = json.loads(cfg_path.read_text())
    text = cfg["model_cfg"]["text_cfg"]
    for key in ("hf_model_name", "hf_tokenizer_name"):
        if key in text:
            text[key] = str(out.resolve())
    cfg_path.write_text(json.dumps(cfg, indent=2))
    model = instantiate(cfg["model_cfg"], cfg.get("preprocess_cfg"))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "open_clip_model.safetensors"))
    return out


def run_open_clip(student_dir: Path, corpus: Path, work: Path, f: Flags) -> dict:
    """`python -m open_clip_train.main` on our student's open_clip config; samples/s per step from its log."""
    rows = list(csv.DictReader(open(corpus, newline="")))
    abs_csv = work / "corpus_abs.csv"  # open_clip's CsvDataset opens paths as written (relative to its cwd)
    with open(abs_csv, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["image", "caption"])
        w.writeheader()
        w.writerows({"image": str((corpus.parent / r["image"]).resolve()), "caption": r["caption"]} for r in rows)
    model_dir = open_clip_model_dir(student_dir, work / "open_clip_model")
    per_epoch = len(rows) // f.batch_size
    epochs = -(-f.steps // per_epoch)
    logs = work / "open_clip_logs"
    shutil.rmtree(logs, ignore_errors=True)
    cmd = [
        sys.executable,
        "-m",
        "open_clip_train.main",
        "--model",
        f"local-dir:{model_dir}",
        "--train-data",
        str(abs_csv),
        "--dataset-type",
        "csv",
        "--csv-separator",
        ",",
        "--csv-img-key",
        "image",
        "--csv-caption-key",
        "caption",
        "--batch-size",
        str(f.batch_size),
        "--epochs",
        str(epochs),
        "--workers",
        str(f.workers),
        "--precision",
        {"no": "fp32", "bf16": "amp_bf16", "fp16": "amp"}[f.mixed_precision],
        "--device",
        "cuda" if _cuda() else "cpu",
        "--lr",
        "2e-3",
        "--wd",
        "0.2",
        "--warmup",
        "5",
        "--log-every-n-steps",
        "1",
        "--save-frequency",
        "0",
        "--logs",
        str(logs),
        "--name",
        "bench",
        "--seed",
        "0",
        "--report-to",
        "",
    ]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=work, capture_output=True, text=True, env=_env())
    wall = time.perf_counter() - t0
    text = p.stdout + p.stderr
    if p.returncode != 0:
        raise RuntimeError(f"open_clip_train failed ({p.returncode}):\n{text[-3000:]}")
    sps = [float(m) for m in re.findall(r"Batch \(t\): [0-9.]+, ([0-9.e+]+)/s,", text)][: f.steps]
    if not sps:
        raise RuntimeError(f"no 'Train Epoch' lines in open_clip_train's output:\n{text[-3000:]}")
    step_s = [f.batch_size / s for s in sps]
    return {"wall_s": wall, "step_s": _steady(step_s, f.warmup_steps), "steps": len(sps), "command": " ".join(cmd)}


def _cuda() -> bool:
    import torch  # noqa: PLC0415 (lazy: torch after the flags)

    return torch.cuda.is_available()


def _env() -> dict:
    repo = Path(__file__).resolve().parent.parent
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(repo)}
