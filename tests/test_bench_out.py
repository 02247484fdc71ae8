"""Benchmark runs write to their own folder (--out, else $BIOMED_DISTILL_BENCH_OUT, else bench-out/), never over
the committed figures in benchmarks/results/ unless --record; a harness's shared-workdir files are replaced whole."""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from benchmarks import bench_common, input_pipeline, mt_setup, multi_teacher
from benchmarks.bench_common import (
    DEFAULT_OUT,
    OUT_ENV,
    RECORDED_DIR,
    Output,
    atomic_write_text,
    output_dir,
    parse_flags,
    write_results,
)
from cache.sources.synthetic import make_synthetic_corpus

ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Probe(Output):
    n: int = 1  # a flag of the probe's own


def recorded_files() -> dict[str, float]:
    return {p.name: p.stat().st_mtime for p in RECORDED_DIR.iterdir()}


def test_results_land_in_out_or_the_environments_folder_or_bench_out(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(OUT_ENV, raising=False)
    monkeypatch.setattr(
        bench_common,
        "machine",
        lambda: {"date": "2026-12-07", "cpu": "c", "cores": 2, "torch_threads": 1, "gpu": None, "load_avg_1m": 1.0},
    )
    before = recorded_files()
    j, m = write_results("probe", parse_flags(Probe, []), {"x": 1}, "| a |")
    assert (j.resolve(), m.resolve()) == (
        (tmp_path / DEFAULT_OUT / "probe.json").resolve(),
        (tmp_path / DEFAULT_OUT / "probe.md").resolve(),
    )
    payload = json.loads(j.read_text())
    assert payload["results"] == {"x": 1} and payload["flags"] == {"out": "", "record": False, "n": 1}
    monkeypatch.setenv(OUT_ENV, str(tmp_path / "env"))
    assert write_results("probe", Probe(), {}, "")[0] == tmp_path / "env" / "probe.json"
    j, _ = write_results("probe", parse_flags(Probe, ["--out", str(tmp_path / "given"), "--n", "2"]), {}, "")
    assert j == tmp_path / "given" / "probe.json"  # --out before the environment
    assert recorded_files() == before  # the committed figures: untouched


def test_only_record_writes_the_committed_figures():
    assert output_dir(Probe(record=True), env={}) == RECORDED_DIR
    with pytest.raises(SystemExit, match="pass --record"):  # asked for by the environment alone: refused
        output_dir(Probe(), env={OUT_ENV: str(RECORDED_DIR)})
    with pytest.raises(SystemExit, match="pass --record"):
        parse_flags(Probe, ["--out", str(ROOT / "benchmarks" / "results")])  # refused before any measuring
    with pytest.raises(SystemExit, match="not both"):
        parse_flags(Probe, ["--record", "--out", "elsewhere"])


def test_help_lists_the_output_flags_with_their_comments(capsys):
    with pytest.raises(SystemExit):
        parse_flags(Probe, ["--help"])
    text = capsys.readouterr().out
    assert "--out" in text and "bench-out" in text and "--record" in text and "benchmarks/results/" in text
    assert "a flag of the probe's own" in text


def test_quick_benchmark_writes_nothing_under_results(tmp_path, monkeypatch):
    """input_pipeline's quick mode at a reduced size, run from the project folder without --out."""
    monkeypatch.chdir(ROOT)  # where `bench-out/` would sit beside benchmarks/results/
    monkeypatch.setenv(OUT_ENV, str(tmp_path / "bench-out"))  # keep the checkout clean: its default folder here
    before = recorded_files()
    input_pipeline.main(
        [
            "--quick",
            "--images",
            "4",
            "--image-px",
            "64",
            "--repeats",
            "1",
            "--rows",
            "20000",
            "--ranks",
            "2",
            "--workers",
            "2",
        ]
    )
    assert (tmp_path / "bench-out" / "input_pipeline.json").is_file()
    assert recorded_files() == before


def test_atomic_write_replaces_the_file_whole(tmp_path, monkeypatch):
    target = tmp_path / "task.yaml"
    target.write_text("old: 1\n")
    seen = []
    real_replace = os.replace

    def replace(src, dst):  # at the rename: the new text is complete beside the target, which is still the old one
        seen.append((Path(src).parent, Path(src).read_text(), Path(dst).read_text()))
        real_replace(src, dst)

    monkeypatch.setattr(bench_common.os, "replace", replace)
    atomic_write_text(target, "new: 2\n")
    assert seen == [(tmp_path, "new: 2\n", "old: 1\n")] and target.read_text() == "new: 2\n"
    monkeypatch.setattr(bench_common.os, "replace", lambda src, dst: (_ for _ in ()).throw(OSError("disk")))
    with pytest.raises(OSError):
        atomic_write_text(target, "newer: 3\n")
    assert target.read_text() == "new: 2\n" and sorted(p.name for p in tmp_path.iterdir()) == ["task.yaml"]


def test_a_reader_never_sees_an_empty_task_file_while_another_harness_writes_it(tmp_path):
    """Two harnesses on one --workdir: one rewrites a task file while the other loads it (the race that gave "a task
    file must be a YAML mapping, got NoneType" with a plain write_text)."""
    path = tmp_path / "task.yaml"
    text = yaml.safe_dump({"name": "t", "kind": "zeroshot", "classes": [f"class {i}" for i in range(200)]})
    atomic_write_text(path, text)
    stop, bad = threading.Event(), []

    def writer():
        while not stop.is_set():
            atomic_write_text(path, text)

    t = threading.Thread(target=writer)
    t.start()
    try:
        for _ in range(300):
            loaded = yaml.safe_load(path.read_text())
            if not isinstance(loaded, dict):
                bad.append(loaded)
    finally:
        stop.set()
        t.join()
    assert bad == []


def test_the_harness_writes_its_task_files_whole(tmp_path, monkeypatch):
    written = []

    def spy(path, text):
        written.append(Path(path).name)
        return atomic_write_text(path, text)

    monkeypatch.setattr(multi_teacher, "atomic_write_text", spy)
    breast = mt_setup.BUILTIN_DOMAINS["breast_us"]  # its task files are written; no data is read
    files = multi_teacher.write_tasks([breast], {"dev-breast_us": tmp_path / "dev.csv"}, (), tmp_path / "work")
    assert (
        written
        == [Path(p).name for p in files.test + files.dev]
        == ["breast_us-zeroshot.yaml", "breast_us-zeroshot-dev.yaml"]
    )
    assert sorted(p.name for p in (tmp_path / "work" / "tasks").iterdir()) == sorted(written)  # no temporaries


def test_the_harness_tokenizer_lands_whole_over_a_half_written_folder(tmp_path):
    """The shared vocabulary is saved beside its folder and renamed into place; a folder an interrupted run left
    without tokenizer.json is replaced, and no temporary folder stays behind."""
    corpus = make_synthetic_corpus(tmp_path / "corpus", n=16, image_size=16, seed=0)
    budget = SimpleNamespace(vocab_size=200)
    (tmp_path / "work").mkdir()
    out = multi_teacher.build_tokenizer(corpus, budget, tmp_path / "work")
    (out / "tokenizer.json").unlink()  # what an interrupted save leaves
    assert multi_teacher.build_tokenizer(corpus, budget, tmp_path / "work") == out
    assert (out / "tokenizer.json").is_file() and [p.name for p in (tmp_path / "work").iterdir()] == [out.name]
