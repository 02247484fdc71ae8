"""A full disk while `distill cache` or `distill export` writes: one line, exit 1, no crash, nothing half-written.

Two ways to fill a disk without root: h5py's own error raised at the point the attack hit (a RuntimeError
"Can't decrement id ref count (... errno = 28 ...)" closing the views side file), and a real one, in a child
process, from the file-size limit (RLIMIT_FSIZE: every write past it fails with EFBIG inside HDF5, as ENOSPC does
on a full disk; before the fix that process segfaulted, exit 139).
"""

from __future__ import annotations

import csv
import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import pytest
import safetensors
import safetensors.torch
from test_cli_errors import cache_argv, make_run_folder, one_error_line

from distill.cli import main
from distill.errors import BAD_INPUT, ENVIRONMENT, describe

ROOT = Path(__file__).resolve().parents[1]
ENOSPC_TEXT = (
    "Can't decrement id ref count (file write failed: time = Mon Dec  7 10:00:00 2026, filename = "
    "'{name}', file descriptor = 7, errno = 28, error message = 'No space left on device', buf = "
    "0x55d0c, total write size = 4096, bytes this sub-write = 4096, bytes actually written = "
    "18446744073709551615, offset = 8192)"
)


def leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.name.startswith((".tmp-", ".old-")))


# -- 1. the views side file: h5py's RuntimeError carrying errno 28 ----------------------------------------------
def test_views_file_on_a_full_disk_as_h5py_reports_it(tiny_corpus, tiny_teachers, tmp_path, capsys, monkeypatch):
    real = h5py.File

    class FullOnClose(real):
        def close(self):
            name = str(getattr(self, "_target", ""))
            super().close()
            if "-views.h5" in name:
                raise RuntimeError(ENOSPC_TEXT.format(name=name))

    def file(target, *a, **k):
        f = FullOnClose(target, *a, **k)
        f._target = getattr(target, "name", target)
        return f

    monkeypatch.setattr(h5py, "File", file)
    out = tmp_path / "f.h5"
    assert main(cache_argv(tiny_corpus, tiny_teachers["oc"], out, "--views", "2")) == ENVIRONMENT
    line = one_error_line(capsys, "cache")
    assert "no space left on device writing" in line and "-views.h5" in line and "free space" in line
    assert leftovers(tmp_path) == []
    monkeypatch.setattr(h5py, "File", real)
    assert main(cache_argv(tiny_corpus, tiny_teachers["oc"], out, "--views", "2")) == 0
    with real(out, "r") as f:
        assert f["teachers/oc/done"][:].all() and f["views/params"].shape == (32, 2, 5)


@pytest.mark.parametrize(
    "text,code,words",
    [
        (ENOSPC_TEXT.format(name="/d/x.h5"), ENVIRONMENT, "no space left on device writing /d/x.h5"),
        (ENOSPC_TEXT.format(name="/d/x.h5").replace("errno = 28", "errno = 13"), ENVIRONMENT, "permission denied"),
        (ENOSPC_TEXT.format(name="/d/x.h5").replace("errno = 28", "errno = 27"), ENVIRONMENT, "file too large"),
    ],
)
def test_describe_an_hdf5_runtime_error_with_an_errno(text, code, words):
    failure = describe(RuntimeError(text), file="/cmd.h5")
    assert failure.code == code and words in failure.message and "\n" not in failure.message


def test_a_runtime_error_without_errno_is_still_a_bug():
    assert describe(RuntimeError("Can't decrement id ref count (something else)")) is None


# -- 2. a real write failure inside HDF5: no segfault, no temporary --------------------------------------------
def _limited(limit: int):
    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    return preexec


def _child_env() -> dict:
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
    }


LIBRARY_WRITES = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    import cache.store.writer as W
    import cache.store.segments as S
    from cache.store.schema import CacheError
    folder, out = sys.argv[1], {}
    def attempt(what, fn):
        try:
            fn()
            out[what] = "ok"
        except CacheError as e:
            out[what] = str(e)
    big = np.random.default_rng(0).random((4000, 8, 5)).astype(np.float32)  # 640 KB > the limit
    attempt("write_small", lambda: S.write_small(os.path.join(folder, "s/run-000001-views.h5"), "p", big,
                                                 chunks=(256, 8, 5)))
    attempt("create_file", lambda: W.create_file(os.path.join(folder, "f.h5"), [str(i) for i in range(8)], "fp",
                                                 "c.csv"))
    attempt("add_views", lambda: W.add_views(os.path.join(folder, "f.h5"), big, {}))
    json.dump(out, open(os.path.join(folder, "result.json"), "w"))
