"""benchmarks/train_setup: the warm-up run is untimed, verdicts follow the median and range, the hybrid configs."""

from __future__ import annotations

from pathlib import Path

import yaml

from benchmarks.bench_common import Spread
from benchmarks.train_overhead import Flags
from benchmarks.train_setup import HYBRID_TERMS, cached_dims, met, warm_interleave, write_config


def test_warm_interleave_runs_each_variant_once_untimed_first(tmp_path):
    calls: list[str] = []
    figures = {"a": iter([9.0, 1.0, 2.0]), "b": iter([9.0, 3.0, 4.0])}  # 9.0: the cold first run of each

    def run(name):
        def go():
            calls.append(name)
            return next(figures[name])

        return go

    warm = tmp_path / "features.h5"
    warm.write_bytes(b"x" * 1000)
    r = warm_interleave({"a": run("a"), "b": run("b")}, 2, "t", (warm,))
    assert calls == ["a", "b", "a", "b", "a", "b"]
    assert r.samples == {"a": [1.0, 2.0], "b": [3.0, 4.0]}  # the warm-up figures are not among them
    assert r.ratio("b", "a") == Spread(median=2.5, lo=2.0, hi=3.0, n=2)


def test_met_says_whether_the_median_and_the_whole_range_meet_the_goal():
    assert met(Spread(1.00, 0.96, 1.04, 7), 1.05, below=True) == "yes (every repeat)"
    assert met(Spread(1.00, 0.96, 1.15, 7), 1.05, below=True) == "yes (median)"
    assert met(Spread(1.08, 1.03, 1.14, 7), 1.05, below=True) == "no"
    assert met(Spread(1.18, 1.11, 1.32, 7), 1.1, below=False) == "yes (every repeat)"
    assert met(Spread(1.08, 1.02, 1.32, 7), 1.1, below=False) == "no"


def test_cached_dims_are_nine_realistic_sizes_cycled_beyond():
    assert cached_dims(9) == [512, 512, 768, 768, 512, 1152, 512, 768, 512]
    assert cached_dims(3) == [512, 512, 768]
    assert cached_dims(11)[9:] == [512, 512]


def test_write_config_keeps_the_shipped_hybrid_terms_or_replaces_them(tmp_path):
    corpus, features = tmp_path / "corpus.csv", tmp_path / "features.h5"
    shipped = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "tiny-hybrid.yaml").read_text())
    for name, terms in HYBRID_TERMS.items():
        cfg = yaml.safe_load(write_config(tmp_path, Flags(), "hybrid", corpus, features, name, terms).read_text())
        assert cfg["mode"] == "hybrid"
        assert cfg["loss"]["terms"] == (terms if terms is not None else shipped["loss"]["terms"])
        assert cfg["data"]["features"] == str(features) and cfg["data"]["batch_size"] == Flags().batch_size
        assert cfg["train"]["output_dir"] == str(tmp_path / f"run-{name}")
    kinds = [t["kind"] for t in HYBRID_TERMS["hybrid_ficl"]]
    assert kinds == ["infonce", "feature", "icl"]
    c = yaml.safe_load(write_config(tmp_path, Flags(), "contrastive", corpus, None).read_text())
    assert c["mode"] == "contrastive" and c["data"]["features"] is None
