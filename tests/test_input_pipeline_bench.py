"""benchmarks/input_pipeline.py at a reduced size: its JSON has the figures issue 10 names, and the dealt readers'
amplification is near 1 where the shuffled ones read every block once per (rank, worker). Not a speed test."""

from __future__ import annotations

import json

from benchmarks import input_pipeline


def test_input_pipeline_reduced_run_writes_its_figures(tmp_path):
    out = tmp_path / "ip.json"
    input_pipeline.main(
        [
            "--images",
            "6",
            "--image-px",
            "96",
            "--repeats",
            "1",
            "--rows",
            "40000",
            "--ranks",
            "4",
            "--workers",
            "2",
            "--json",
            str(out),
            "--out",
            str(tmp_path / "results"),
        ]
    )
    assert (tmp_path / "results" / "input_pipeline.md").is_file()
    got = json.loads(out.read_text())
    for key in (
        "read_per_useful_byte",
        "cores_per_gpu_at_1800",
        "cores_per_gpu_at_1800_device_decode",
        "block_cache_bytes_per_worker_9_teachers",
    ):
        assert got[key] > 0, key
    assert got["read_per_useful_byte"] < 1.1 < 4 <= got["read_per_useful_byte_before"]  # 8 pairs: ~8 before