""")


def test_hdf5_writes_at_the_file_size_limit_raise_one_error_and_leave_no_temporary(tmp_path):
    (tmp_path / "child.py").write_text(LIBRARY_WRITES)
    r = subprocess.run(
        [sys.executable, str(tmp_path / "child.py"), str(tmp_path)],
        env=_child_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=_limited(256 * 1024),
    )
    assert r.returncode == 0, (r.returncode, r.stderr[-3000:])  # -11 / 139 before: HDF5 crashed on close
    got = json.loads((tmp_path / "result.json").read_text())
    assert got["write_small"].startswith(f"file too large writing {tmp_path}/s/run-000001-views.h5")
    assert got["create_file"] == "ok"  # small files under the limit are written as before
    assert got["add_views"].startswith("file too large writing") and "views.h5" in got["add_views"]
    assert leftovers(tmp_path) == []
    assert not (tmp_path / "s" / "run-000001-views.h5").exists()


def test_cache_at_the_file_size_limit_exits_1_without_a_crash(tiny_corpus, tiny_teachers, tmp_path):
    """The attack, for real: `distill cache --views 64` whose views file (46 KB) cannot be written (limit 32 KB)."""
    out = tmp_path / "f.h5"
    argv = [sys.executable, "-m", "distill.cli", *cache_argv(tiny_corpus, tiny_teachers["oc"], out, "--views", "64")]
    r = subprocess.run(
        argv, env=_child_env(), cwd=ROOT, capture_output=True, text=True, timeout=300, preexec_fn=_limited(32 * 1024)
    )
    lines = [line for line in r.stderr.splitlines() if line.strip() and "%|" not in line]
    assert r.returncode == ENVIRONMENT, (r.returncode, r.stderr[-3000:])  # 139 before
    assert "Traceback" not in r.stderr and len(lines) == 1, r.stderr[-3000:]
    assert lines[0].startswith("distill cache: error: file too large writing") and "-views.h5" in lines[0]
    assert leftovers(tmp_path) == []


# -- 3. export onto a full disk: the old folder, or nothing ------------------------------------------------------
def _full_safetensors(monkeypatch, after_bytes: int = 1000):
    """safetensors' save_file on a full disk: part of the file written, then its own error (os error 28)."""

    def save_file(tensors, filename, *a, **k):
        Path(filename).write_bytes(b"\0" * after_bytes)
        raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)


