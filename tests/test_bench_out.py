"""Benchmark runs write to their own folder (bench-out/ or $BIOMED_DISTILL_BENCH_OUT), never over the committed
figures in benchmarks/results/ unless asked."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import dataclasses, sys
sys.path.insert(0, {bench!r})
import bench_common

@dataclasses.dataclass
class F:
    n: int = 1

j, m = bench_common.write_results("probe", F(), {{"x": 1}}, "| a |")
print(j)
"""


def _run(cwd: Path, env_out: str | None) -> Path:
    import os

    env = {k: v for k, v in os.environ.items() if k != "BIOMED_DISTILL_BENCH_OUT"}
    if env_out is not None:
        env["BIOMED_DISTILL_BENCH_OUT"] = env_out
    r = subprocess.run([sys.executable, "-c", SCRIPT.format(bench=str(ROOT / "benchmarks"))], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return (cwd / r.stdout.strip().splitlines()[-1]).resolve()


def test_results_land_in_bench_out_of_the_working_directory_or_the_named_folder(tmp_path):
    before = sorted(p.name for p in (ROOT / "benchmarks" / "results").iterdir())
    j = _run(tmp_path, None)
    assert j == (tmp_path / "bench-out" / "probe.json").resolve()
    assert json.loads(j.read_text())["results"] == {"x": 1} and (tmp_path / "bench-out" / "probe.md").is_file()
    j = _run(tmp_path, str(tmp_path / "elsewhere"))
    assert j == (tmp_path / "elsewhere" / "probe.json").resolve()
    assert sorted(p.name for p in (ROOT / "benchmarks" / "results").iterdir()) == before  # committed: untouched
