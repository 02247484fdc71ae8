"""Every OSError and SafetensorError reaching `distill` becomes one line naming the file and what to do.

Exit 1: the environment (full disk, permission, read-only); exit 2: bad input (a damaged or missing file); exit 3:
a bug (traceback kept). `distill -v` re-raises. All in-process through `distill.cli.main`, on tiny models.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import safetensors.torch
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

import cache.store.segment_writer as SW
import distill.cli
from distill.cli import main
from distill.errors import BAD_INPUT, ENVIRONMENT, describe
from student import build_student
from student.tokenizer import train_wordpiece
from teachers.weights import DamagedWeightsError

as_root = os.geteuid() == 0 if hasattr(os, "geteuid") else False
needs_non_root = pytest.mark.skipif(as_root, reason="permissions do not bite root")
WEIGHTS = "open_clip_model.safetensors"


def one_error_line(capsys, command: str) -> str:
    """The error: one line `distill COMMAND: error: ...`, last on stderr, no traceback (progress bars aside)."""
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "%|" not in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"distill {command}: error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def run(tiny_corpus, tmp_path_factory) -> Path:
    return make_run_folder(tiny_corpus, tmp_path_factory.mktemp("run"))


def make_run_folder(tiny_corpus: Path, root: Path) -> Path:
    """A run folder as training leaves it: student/ (build_student) and checkpoint-1/model.safetensors."""
    with open(tiny_corpus, newline="") as f:
        captions = [row["caption"] for row in csv.DictReader(f)]
    tok = train_wordpiece(captions, root / "tok", vocab_size=200, model_max_length=16)
    torch.manual_seed(0)
    bundle = build_student("tiny", root / "student", tokenizer_dir=tok)
    (root / "checkpoint-1").mkdir()
    save_file(
        {f"student.{k}": v.contiguous() for k, v in bundle.model.state_dict().items()},
        str(root / "checkpoint-1" / "model.safetensors"),
    )
    return root


@pytest.fixture(scope="module")
def export(run) -> Path:
    """The run's student as `distill export` writes it."""
    assert main(["export", str(run), "--out", str(run / "export")]) == 0
    return run / "export"


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> Path:
    """A 4-image retrieval task file."""
    root = tmp_path_factory.mktemp("task")
    (root / "img").mkdir()
    rows = []
    for i in range(4):
        Image.fromarray(np.full((16, 16, 3), 50 * i, np.uint8)).save(root / "img" / f"{i}.png")
        rows.append([f"img/{i}.png", f"a red circle number {i}"])
    with open(root / "data.csv", "w", newline="") as f:
        csv.writer(f).writerows([["image", "caption"], *rows])
    (root / "rt.yaml").write_text(yaml.safe_dump({"name": "rt", "kind": "retrieval", "dataset": {"path": "data.csv"}}))
    return root / "rt.yaml"


def eval_argv(spec: str, task: Path, out: Path) -> list[str]:
    return [
        "eval",
        "--model",
        f"s={spec}",
        "--task",
        str(task),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--bootstrap",
        "5",
    ]


def damaged_copy(src: Path, dst: Path, name: str, data) -> Path:
    shutil.copytree(src, dst)
    f = dst / name
    f.write_bytes(data(f.read_bytes()))
    return f


