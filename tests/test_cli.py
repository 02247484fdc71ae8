"""The `distill` command line: every subcommand is wired, documented, and fails with a clear message."""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from corpus_helpers import copy_corpus
from transformers import AutoTokenizer

import cache.build.run
from cache import FeatureReader, open_corpus
from distill.cli import build_parser, main
from teachers import load_teacher

SUBCOMMANDS = ["cache", "info", "train", "export", "eval", "corpus", "tokenizer", "demo"]


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert name in out
    assert "hf-clip:" in out and "py:module:function" in out


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_each_subcommand_has_help(sub, capsys):
    with pytest.raises(SystemExit) as e:
        main([sub, "--help"])
    assert e.value.code == 0
    assert f"distill {sub}" in capsys.readouterr().out


def test_cache_flags_map_to_design_names():
    args = build_parser().parse_args(
        [
            "cache",
            "--data",
            "c.csv",
            "--teacher",
            "a=plip",
            "--teacher",
            "b=local-dir:/x",
            "--out",
            "f.h5",
            "--views",
            "3",
            "--dtype",
            "float32",
        ]
    )
    assert args.teacher == [("a", "plip"), ("b", "local-dir:/x")]
    assert (args.views, args.dtype, args.batch_size, args.on_bad_sample) == (3, "float32", "auto", "skip")


def test_bad_name_spec_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        main(["cache", "--data", "c.csv", "--teacher", "plip", "--out", "f.h5"])
    assert e.value.code == 2
    assert "expected NAME=SPEC" in capsys.readouterr().err


def test_list_teachers(capsys):
    assert main(["info", "--list-teachers"]) == 0
    out = capsys.readouterr().out
    assert "biomedclip" in out and "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224" in out
    assert "pubmedclip" in out and "hf-clip:flaviagiammarino/pubmed-clip-vit-base-patch32" in out


