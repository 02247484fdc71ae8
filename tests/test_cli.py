"""The `distill` command line: every subcommand is wired, documented, and fails with a clear message."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from distill.cli import build_parser, main

SUBCOMMANDS = ["cache", "info", "train", "export", "eval", "tokenizer", "demo"]


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
    args = build_parser().parse_args(["cache", "--data", "c.csv", "--teacher", "a=plip", "--teacher",
                                      "b=local-dir:/x", "--out", "f.h5", "--views", "3", "--dtype", "float32"])
    assert args.teacher == [("a", "plip"), ("b", "local-dir:/x")]
    assert (args.views, args.dtype, args.batch_size, args.on_bad_sample) == (3, "float32", 64, "skip")


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
    code = main(["tokenizer", "--data", str(tmp_path / "nope.csv"), "--vocab-size", "100",
                 "--out", str(tmp_path / "tok")])
    assert code == 2
    err = capsys.readouterr().err
    assert "distill tokenizer: error" in err and "nope.csv" in err


def test_tokenizer_command_trains_a_loadable_vocab(tiny_corpus, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "tok"
    assert main(["tokenizer", "--data", str(tiny_corpus), "--vocab-size", "120", "--out", str(out),
                 "--context-length", "32"]) == 0
    tok = AutoTokenizer.from_pretrained(str(out))
    assert 40 < len(tok) <= 120
    ids = tok("ct image of a red circle in the centre")["input_ids"]
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    assert tok.unk_token_id not in ids  # every corpus word is in the vocabulary
    assert tok.model_max_length == 32


def test_cache_then_info_through_the_cli(tiny_corpus, tiny_teachers, tmp_path, capsys):
    out = tmp_path / "f.h5"
    assert main(["cache", "--data", str(tiny_corpus), "--teacher", f"oc={tiny_teachers['oc']}",
                 "--out", str(out), "--batch-size", "16", "--num-workers", "0", "--device", "cpu"]) == 0
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
    r = subprocess.run([sys.executable, "-m", "distill.train", "--config", str(tmp_path / "missing.yaml")],
                       capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert r.returncode != 0
    assert "missing.yaml" in r.stderr
