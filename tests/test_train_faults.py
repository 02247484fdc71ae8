"""Training faults: a NaN loss never reaches a checkpoint, a failed checkpoint write leaves the previous one usable,
and SIGKILLs at random moments (some inside checkpoint writes) resume to the uninterrupted run's weights bit for bit.
"""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
import yaml
from accelerate import Accelerator
from train_fixtures import ROOT, load_weights, nan_loss_at_call, read_log, tiny_config, tiny_tokenizer  # noqa: F401

import distill.train as train_mod
import distill.training.build_run as build_run_mod
import distill.training.checkpoint as checkpoint_mod
from distill.training.checkpoint import CheckpointWriteError, list_checkpoints


def _cfg(corpus, out, tokenizer, steps, every, **kw):
    # dropout on: the RNG states must come back exactly for the weights to match
    return tiny_config(
        corpus,
        out,
        mode="contrastive",
        tokenizer=tokenizer,
        train__max_steps=steps,
        train__checkpoint_every=every,
        train__keep_last=2,
        train__tensorboard="false",
        train__threads=1,
        student__overrides__text_config__hidden_dropout_prob=0.1,
        **kw,
    )


class DiskUsage(NamedTuple):
    total: int
    used: int
    free: int


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def straight(tiny_corpus, tiny_tokenizer, tmp_path_factory) -> Path:
    """An uninterrupted 6-step run, checkpoint every 2 steps."""
    run = tmp_path_factory.mktemp("faults") / "straight"
    train_mod.train(_cfg(tiny_corpus, run, tiny_tokenizer, steps=6, every=2))
    return run


def test_a_nan_loss_stops_before_any_checkpoint_holds_it(straight, tiny_corpus, tiny_tokenizer, tmp_path, monkeypatch):
    run = tmp_path / "run"
    real_build = build_run_mod.build_run
    monkeypatch.setattr(train_mod, "build_run", nan_loss_at_call(3))  # 3rd micro-batch = step 3
    with pytest.raises(train_mod.NonFiniteLossError) as err:
        train_mod.train(_cfg(tiny_corpus, run, tiny_tokenizer, steps=6, every=2))
    msg = str(err.value)
    assert msg.startswith("step 3: non-finite loss (") and "infonce=nan" in msg and "loss=nan" in msg
    assert "distill info --verify" in msg and str(run / "checkpoint-2") in msg and "\n" not in msg
    assert [d.name for d in list_checkpoints(run)] == ["checkpoint-2"] and not (run / ".lock").exists()
    assert all(torch.isfinite(v).all() for v in load_weights(run / "checkpoint-2").values())
    assert [r["step"] for r in read_log(run)] == [1, 2]  # the NaN step was never logged
    # the checkpoint before the failure resumes to the uninterrupted result
    monkeypatch.setattr(train_mod, "build_run", real_build)
    assert train_mod.train(_cfg(tiny_corpus, run, tiny_tokenizer, steps=6, every=2))["step"] == 6
    assert _equal(load_weights(run / "checkpoint-6"), load_weights(straight / "checkpoint-6"))


