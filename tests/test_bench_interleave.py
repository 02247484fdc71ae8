"""benchmarks/bench_common.interleave: variants run A B A B ..., ratios are taken within each repeat."""

from __future__ import annotations

from benchmarks.bench_common import Spread, interleave


def test_interleave_runs_variants_in_turn_and_pairs_ratios_by_repeat():
    calls: list[str] = []
    figures = {"a": iter([1.0, 2.0, 4.0]), "b": iter([3.0, 4.0, 4.0])}

    def run(name):
        def go():
            calls.append(name)
            return next(figures[name])

        return go

    r = interleave({"a": run("a"), "b": run("b")}, repeats=3)
    assert calls == ["a", "b", "a", "b", "a", "b"]
    assert r.samples == {"a": [1.0, 2.0, 4.0], "b": [3.0, 4.0, 4.0]}
    assert len(r.load) == 4  # before each repeat, and after the last
    # per repeat 3, 2, 1: median 2 (a ratio of medians would say 4 / 2 = 2 too, but min/max only exist per repeat)
    assert r.ratio("b", "a") == Spread(median=2.0, lo=1.0, hi=3.0, n=3)
    assert r.stats("a") == Spread(median=2.0, lo=1.0, hi=4.0, n=3)
    assert r.ratio("b", "a").text(2) == "2.00 [1.00, 3.00]"