def test_export_onto_a_full_disk_keeps_the_old_folder(export_run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "student"
    assert main(["export", str(export_run), "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _full_safetensors(monkeypatch)
    assert main(["export", str(export_run), "--out", str(out)]) == ENVIRONMENT
    line = one_error_line(capsys, "export")
    assert f"no space left on device writing {out / 'open_clip_model.safetensors'}" in line and "free space" in line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert leftovers(tmp_path) == []


def test_export_onto_a_full_disk_leaves_nothing(export_run, tmp_path, capsys, monkeypatch):
    _full_safetensors(monkeypatch)
    out = tmp_path / "new" / "student"
    assert main(["export", str(export_run), "--out", str(out)]) == ENVIRONMENT
    assert "no space left on device" in one_error_line(capsys, "export")
    assert not out.exists() and leftovers(tmp_path) == []


def test_export_names_no_path_of_this_machine_but_the_text_config(export_run, tmp_path):
    """Only open_clip_config.json's text-tower name holds a path (the folder's own, which stock open_clip needs to
    load from any working directory); nothing names the run or any other path of this machine."""
    out = tmp_path / "student"
    assert main(["export", str(export_run), "--out", str(out)]) == 0
    cfg = json.loads((out / "open_clip_config.json").read_text())
    text = cfg["model_cfg"]["text_cfg"]
    assert text["hf_model_name"] == str(out.resolve()) == text["hf_tokenizer_name"]
    text["hf_model_name"] = text["hf_tokenizer_name"] = "."
    (out / "open_clip_config.json").write_text(json.dumps(cfg))
    for p in out.iterdir():  # configs, tokenizer files, the model card, the weights' metadata
        data = p.read_bytes()
        assert str(tmp_path).encode() not in data and str(export_run).encode() not in data, p.name


@pytest.fixture(scope="module")
def export_run(tiny_corpus, tmp_path_factory) -> Path:
    """A run folder as training leaves it: student/ and checkpoint-1/model.safetensors."""
    return make_run_folder(tiny_corpus, tmp_path_factory.mktemp("run"))


# -- 4. a refused teacher leaves nothing; a corpus of missing images is an error -----------------------------
def test_a_teacher_that_does_not_load_leaves_no_empty_cache(tiny_corpus, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "open_clip_config.json").write_text("{}")
    out = tmp_path / "f.h5"
    code = main(cache_argv(tiny_corpus, f"local-dir:{broken}", out))
    assert code == BAD_INPUT, capsys.readouterr().err
    one_error_line(capsys, "cache")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]  # no f.h5, f.h5.segments/ or lock


def _corpus_with_missing(tiny_corpus: Path, tmp_path: Path, missing: int) -> Path:
    """The tiny corpus with its first `missing` rows pointing at images that do not exist."""
    with open(tiny_corpus, newline="") as f:
        rows = list(csv.DictReader(f))
    for i, row in enumerate(rows):
        row["image"] = str(tiny_corpus.parent / row["image"]) if i >= missing else f"gone/{i}.png"
    path = tmp_path / "corpus.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def test_a_corpus_whose_images_are_all_missing_is_an_error(tiny_corpus, tiny_teachers, tmp_path, capsys):
    corpus = _corpus_with_missing(tiny_corpus, tmp_path, 32)
    out = tmp_path / "f.h5"
    assert main(cache_argv(corpus, tiny_teachers["oc"], out)) == BAD_INPUT  # was exit 0, "done 0/32, skipped 32"
    line = one_error_line(capsys, "cache")
    assert f"{out}: every row is bad samples; commonest reason (32 rows): missing image file " in line
    assert "check the image paths" in line and "--retry-bad" in line
    with h5py.File(out, "r") as f:  # what was learnt is kept: the bad records
        assert len(f["bad/rows"]) == 32
    # every row bad is an error whatever the bound
    assert main(cache_argv(corpus, tiny_teachers["oc"], out, "--max-bad-fraction", "1", "--retry-bad")) == BAD_INPUT
    assert "every row is bad samples" in one_error_line(capsys, "cache")


def test_more_bad_rows_than_max_bad_fraction_is_an_error(tiny_corpus, tiny_teachers, tmp_path, capsys):
    corpus = _corpus_with_missing(tiny_corpus, tmp_path, 20)
    out = tmp_path / "f.h5"
    assert main(cache_argv(corpus, tiny_teachers["oc"], out)) == BAD_INPUT  # 20/32 > the default 0.5
    line = one_error_line(capsys, "cache")
    assert "20 of 32 rows (62%) are bad samples, more than --max-bad-fraction 0.5" in line
    with h5py.File(out, "r") as f:  # the 12 good rows were embedded and kept
        assert int(f["teachers/oc/done"][:].sum()) == 12
    assert main(cache_argv(corpus, tiny_teachers["oc"], out, "--max-bad-fraction", "0.7")) == 0
    capsys.readouterr()
    assert main(cache_argv(corpus, tiny_teachers["oc"], out, "--max-bad-fraction", "1.5")) == BAD_INPUT
    assert "--max-bad-fraction 1.5: use a share between 0 and 1" in one_error_line(capsys, "cache")


def test_info_lists_three_bad_samples_or_all(tiny_corpus, tiny_teachers, tmp_path, capsys):
    corpus = _corpus_with_missing(tiny_corpus, tmp_path, 5)
    out = tmp_path / "f.h5"
    assert main(cache_argv(corpus, tiny_teachers["oc"], out)) == 0
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.count("missing image file") == 3 and f"... 2 more: `distill info --all-bad {out}`" in text
    assert main(["info", "--all-bad", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.count("missing image file") == 5 and "more:" not in text