@pytest.mark.parametrize("fault", ["enospc", "iostream", "iostream_low_space"])
def test_a_failed_checkpoint_write_keeps_the_previous_one(
    fault, straight, tiny_corpus, tiny_tokenizer, tmp_path, monkeypatch
):
    run = tmp_path / "run"
    real_save = Accelerator.save_state

    def failing_save(self, output_dir=None, **kwargs):
        if Path(output_dir).name != "checkpoint-4.tmp":
            return real_save(self, output_dir, **kwargs)
        real_save(self, output_dir, **kwargs)  # most of it written, then the disk fails
        if fault == "enospc":
            raise OSError(errno.ENOSPC, "No space left on device", str(Path(output_dir) / "optimizer.bin"))
        raise RuntimeError("basic_ios::clear: iostream error")

    monkeypatch.setattr(Accelerator, "save_state", failing_save)
    if fault == "iostream_low_space":  # torch.save's error carries no errno: the free space tells
        monkeypatch.setattr(checkpoint_mod.shutil, "disk_usage", lambda p: DiskUsage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(CheckpointWriteError) as err:
        train_mod.train(_cfg(tiny_corpus, run, tiny_tokenizer, steps=6, every=2))
    msg = str(err.value)
    assert isinstance(err.value, OSError) and err.value.filename == str(run / "checkpoint-4")
    assert msg.startswith(f"could not write checkpoint {run / 'checkpoint-4'}: ") and "\n" not in msg
    if fault == "iostream":
        assert "RuntimeError: basic_ios::clear: iostream error" in msg and "no space" not in msg
        assert err.value.errno == errno.EIO
    else:
        assert "no space left on device" in msg and err.value.errno == errno.ENOSPC
    if fault == "iostream_low_space":
        assert "1000 B free" in msg
    assert "train.resume=auto to continue from checkpoint-2" in msg
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2"]  # no checkpoint-4.tmp left
    assert not (run / ".lock").exists()

    monkeypatch.undo()
    assert train_mod.train(_cfg(tiny_corpus, run, tiny_tokenizer, steps=6, every=2))["step"] == 6
    assert _equal(load_weights(run / "checkpoint-6"), load_weights(straight / "checkpoint-6"))


# -- SIGKILL fault injection -------------------------------------------------------------------------------------
def _launch(cfg_file: Path, log: Path) -> subprocess.Popen:
    """`python -m distill.train` with its output in `log` (a pipe nobody reads could fill and block it)."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "ACCELERATE_USE_CPU": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    with open(log, "w") as f:
        return subprocess.Popen(
            [sys.executable, "-m", "distill.train", "--config", str(cfg_file)],
            cwd=ROOT,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
        )


def _kill_at_random(proc: subprocess.Popen, run: Path, rng: random.Random, max_step: int) -> str:
    """SIGKILL once a random event happened: a checkpoint write started (kill inside it) or a checkpoint landed
    (kill a random moment later). Returns what was waited for; '' when the run finished first."""
    target = rng.randint(1, max_step - 1)
    inside = rng.random() < 0.5
    event = f"checkpoint-{target}.tmp" if inside else f"checkpoint-{target}"
    delay = 0.0 if inside else rng.uniform(0.0, 0.3)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if (run / event).exists() or any(
            int(d.name.split("-")[1].split(".")[0]) > target for d in run.glob("checkpoint-*")
        ):
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return f"{event}+{delay:.2f}s"
        time.sleep(0.002)
    proc.wait()
    return ""


def _kill_loop(corpus, tokenizer, straight_run: Path, tmp_path: Path, kills: int, seed: int, steps: int) -> None:
    run = tmp_path / "killed"
    cfg_file = tmp_path / "killed.yaml"
    cfg_file.write_text(yaml.safe_dump(_cfg(corpus, run, tokenizer, steps=steps, every=1).to_dict()))
    rng = random.Random(seed)
    moments = []
    log = tmp_path / "train.log"
    for _ in range(kills):
        proc = _launch(cfg_file, log)
        moments.append(_kill_at_random(proc, run, rng, steps))
        assert proc.returncode in (-signal.SIGKILL, 0), log.read_text()[-3000:]
    assert any(moments), "no kill landed before the run finished"
    proc = _launch(cfg_file, log)
    proc.wait(timeout=300)
    assert proc.returncode == 0, (moments, log.read_text()[-3000:])
    assert _equal(load_weights(run / f"checkpoint-{steps}"), load_weights(straight_run / f"checkpoint-{steps}")), (
        moments
    )
    assert [r["step"] for r in read_log(run)] == list(range(1, steps + 1))
    assert not (run / ".lock").exists() and not list(run.glob("*.tmp"))


def test_sigkill_at_random_moments_resumes_bit_for_bit(tiny_corpus, tiny_tokenizer, tmp_path):
    """CI version: 2 kills at seeded random moments of a 6-step run that checkpoints every step."""
    straight_run = tmp_path / "straight"
    train_mod.train(_cfg(tiny_corpus, straight_run, tiny_tokenizer, steps=6, every=1))
    _kill_loop(tiny_corpus, tiny_tokenizer, straight_run, tmp_path, kills=2, seed=8, steps=6)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("DISTILL_TRAIN_KILLS"), reason="set DISTILL_TRAIN_KILLS=N for N kills")
def test_sigkill_many_times(tiny_corpus, tiny_tokenizer, tmp_path):
    """Long version: DISTILL_TRAIN_KILLS kills (seed DISTILL_KILL_SEED) over a 12-step run."""
    straight_run = tmp_path / "straight"
    train_mod.train(_cfg(tiny_corpus, straight_run, tiny_tokenizer, steps=12, every=1))
    _kill_loop(
        tiny_corpus,
        tiny_tokenizer,
        straight_run,
        tmp_path,
        kills=int(os.environ["DISTILL_TRAIN_KILLS"]),
        seed=int(os.environ.get("DISTILL_KILL_SEED", "0")),
        steps=12,
    )
