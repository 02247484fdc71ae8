"""benchmarks/grad_cache.py --quick runs end to end (not a speed test): the results carry every figure the README
quotes, GradCache's loss and gradients equal the plain step's, and peak memory was measured for each variant."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_run_writes_equal_gradients_and_memory(tmp_path):
    out = tmp_path / "grad_cache.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    before = {p: p.stat().st_mtime for p in (ROOT / "benchmarks" / "results").glob("grad_cache.*")}
    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "grad_cache.py"), "--quick", "--mode", "hybrid", "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(out.read_text())["results"]
    variants = {"plain", "gradcache", "accumulation"}
    assert set(r["step_s"]) == variants | {"forward_nograd"}
    assert all(r["step_s"][v]["median"] > 0 and r["step_s"][v]["n"] == 2 for v in r["step_s"])
    for k in ("gradcache_over_plain", "gradcache_over_accumulation", "ideal_over_plain"):
        assert {"median", "lo", "hi", "n"} <= r["ratios"][k].keys() and r["ratios"][k]["lo"] <= r["ratios"][k]["hi"]
    assert len(r["load_avg"]) == 3  # before each of the 2 repeats and after
    eq = r["equality"]
    # hybrid: all four terms, each equal; float32 sums in another order only, and that order is up to the CPU's
    # kernels (AVX2 vs AVX-512). Bound, as test_grad_cache's float32 check derives it: each path is within
    # ~n x 2^-24 x cancellation of the exact value (n ~ B x context ~ 100 summed terms, cancellation up to ~30x:
    # ~2e-4 of a tensor's largest gradient; the loss terms likewise, a logit scale up to 100 amplifying 64-wide dot
    # products' rounding), so two float32 paths differ by < 1e-3 (measured 2e-5 Intel, 6e-7 AMD). A chunking bug
    # (rows in the wrong chunk, a chunk dropped or counted twice) is O(1) relative; GradCache's exactness is
    # checked to 1e-10 in float64 by tests/test_grad_cache.py.
    tol = 1e-3
    assert set(eq["losses_plain"]) == {"infonce", "feature", "icl", "affinity", "loss"}
    for k, v in eq["losses_plain"].items():  # each term against its own size (icl's ~1e5 would hide infonce's ~2)
        assert abs(eq["losses_gradcache"][k] - v) <= tol * max(1.0, abs(v)), (k, v, eq["losses_gradcache"][k])
    assert eq["grad_max_rel_diff"] < tol and eq["grad_max_abs_diff"] <= tol * eq["grad_max_abs"]
    assert eq["params_compared"] > 50
    assert set(r["memory"]) == variants
    for v in variants:
        m = r["memory"][v]
        assert m["peak_over_baseline_mib"] > 0 and m["baseline_mib"] > 100 and "VmHWM" in m["method"]
    assert "| gradcache |" in res.stdout and "GradCache / plain" in res.stdout
    # --quick leaves the committed results alone
    assert {p: p.stat().st_mtime for p in (ROOT / "benchmarks" / "results").glob("grad_cache.*")} == before
