"""Two processes (torchrun, gloo, CPU) build the same cache as one: each embeds its share, rank 0 merges."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

from cache import CacheJob, build_cache

pytestmark = pytest.mark.slow

DRIVER = textwrap.dedent("""
    import json, os, sys
    import torch
    torch.set_num_threads(1)
    import cache.store.writer as W
    from cache import CacheJob, build_cache
    kw, report = json.loads(sys.argv[1]), sys.argv[2]
    mine = []
    real = W.write_part
    def write_part(out, name, rows, *a, **k):
        mine.append([name, [int(r) for r in rows]])
        return real(out, name, rows, *a, **k)
    W.write_part = write_part
    summary = build_cache(CacheJob(**kw))
    with open(f"{report}.{os.environ['RANK']}.json", "w") as f:
        json.dump({"world": int(os.environ["WORLD_SIZE"]), "parts": mine,
                   "done": {n: t.done for n, t in summary.teachers.items()}}, f)
""")


def test_two_processes_equal_one(tmp_path, tiny_corpus, tiny_teachers):
    kw = dict(
        data=str(tiny_corpus),
        teachers=tiny_teachers,
        batch_size=4,
        chunk_rows=4,
        num_workers=1,
        views=2,
        progress=False,
    )
    single = tmp_path / "single.h5"
    build_cache(CacheJob(out=str(single), **kw))

    multi = tmp_path / "multi.h5"
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--standalone",
            str(driver),
            json.dumps({**kw, "out": str(multi)}),
            str(tmp_path / "report"),
        ],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    reports = [json.loads((tmp_path / f"report.{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 for r in reports)
    for name in tiny_teachers:  # each rank embedded its own half of the chunks, together every row once
        rows = [sorted(x for n, part in r["parts"] if n == name for x in part) for r in reports]
        assert len(rows[0]) == len(rows[1]) == 16
        assert sorted(rows[0] + rows[1]) == list(range(32))
        assert all(r["done"][name] == 32 for r in reports)  # every rank returns the final summary

    with h5py.File(single, "r") as a, h5py.File(multi, "r") as b:
        assert a.attrs["corpus_fingerprint"] == b.attrs["corpus_fingerprint"]
        np.testing.assert_array_equal(a["views/params"][:], b["views/params"][:])
        for name in tiny_teachers:
            ga, gb = a[f"teachers/{name}"], b[f"teachers/{name}"]
            assert gb["done"][:].all() and gb["image"].shape == ga["image"].shape == (32, 2, ga.attrs["embed_dim"])
            for what in ("image", "text"):
                np.testing.assert_allclose(gb[what][:].astype(np.float32), ga[what][:].astype(np.float32), atol=2e-3)
            np.testing.assert_allclose(gb["stats/text_cov"][:], ga["stats/text_cov"][:], atol=1e-4)
    assert not Path(str(multi) + ".parts").exists() and not Path(str(multi) + ".lock").exists()


def test_accelerate_launch_of_the_cli_equals_one_process(tmp_path, tiny_corpus, tiny_teachers):
    """The README's command: `accelerate launch ... -m distill.cli cache`. On CPU, accelerate needs --multi_gpu to
    start N processes (it launches through torchrun); `--cpu --num_processes N` alone starts just one."""
    oc = {"oc": tiny_teachers["oc"]}
    single = tmp_path / "single.h5"
    build_cache(
        CacheJob(
            data=str(tiny_corpus),
            teachers=oc,
            out=str(single),
            batch_size=4,
            chunk_rows=4,
            num_workers=0,
            progress=False,
        )
    )
    multi = tmp_path / "multi.h5"
    root = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "OMP_NUM_THREADS": "1",
        "HF_HOME": str(tmp_path / "hf_home"),
    }  # no user accelerate config
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "-m",
            "distill.cli",
            "cache",
            "--data",
            str(tiny_corpus),
            "--teacher",
            f"oc={tiny_teachers['oc']}",
            "--out",
            str(multi),
            "--batch-size",
            "4",
            "--chunk-rows",
            "4",
            "--num-workers",
            "0",
            "--device",
            "cpu",
        ],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # rank 0's bar: 2 processes, and rank 0 embedded half of the rows (chunks dealt round-robin)
    assert "cache oc (rank 0 of 2): 100%" in proc.stderr and "16/16" in proc.stderr, proc.stderr[-2000:]
    assert proc.stdout.count("feature cache") == 1 and "oc: computed 32, done 32/32, skipped 0" in proc.stdout
    with h5py.File(single, "r") as a, h5py.File(multi, "r") as b:
        assert b["teachers/oc/done"][:].all()
        for what in ("image", "text"):
            np.testing.assert_allclose(
                b[f"teachers/oc/{what}"][:].astype(np.float32),
                a[f"teachers/oc/{what}"][:].astype(np.float32),
                atol=2e-3,
            )
        np.testing.assert_allclose(b["teachers/oc/stats/image_cov"][:], a["teachers/oc/stats/image_cov"][:], atol=1e-4)
    assert not Path(str(multi) + ".parts").exists() and not Path(str(multi) + ".lock").exists()
