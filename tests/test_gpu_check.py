"""benchmarks/gpu_check.sh in its CPU --smoke mode: it trains, and prints the fields a GPU run is read by."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

from benchmarks import gpu_check

ROOT = Path(__file__).resolve().parents[1]

HELP = (
    "  data.micro_batch_size = None    [int | None] gradient caching\n"
    "  train.max_steps = None          [int | None] optimizer steps (not compiled)\n"
)


def test_variants_follow_the_trainers_config_keys():
    f = gpu_check.Flags(micro_batch_size=32)
    assert gpu_check.variant_overrides("plain", f, HELP) == ({}, None)
    assert gpu_check.variant_overrides("gradcache", f, HELP) == ({"data.micro_batch_size": 32}, None)
    # "compiled" in a description is not the key: compile variants are skipped until train.compile exists
    assert gpu_check.variant_overrides("compile+gradcache", f, HELP) == (
        {},
        "train.compile not in this trainer's config",
    )
    with_compile = HELP + "  train.compile = False   [bool] torch.compile\n"
    assert gpu_check.variant_overrides("compile+gradcache", f, with_compile) == (
        {"train.compile": True, "data.micro_batch_size": 32},
        None,
    )
    assert gpu_check.variant_overrides("gradcache", f, "")[1] == "data.micro_batch_size not in this trainer's config"
    assert gpu_check.variant_overrides("devdecode", f, "  data.decode = 'worker'")[0] == {"data.decode": "device"}


def test_smoke_prints_samples_mfu_and_peak_memory(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OUT": str(tmp_path)}
    p = subprocess.run(
        [
            "bash",
            str(ROOT / "benchmarks" / "gpu_check.sh"),
            "--smoke",
            "--peak-tflops",
            "0.5",
            "--variants",
            "plain,devdecode",
            "--workdir",
            str(tmp_path / "work"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    head = re.search(r"gpu_check device=cpu preset=tiny batch=8 steps=3 precision=no flops_per_sample=(\S+)", p.stdout)
    assert head, p.stdout
    fps = float(head.group(1))
    line = re.search(r"gpu_check variant=plain status=ok samples_per_s=(\S+) mfu=(\S+) peak_mem_gib=(\S+)", p.stdout)
    assert line, p.stdout
    sps, mfu, mem = (float(x) for x in line.groups())
    assert sps > 0 and mem > 0
    assert abs(mfu - sps * fps / 0.5e12) <= 0.0005 + 1e-3 * mfu  # MFU = samples/s x FLOPs/sample / peak
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["variants"]["plain"]["status"] == "ok" and saved["variants"]["plain"]["steps"] == 3
    assert saved["variants"]["devdecode"]["status"] == "ok"  # the corpus is JPEG: decoded by the main process
    assert abs(saved["flops_per_sample"] - fps) <= 1e-3 * fps  # printed with 4 significant digits