# -- damaged model folders (eval) --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "how,damage,detail",
    [
        ("truncated", lambda b: b[: len(b) // 2], "incomplete metadata"),
        ("garbage-header", lambda b: b"\xff" * 8 + b[8:], "header too large"),
    ],
)
def test_eval_of_an_export_with_damaged_weights_names_the_file(export, task, tmp_path, capsys, how, damage, detail):
    bad = damaged_copy(export, tmp_path / how, WEIGHTS, damage)
    assert main(eval_argv(f"local-dir:{bad.parent}", task, tmp_path / "r")) == BAD_INPUT
    line = one_error_line(capsys, "eval")
    assert f"{bad} is damaged (truncated or not safetensors" in line and detail in line
    assert "export it again with `distill export`" in line
    assert not (tmp_path / "r").exists()


def test_eval_of_a_folder_without_weights_or_with_a_bad_text_config(export, task, tmp_path, capsys):
    shutil.copytree(export, tmp_path / "now")
    (tmp_path / "now" / WEIGHTS).unlink()
    assert main(eval_argv(f"local-dir:{tmp_path / 'now'}", task, tmp_path / "r")) == BAD_INPUT
    line = one_error_line(capsys, "eval")
    assert f"{tmp_path / 'now' / WEIGHTS} not found" in line and "holds no weights file" in line
    assert "hint: offline" not in line  # a local folder is not a hub model

    bad = damaged_copy(export, tmp_path / "cfg", "config.json", lambda b: b[:20])
    assert main(eval_argv(f"local-dir:{bad.parent}", task, tmp_path / "r")) == BAD_INPUT
    line = one_error_line(capsys, "eval")
    assert f"{bad}: the text tower's config is not valid JSON" in line


def test_eval_of_an_hf_clip_folder_with_truncated_weights(tiny_teachers, task, tmp_path, capsys):
    src = Path(tiny_teachers["hf"].split(":", 1)[1])
    bad = damaged_copy(src, tmp_path / "hf", "model.safetensors", lambda b: b[: len(b) // 3])
    assert main(eval_argv(f"hf-clip:{bad.parent}", task, tmp_path / "r")) == BAD_INPUT
    line = one_error_line(capsys, "eval")
    assert f"{bad} is damaged (truncated or not safetensors" in line


def test_verbose_shows_the_traceback(export, task, tmp_path):
    bad = damaged_copy(export, tmp_path / "t", WEIGHTS, lambda b: b[:100])
    with pytest.raises(DamagedWeightsError) as e:
        main(["-v", *eval_argv(f"local-dir:{bad.parent}", task, tmp_path / "r")])
    assert type(e.value.__cause__).__name__ == "SafetensorError"


def test_damaged_eval_embedding_cache_is_recomputed(export, task, tmp_path, capsys):
    """A cached embedding file cut short (a kill mid-write before it was atomic) is recomputed, not fatal."""
    cache = tmp_path / "emb"
    assert main([*eval_argv(f"local-dir:{export}", task, tmp_path / "r1"), "--cache-dir", str(cache)]) == 0
    (saved,) = cache.glob("*.safetensors")
    saved.write_bytes(saved.read_bytes()[:50])
    assert main([*eval_argv(f"local-dir:{export}", task, tmp_path / "r2"), "--cache-dir", str(cache)]) == 0
    r1, r2 = (json.loads((tmp_path / r / "report.json").read_text())["results"] for r in ("r1", "r2"))
    assert r1 == r2 and len(saved.read_bytes()) > 50 and not list(cache.glob("*.tmp"))


# -- info: unreadable and damaged feature files ------------------------------------------------------------
def small_h5(path: Path) -> Path:
    with h5py.File(path, "w") as f:
        f["x"] = np.zeros((400, 64), np.float32)
    return path


def test_info_on_a_truncated_or_foreign_file_names_it(tmp_path, capsys):
    f = small_h5(tmp_path / "cut.h5")
    f.write_bytes(f.read_bytes()[:4000])
    assert main(["info", str(f)]) == BAD_INPUT
    assert str(f) in one_error_line(capsys, "info")
    g = tmp_path / "notes.h5"
    g.write_text("not hdf5 at all\n" * 100)
    assert main(["info", str(g)]) == BAD_INPUT
    assert str(g) in one_error_line(capsys, "info")
    assert main(["info", str(tmp_path)]) == BAD_INPUT
    assert str(tmp_path) in one_error_line(capsys, "info")


@needs_non_root
def test_info_on_an_unreadable_file(tmp_path, capsys):
    f = small_h5(tmp_path / "locked.h5")
    f.chmod(0)
    try:
        assert main(["info", str(f)]) == ENVIRONMENT
        line = one_error_line(capsys, "info")
    finally:
        f.chmod(0o600)
    assert str(f) in line and "permission denied" in line.lower()


def test_info_permission_denied_as_h5py_reports_it(tmp_path, capsys, monkeypatch):
    """The same, simulated (runs as root too): h5py puts the path only inside its message."""
    f = small_h5(tmp_path / "locked.h5")

    def denied(name, *a, **k):
        raise PermissionError(
            errno.EACCES,
            f"Unable to synchronously open file (unable to open file: name = "
            f"'{name}', errno = 13, error message = 'Permission denied')",
        )

    monkeypatch.setattr(h5py, "File", denied)
    assert main(["info", str(f)]) == ENVIRONMENT
    line = one_error_line(capsys, "info")
    assert str(f) in line and "permission denied" in line.lower() and "damaged" not in line  # the file is fine


# -- cache: read-only folder, full disk ---------------------------------------------------------------------
def cache_argv(corpus, spec, out, *extra) -> list[str]:
    return [
        "cache",
        "--data",
        str(corpus),
        "--teacher",
        f"oc={spec}",
        "--out",
        str(out),
        "--batch-size",
        "8",
        "--num-workers",
        "0",
        "--device",
        "cpu",
        "--chunk-rows",
        "8",
        *extra,
    ]


@needs_non_root
def test_cache_into_a_read_only_folder(tiny_corpus, tiny_teachers, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        code = main(cache_argv(tiny_corpus, tiny_teachers["oc"], ro / "f.h5"))
        line = one_error_line(capsys, "cache")
    finally:
        ro.chmod(0o700)
    assert code == ENVIRONMENT and str(ro) in line and "permission denied" in line.lower()
    assert list(ro.iterdir()) == []


def test_cache_full_disk_keeps_committed_rows_and_resumes(tiny_corpus, tiny_teachers, tmp_path, capsys, monkeypatch):
    out = tmp_path / "f.h5"
    real_write, calls = SW._pwrite_all, []

    def write(fd, data, offset):  # the second committed chunk hits a full disk (2 writes a chunk: image, text)
        calls.append(offset)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data, offset)

    monkeypatch.setattr(SW, "_pwrite_all", write)
    assert main(cache_argv(tiny_corpus, tiny_teachers["oc"], out)) == ENVIRONMENT
    line = one_error_line(capsys, "cache")
    assert "no space left on device" in line and str(out) in line and "rerun the same command" in line
    monkeypatch.setattr(SW, "_pwrite_all", real_write)
    assert main(cache_argv(tiny_corpus, tiny_teachers["oc"], out)) == 0
    printed = capsys.readouterr().out
    assert "oc: computed 24, done 32/32" in printed  # the first chunk (8 rows) was kept, not recomputed
    with h5py.File(out, "r") as f:
        assert f["teachers/oc/done"][:].all()


# -- export and corpus: full disk ---------------------------------------------------------------------------
def test_export_full_disk_names_the_weights_file(run, tmp_path, capsys, monkeypatch):
    def full(tensors, filename, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(filename))

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    out = tmp_path / "exp"
    assert main(["export", str(run), "--out", str(out)]) == ENVIRONMENT
    line = one_error_line(capsys, "export")
    assert f"no space left on device writing {out / WEIGHTS}" in line and "free space" in line


def test_corpus_full_disk_names_the_image_and_writes_no_csv(tmp_path, capsys, monkeypatch):
    rng = np.random.default_rng(0)
    npz = tmp_path / "tiny.npz"
    np.savez(
        npz,
        train_images=rng.integers(0, 256, (4, 8, 8), dtype=np.uint8),
        train_labels=np.array([[0], [1], [0], [1]], dtype=np.uint8),
    )
    real_save, calls = Image.Image.save, []

    def save(self, fp, *a, **k):
        calls.append(fp)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(fp))
        return real_save(self, fp, *a, **k)

    monkeypatch.setattr(Image.Image, "save", save)
    out = tmp_path / "out"
    assert main(["corpus", "--source", str(npz), "--template", "class {label}", "--out", str(out)]) == ENVIRONMENT
    line = one_error_line(capsys, "corpus")
    assert f"no space left on device writing {calls[2]}" in line and "rerun the same command" in line
    assert not (out / "corpus.csv").exists()


def test_tokenizer_out_is_an_existing_file(tiny_corpus, tmp_path, capsys):
    out = tmp_path / "taken"
    out.write_text("mine\n")
    assert main(["tokenizer", "--data", str(tiny_corpus), "--vocab-size", "60", "--out", str(out)]) == BAD_INPUT
    assert f"{out} already exists" in one_error_line(capsys, "tokenizer")
    assert out.read_text() == "mine\n"


# -- the classification itself --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "exc,code,words",
    [
        (
            OSError(errno.ENOSPC, "No space left on device", "/d/f.h5"),
            ENVIRONMENT,
            "no space left on device writing /d/f.h5",
        ),
        (
            OSError(errno.EDQUOT, "Disk quota exceeded", "/d/f"),
            ENVIRONMENT,
            "no space left on device (disk quota exceeded)",
        ),
        (OSError(errno.EROFS, "Read-only file system", "/ro/x"), ENVIRONMENT, "read-only file system: /ro/x"),
        (OSError(errno.EMFILE, "Too many open files"), ENVIRONMENT, "ulimit -n"),
        (
            OSError("Can't write data (file write failed: errno = 28, error message = 'No space left on device')"),
            ENVIRONMENT,
            "no space left on device writing /cmd.h5",
        ),
        (RuntimeError("basic_ios::clear: iostream error"), ENVIRONMENT, "the disk is probably full"),
        (OSError("Unable to synchronously open file (truncated file: eof = 96)"), BAD_INPUT, "/cmd.h5 cannot be read"),
        (FileNotFoundError(errno.ENOENT, "No such file or directory", "/a/b.csv"), BAD_INPUT, "/a/b.csv not found"),
        (IsADirectoryError(errno.EISDIR, "Is a directory", "/a"), BAD_INPUT, "/a is a directory"),
        (ValueError("x.csv, line 3: bad\nsecond line"), BAD_INPUT, "x.csv, line 3: bad | second line"),
        (FileExistsError(errno.EEXIST, "File exists", "/out"), BAD_INPUT, "/out already exists"),
        (OSError(errno.EIO, "Input/output error", "/nfs/f.h5"), ENVIRONMENT, "Input/output error: /nfs/f.h5 (EIO)"),
    ],
)
def test_describe(exc, code, words):
    failure = describe(exc, file="/cmd.h5")
    assert failure.code == code and words in failure.message and "\n" not in failure.message


def test_describe_wrapped_disk_error_is_environment():
    """Our own error raised `from` a full disk keeps its message but exits 1."""
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as e:
            raise ValueError("/run/checkpoint-4: could not write: no space left on device") from e
    except ValueError as e:
        assert describe(e).code == ENVIRONMENT


def test_a_bug_keeps_its_traceback_and_says_so(monkeypatch, capsys):
    def boom(args):
        raise ZeroDivisionError("oops")

    monkeypatch.setattr(distill.cli, "cmd_info", boom)
    assert main(["info", "x.h5"]) == 3
    err = capsys.readouterr().err
    assert "Traceback" in err and "ZeroDivisionError: oops" in err
    assert err.strip().splitlines()[-1].startswith("distill info: internal error (ZeroDivisionError)")
