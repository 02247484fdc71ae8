"""benchmarks/cost_model.py (docs/scale.md's tables): counted FLOPs of a known architecture and the disk arithmetic."""

from __future__ import annotations

import json

import pytest

from benchmarks import cost_model


def test_cost_model_counts_vit_b32_and_sizes_the_cache(tmp_path):
    out = tmp_path / "cost.json"
    cost_model.main(
        [
            "--teachers",
            "plip,pubmedclip",
            "--rows",
            "1000000",
            "--views",
            "10",
            "--tokens",
            "4",
            "--epochs",
            "1",
            "--json",
            str(out),
            "--out",
            str(tmp_path / "res"),
        ]
    )
    assert json.loads((tmp_path / "res" / "cost_model.json").read_text()) == json.loads(out.read_text())
    got = json.loads(out.read_text())
    plip = got["teachers"]["plip"]
    # ViT-B/32 at 224: timm/open_clip list 4.41 GMACs for the image tower, i.e. ~8.8 GFLOP; CLIP's text tower at
    # 77 tokens ~2 x 38M non-embedding parameters x 77 = 5.8 GFLOP
    assert plip["image_gflops"] == pytest.approx(8.8, rel=0.05)
    assert plip["text_gflops"] == pytest.approx(5.8, rel=0.05)
    t = got["tables"][0]
    assert got["row_bytes"] == 2 * (2 * 512 * 2)  # two teachers, image + text, float16
    assert t["bytes"] == 1_000_000 * got["row_bytes"]
    assert t["bytes_views"] == 1_000_000 * 2 * 512 * 2 * (10 + 1)
    assert t["bytes_tokens"] == 1_000_000 * 2 * 16 * 768 * 2
    flops = 2 * (plip["image_gflops"] + plip["text_gflops"]) * 1e9 * 1_000_000
    assert t["gpu_hours"] == pytest.approx(flops / (989e12 * 0.4) / 3600)
    with pytest.raises(SystemExit, match="unknown teacher"):
        cost_model.main(["--teachers", "nope"])