def test_missing_corpus_is_a_clear_error(tmp_path, capsys):
    code = main(
        ["tokenizer", "--data", str(tmp_path / "nope.csv"), "--vocab-size", "100", "--out", str(tmp_path / "tok")]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "distill tokenizer: error" in err and "nope.csv" in err


def test_tokenizer_command_trains_a_loadable_vocab(tiny_corpus, tmp_path, capsys):
    out = tmp_path / "tok"
    assert (
        main(
            [
                "tokenizer",
                "--data",
                str(tiny_corpus),
                "--vocab-size",
                "5000",
                "--out",
                str(out),
                "--context-length",
                "32",
            ]
        )
        == 0
    )
    tok = AutoTokenizer.from_pretrained(str(out))
    # the printed size is the real one, with the reason it is below the request
    assert f"wrote a {len(tok)}-token WordPiece tokenizer (asked for 5000" in capsys.readouterr().out
    out = tmp_path / "tok120"
    assert (
        main(
            [
                "tokenizer",
                "--data",
                str(tiny_corpus),
                "--vocab-size",
                "120",
                "--out",
                str(out),
                "--context-length",
                "32",
            ]
        )
        == 0
    )
    tok = AutoTokenizer.from_pretrained(str(out))
    assert 40 < len(tok) <= 120
    ids = tok("ct image of a red circle in the centre")["input_ids"]
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    assert tok.unk_token_id not in ids  # every corpus word is in the vocabulary
    assert tok.model_max_length == 32


def test_cache_then_info_through_the_cli(tiny_corpus, tiny_teachers, tmp_path, capsys):
    out = tmp_path / "f.h5"
    assert (
        main(
            [
                "cache",
                "--data",
                str(tiny_corpus),
                "--teacher",
                f"oc={tiny_teachers['oc']}",
                "--out",
                str(out),
                "--batch-size",
                "16",
                "--num-workers",
                "0",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    with h5py.File(out, "r") as f:
        assert f["teachers/oc/image"].shape == (32, 24)
        assert np.all(f["teachers/oc/done"][:])
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "oc" in text and "24" in text and "32" in text and tiny_teachers["oc"] in text


def test_train_module_entry_point_parses_like_the_cli(tmp_path):
    """`python -m distill.train` (what accelerate launch runs) rejects a missing config with a clear error."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "distill.train", "--config", str(tmp_path / "missing.yaml")],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).resolve().parents[1],
        timeout=120,
    )
    assert r.returncode != 0
    assert "missing.yaml" in r.stderr


# -- distill cache / distill info through the CLI: refusals, progress, summary, info, views ----------------
def _cache_argv(data, out, *teachers, extra=()) -> list[str]:
    argv = [
        "cache",
        "--data",
        str(data),
        "--out",
        str(out),
        "--batch-size",
        "8",
        "--num-workers",
        "0",
        "--device",
        "cpu",
        *extra,
    ]
    for t in teachers:
        argv += ["--teacher", t]
    return argv


def _sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_cache_refusals_exit_2_with_a_message_and_leave_the_file(tiny_corpus, tiny_teachers, tmp_path, capsys):
    out = tmp_path / "f.h5"
    oc, hf = f"oc={tiny_teachers['oc']}", f"hf={tiny_teachers['hf']}"
    assert main(_cache_argv(tiny_corpus, out, oc)) == 0
    sha = _sha(out)
    other = copy_corpus(tiny_corpus, tmp_path / "other" / "c.csv", lambda rows: rows[0].update(caption="new"))
    bad = copy_corpus(tiny_corpus, tmp_path / "bad" / "c.csv", lambda rows: rows[4].update(image="/no/such.png"))
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    cases = [
        (_cache_argv(other, out, oc), "was built from another corpus"),
        (_cache_argv(tiny_corpus, out, f"oc={tiny_teachers['hf']}"), "teacher 'oc' already exists with spec"),
        (_cache_argv(tiny_corpus, out, oc, extra=["--views", "2"]), "views=0, this run asks views=2"),
        (_cache_argv(tiny_corpus, out, oc, extra=["--dtype", "float32"]), "stored as float16, this run asks float32"),
        (_cache_argv(tiny_corpus, out, "x=hf-hub:nobody/nothing"), "cannot load teacher SPEC 'hf-hub:nobody/nothing'"),
        (
            _cache_argv(bad, tmp_path / "g.h5", oc, extra=["--on-bad-sample", "fail"]),
            r"c\.csv row 5 \(line 6\).*missing image file",
        ),
        (_cache_argv(tiny_corpus, out, hf), rf"being written by another process \(pid {holder.pid}\)"),
    ]
    try:
        for argv, message in cases:
            if "another process" in message:
                Path(f"{out}.lock").write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname()}))
            capsys.readouterr()
            assert main(argv) == 2, message
            err = capsys.readouterr().err
            assert re.search(r"(?m)^distill cache: error: .*" + message, err), err
            assert "Traceback" not in err
            assert _sha(out) == sha, f"{message}: the file changed"
    finally:
        holder.kill()
        holder.wait()
    assert not (tmp_path / "f.h5.parts").exists()


def test_cache_shows_rates_and_summarises_bad_samples(tiny_corpus, tiny_teachers, tmp_path, capsys):
    def edit(rows):
        rows[2]["image"] = "/no/such.png"
        rows[6]["caption"] = ""

    data = copy_corpus(tiny_corpus, tmp_path / "c" / "corpus.csv", edit)
    keys = [ln.split(",")[-1] for ln in data.read_text().splitlines()[1:]]
    out = tmp_path / "f.h5"
    assert main(_cache_argv(data, out, f"oc={tiny_teachers['oc']}", f"hf={tiny_teachers['hf']}")) == 0
    cap = capsys.readouterr()
    # one bar per teacher with its samples per second, both advanced by one decoding pass (each image decoded
    # once for both teachers); the 2 bad samples are counted by the bars, embedded by neither
    for name in ("oc", "hf"):
        assert re.search(rf"cache {name}: 100%.*32/32 \[[^\]]*sample/s\]", cap.err), cap.err
    assert f"feature cache {out}: 32 rows" in cap.out
    assert "oc: computed 30, done 30/32, skipped 2" in cap.out and "hf: computed 30, done 30/32, skipped 2" in cap.out
    assert "2 bad sample(s) skipped (recorded in /bad)" in cap.out
    assert re.search(rf"{keys[2]}: missing image file.*such\.png", cap.out) and f"{keys[6]}: empty caption" in cap.out


def test_info_on_views_bad_samples_and_an_incomplete_teacher(tiny_corpus, tiny_teachers, tmp_path, capsys):
    data = copy_corpus(tiny_corpus, tmp_path / "c" / "corpus.csv", lambda rows: rows[9].update(caption=" "))
    out = tmp_path / "f.h5"
    # hf stops at the empty caption (row 9): chunks of 4 before it are kept, the teacher is incomplete
    assert (
        main(
            _cache_argv(data, out, f"hf={tiny_teachers['hf']}", extra=["--on-bad-sample", "fail", "--chunk-rows", "4"])
        )
        == 2
    )
    assert main(_cache_argv(data, out, f"oc={tiny_teachers['oc']}", extra=["--views", "2", "--seed", "3"])) == 0
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    keys = open_corpus(data).keys
    assert "biomed-distill-features version 2" in text and "rows: 32" in text
    size = float(re.search(r"size on disk: ([\d.]+) KiB", text).group(1))
    segments = [f.stat() for f in Path(f"{out}.segments").iterdir()]  # format 2: the features live there (sparse)
    on_disk = os.path.getsize(out) + sum(min(st.st_size, st.st_blocks * 512) for st in segments)
    assert abs(size - on_disk / 1024) <= 0.05 and "segment file(s) in f.h5.segments/" in text
    assert f"keys: {keys[0]}, {keys[1]}, {keys[2]}, ..., {keys[31]}" in text
    assert "views: 2 per image (seed 3)" in text
    assert "bad samples: 1" in text and f"{keys[9]}: empty caption" in text
    assert f"hf: {tiny_teachers['hf']}" in text and f"oc: {tiny_teachers['oc']}" in text
    assert "dim 40, views 0, dtype float16, done 8/32, skipped 1, incomplete, stats no" in text
    assert "dim 24, views 2, dtype float16, done 31/32, skipped 1, complete, stats yes" in text

    # the --views cache read for training: one view index per row, the view the teacher embedded
    reader = FeatureReader(str(out), teachers=["oc"])
    np.testing.assert_array_equal(reader.usable_rows(), [r for r in range(32) if r != 9])
    rows, views = np.array([12, 3, 12]), np.array([1, 0, 0])
    got = reader.read(rows, views=views)["oc"]["image"]
    params = reader.view_params(rows)
    assert got.shape == (3, 24) and params.shape == (3, 2, 5)
    t = load_teacher(tiny_teachers["oc"])
    corpus = open_corpus(data)
    for i, (r, v) in enumerate(zip(rows, views)):
        want = t.encode_image(t.view_transform(corpus.load_image(int(r)), params[i, v])[None])[0].numpy()
        np.testing.assert_allclose(got[i], want, atol=2e-3)
    assert np.abs(got[0] - got[2]).max() > 1e-3  # same row, other view: other embedding


def test_ctrl_c_says_how_to_resume(monkeypatch, tmp_path, capsys):
    def interrupted(job):
        raise KeyboardInterrupt

    monkeypatch.setattr(cache.build.run, "build_cache", interrupted)
    code = main(["cache", "--data", "c.csv", "--teacher", "a=plip", "--out", str(tmp_path / "f.h5")])
    assert code == 130
    assert (
        "distill cache: interrupted; committed rows are kept; rerun the same command to resume"
        in capsys.readouterr().err
    )


def test_distill_train_prints_its_result(tiny_corpus, tmp_path, capsys):
    """`distill train` ends with the run's summary (output dir, step, losses, checkpoint) as JSON."""
    cfg = Path(__file__).resolve().parents[1] / "configs" / "tiny-contrastive.yaml"
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--config",
                str(cfg),
                f"data.corpus={tiny_corpus}",
                f"train.output_dir={out}",
                "train.max_steps=2",
                "student.vocab_size=200",
            ]
        )
        == 0
    )
    last = capsys.readouterr().out.strip().splitlines()[-1]
    result = json.loads(last)
    assert result["step"] == 2 and result["output_dir"] == str(out) and "infonce" in result["losses"]
    assert result["checkpoint"].endswith("checkpoint-2")


@pytest.mark.parametrize("verbose", [False, True])
def test_library_info_lines_only_with_verbose(verbose):
    """Our INFO lines (what a run decided) always show, on stdout (stderr is for warnings and the one error line);
    libraries' INFO lines (open_clip logs to the root logger) only with -v, which shows DEBUG too, on stderr."""
    code = (
        "import logging; from distill.logs import setup_logging; "
        f"setup_logging({verbose}); logging.info('root-lib'); logging.getLogger('accelerate.x').info('acc'); "
        "logging.getLogger('distill.train').info('ours'); logging.getLogger('cache.x').debug('dbg'); "
        "logging.getLogger('cache.x').warning('warned')"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        check=True,
    )
    words = ("root-lib", "acc", "ours", "dbg", "warned")
    on_out, on_err = {w for w in words if w in done.stdout}, {w for w in words if w in done.stderr}
    if verbose:
        assert (on_out, on_err) == (set(), set(words)), done
    else:
        assert (on_out, on_err) == ({"ours"}, {"warned"}), done
