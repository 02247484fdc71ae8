"""Resuming a checkpoint never runs code planted in it, and a damaged checkpoint is named, not a traceback.

Each test plants, in one file of a finished checkpoint, a `torch.save`d object whose `__reduce__` would create a
sentinel file, resumes, and checks that the sentinel is absent: files we never read (accelerate's pickles) leave a
normal resume; files we read are refused with a message naming them. `resume=auto` skips a broken newest
checkpoint with a warning and falls back to the previous good one.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from train_fixtures import load_weights, tiny_config, tiny_tokenizer  # noqa: F401  (fixture)

import distill.train as train_mod
from distill.cli import main
from distill.training.checkpoint import CheckpointError, list_checkpoints
from student.export import export_checkpoint


class Plant:
    """Unpickling this runs a shell command that creates `sentinel`."""

    def __init__(self, sentinel: Path):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return os.system, (f"touch {self.sentinel}",)


def _cfg(corpus, out, tokenizer, steps, resume="auto"):
    return tiny_config(
        corpus,
        out,
        mode="contrastive",
        tokenizer=tokenizer,
        train__max_steps=steps,
        train__checkpoint_every=1,
        train__keep_last=3,
        train__resume=resume,
        train__tensorboard="false",
    )


@pytest.fixture(scope="module")
def base_run(tiny_corpus, tiny_tokenizer, tmp_path_factory) -> Path:
    """A finished 2-step run with checkpoint-1 and checkpoint-2."""
    run = tmp_path_factory.mktemp("safety") / "run"
    train_mod.train(_cfg(tiny_corpus, run, tiny_tokenizer, steps=2))
    return run


@pytest.fixture
def run(base_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(base_run, copy)
    return copy


def test_checkpoint_holds_no_pickle_of_ours(base_run):
    files = sorted(p.name for p in (base_run / "checkpoint-2").iterdir())
    assert files == [
        "model.safetensors",
        "optimizer.bin",
        "rng_state_0.safetensors",
        "scheduler.bin",
        "train_state.json",
    ]
    assert not (base_run / ".lock").exists()


def test_the_plant_really_runs_code_when_unpickled(tmp_path):
    """Guards the tests below: the planted object does create its sentinel when loaded the unsafe way."""
    torch.save(Plant(tmp_path / "ran"), tmp_path / "p.pkl")
    torch.load(tmp_path / "p.pkl", weights_only=False)
    assert (tmp_path / "ran").exists()


@pytest.mark.parametrize("name", ["custom_checkpoint_0.pkl", "random_states_0.pkl"])
def test_accelerate_pickles_are_never_read(run, name, tiny_corpus, tiny_tokenizer, tmp_path, capsys):
    sentinel = tmp_path / "ran"
    torch.save(Plant(sentinel), run / "checkpoint-2" / name)
    capsys.readouterr()
    result = train_mod.train(_cfg(tiny_corpus, run, tiny_tokenizer, steps=3))
    assert f"Resuming from {run / 'checkpoint-2'} at step 2" in capsys.readouterr().out
    assert result["step"] == 3 and not sentinel.exists()


@pytest.mark.parametrize("name", ["optimizer.bin", "scheduler.bin", "rng_state_0.safetensors", "model.safetensors"])
def test_a_planted_file_we_read_is_refused_by_name(run, name, tiny_corpus, tiny_tokenizer, tmp_path):
    sentinel = tmp_path / "ran"
    ckpt = run / "checkpoint-2"
    torch.save(Plant(sentinel), ckpt / name)
    before = load_weights(run / "checkpoint-1")
    with pytest.raises(CheckpointError) as err:  # an explicit path: no fallback
        train_mod.train(_cfg(tiny_corpus, run, tiny_tokenizer, steps=3, resume=str(ckpt)))
    msg = str(err.value)
    assert not sentinel.exists()
    assert str(ckpt / name) in msg and "\n" not in msg
    assert ("refused" in msg) if name.endswith(".bin") else ("not" in msg)
    assert not (run / ".lock").exists()  # released on the error
    assert not (run / "checkpoint-3").exists()
    after = load_weights(run / "checkpoint-1")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_cli_prints_one_line_and_exit_2_for_a_refused_file(run, tiny_corpus, tiny_tokenizer, tmp_path, capsys):
    sentinel = tmp_path / "ran"
    torch.save(Plant(sentinel), run / "checkpoint-2" / "optimizer.bin")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        yaml.safe_dump(_cfg(tiny_corpus, run, tiny_tokenizer, steps=3, resume=str(run / "checkpoint-2")).to_dict())
    )
    capsys.readouterr()
    assert main(["train", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert str(run / "checkpoint-2" / "optimizer.bin") in err[0] and "posix.system" in err[0]
    assert not sentinel.exists()


@pytest.mark.parametrize("damage", ["pickle", "truncated", "missing"])
def test_auto_skips_a_broken_newest_checkpoint(run, damage, tiny_corpus, tiny_tokenizer, tmp_path, caplog, capsys):
    model = run / "checkpoint-2" / "model.safetensors"
    if damage == "pickle":
        torch.save(Plant(tmp_path / "ran"), model)
    elif damage == "truncated":
        model.write_bytes(model.read_bytes()[:100])
    else:
        model.unlink()
    capsys.readouterr()
    with caplog.at_level(logging.WARNING, logger="distill.training.checkpoint"):
        result = train_mod.train(_cfg(tiny_corpus, run, tiny_tokenizer, steps=3))
    assert f"Resuming from {run / 'checkpoint-1'} at step 1" in capsys.readouterr().out
    warning = [r.getMessage() for r in caplog.records if "skipping checkpoint-2" in r.getMessage()]
    assert len(warning) == 1 and "model.safetensors" in warning[0] and "checkpoint-1" in warning[0], warning
    if damage == "missing":
        assert "model.safetensors is missing" in warning[0] and "pytorch_model.bin" not in warning[0]
    assert (run / "checkpoint-2.broken").is_dir()  # kept for inspection, never listed or pruned
    assert result["step"] == 3 and [d.name for d in list_checkpoints(run)] == [
        "checkpoint-1",
        "checkpoint-2",
        "checkpoint-3",
    ]
    assert not (tmp_path / "ran").exists()


def test_missing_model_is_named_on_explicit_resume_and_export(run, tiny_corpus, tiny_tokenizer, tmp_path):
    (run / "checkpoint-2" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"checkpoint-2/model\.safetensors is missing") as err:
        train_mod.train(_cfg(tiny_corpus, run, tiny_tokenizer, steps=3, resume=str(run / "checkpoint-2")))
    assert "pytorch_model.bin" not in str(err.value)
    with pytest.raises(FileNotFoundError, match=r"checkpoint-2/model\.safetensors is missing") as err:
        export_checkpoint(run / "checkpoint-2", tmp_path / "export")
    assert "pytorch_model.bin" not in str(err.value)


def test_export_refuses_a_planted_model_by_name(run, tmp_path):
    sentinel = tmp_path / "ran"
    torch.save(Plant(sentinel), run / "checkpoint-2" / "model.safetensors")
    with pytest.raises(ValueError, match=r"checkpoint-2/model\.safetensors cannot be read"):
        export_checkpoint(run / "checkpoint-2", tmp_path / "export")
    assert not sentinel.exists() and not (tmp_path / "export").exists()


def test_auto_refuses_when_no_checkpoint_is_usable(run, tiny_corpus, tiny_tokenizer):
    for d in ("checkpoint-1", "checkpoint-2"):
        (run / d / "scheduler.bin").unlink()
    with pytest.raises(CheckpointError, match=r"none can be resumed .*checkpoint-2: .*scheduler\.bin is missing"):
        train_mod.train(_cfg(tiny_corpus, run, tiny_tokenizer, steps=3))
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]  # nothing moved
