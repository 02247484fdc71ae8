"""benchmarks/scale_sim.py at a reduced size (150k rows, ~0.7 GB): its JSON has the figures issue 12 names, and the
merge stays within the issue's bounds (at most 10% of the write time, 10% of the final size in extra disk) because
it copies no feature byte. The written cache is then a valid one. Not a speed test: the ratios have a wide margin."""

from __future__ import annotations

import json

import h5py

import cache.store.layout as L
from benchmarks import scale_sim
from cache.store.verify import verify


def test_scale_sim_reduced_run_merges_cheaply(tmp_path):
    out, work = tmp_path / "ss.json", tmp_path / "work"
    scale_sim.main(
        [
            "--rows",
            "150000",
            "--dims",
            "256,384,512",
            "--processes",
            "2",
            "--ranks",
            "2",
            "--workers",
            "2",
            "--read-rows",
            "40000",
            "--json",
            str(out),
            "--work",
            str(work),
            "--out",
            str(tmp_path / "res"),
        ]
    )
    got = json.loads(out.read_text())
    for key in (
        "rows",
        "merge_over_write",
        "extra_disk_over_final",
        "read_rows_per_s",
        "merge_over_write_wall",
        "write_rows_per_s",
    ):
        assert key in got, key
    assert got["rows"] == 150000 and got["read_rows_per_s"] > 0
    # the merge copies no feature byte: FEATURES.h5 maps the segments (virtual datasets) and holds only metadata;
    # its time (merge_over_write, a ratio of seconds) moves with the machine's load and is the benchmark's to
    # record (benchmarks/results/scale_sim.json), not a test's to assert
    assert got["merge_over_write"] > 0 and got["extra_disk_over_final"] < 0.1  # the disk bound
    segments = sum(f.stat().st_size for f in (work / "features.h5.segments").rglob("*") if f.is_file())
    assert (work / "features.h5").stat().st_size < 0.01 * segments
    assert got["segment_files"] == 2 and set(got["mappings_per_dataset"].values()) == {1 * 2}  # a range per process
    assert got["read"]["read_per_useful_byte"] < 2  # dealt readers read each chunk about once
    cache = work / "features.h5"
    with h5py.File(cache, "r") as f:
        assert all(f[L.done(n)][:].all() and L.stats(n) in f for n in f[L.TEACHERS])
    assert verify(str(cache), progress=False).ok  # checksums and unit norms of every written row
