"""SIGKILL of one rank (not the launcher) of a 2-process training under torchrun, then the same command again.

The launcher must end, non-zero, within torchrun's shutdown bound and leave no process behind; the rerun resumes
with `train.resume=auto` (the shipped default) to weights equal bit for bit to an uninterrupted 2-process run's
(dropout on, so every rank's RNG state must come back). The kill lands inside a checkpoint write (once
`checkpoint-K.tmp` appears), the worst instant: the victim may not have written its part of it.
Fast variant (no launcher, either rank killed): the survivor ends by itself, exit 1 and one line.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from rank_kill import LAUNCHER_BOUND_S, Ranks, TorchRun
from test_train_faults import _equal
from train_fixtures import load_weights, read_log, tiny_config, tiny_tokenizer  # noqa: F401

from distill.training.checkpoint import list_checkpoints

STEPS = 4
ENV = {"ACCELERATE_USE_CPU": "1"}


def _cfg_file(corpus, tokenizer, tmp: Path, name: str) -> tuple[Path, Path]:
    run = tmp / name
    cfg = tiny_config(
        corpus,
        run,
        mode="contrastive",
        tokenizer=tokenizer,
        train__max_steps=STEPS,
        train__checkpoint_every=1,
        train__keep_last=2,
        train__tensorboard="false",
        train__threads=1,
        data__batch_size=4,
        student__overrides__text_config__hidden_dropout_prob=0.1,
    )
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path, run


@pytest.fixture(scope="module")
def straight(tiny_corpus, tiny_tokenizer, tmp_path_factory) -> Path:
    """An uninterrupted 2-process run."""
    tmp = tmp_path_factory.mktemp("rank_kill")
    cfg, run = _cfg_file(tiny_corpus, tiny_tokenizer, tmp, "straight")
    job = TorchRun(["-m", "distill.train", "--config", str(cfg)], tmp / "straight.log", ENV)
    assert job.finish() == 0, job.output()[-3000:]
    return run


@pytest.mark.slow  # 3 launches of 2 processes (about 100 s on 2 loaded cores); the fast variant is below
def test_sigkill_of_one_training_rank_resumes_bit_for_bit(straight, tiny_corpus, tiny_tokenizer, tmp_path):
    victim = 1  # rank 0 survives it, holding the run's lock, inside the checkpoint write it would rename
    cfg, run = _cfg_file(tiny_corpus, tiny_tokenizer, tmp_path, "killed")
    argv = ["-m", "distill.train", "--config", str(cfg)]
    job = TorchRun(argv, tmp_path / "killed.log", ENV)
    pid = job.kill_rank_when(victim, lambda pid: (run / "checkpoint-2.tmp").exists())
    code = job.finish()
    log = job.output()
    assert code != 0, log[-3000:]
    assert f"exitcode  : -9 (pid: {pid})" in log and "Signal 9 (SIGKILL)" in log, log[-3000:]
    assert job.leftovers() == [], log[-3000:]  # the surviving rank and its DataLoader workers are gone
    assert [d.name for d in list_checkpoints(run)] == ["checkpoint-1"]  # the write killed half-way never counts

    rerun = TorchRun(argv, tmp_path / "rerun.log", ENV)
    assert rerun.finish() == 0, rerun.output()[-3000:]
    assert rerun.leftovers() == []
    assert _equal(load_weights(run / f"checkpoint-{STEPS}"), load_weights(straight / f"checkpoint-{STEPS}"))
    assert [r["step"] for r in read_log(run)] == list(range(1, STEPS + 1))
    assert not (run / ".lock").exists() and not list(run.glob("*.tmp"))


@pytest.mark.parametrize("victim", [1, 0])
def test_the_surviving_training_rank_ends_by_itself_in_one_line(tiny_corpus, tiny_tokenizer, tmp_path, victim):
    """No launcher to stop it: the other rank fails at its next collective and exits 1 with one line (no gloo
    traceback, no "internal error"); nothing half-written counts as a checkpoint."""
    cfg, run = _cfg_file(tiny_corpus, tiny_tokenizer, tmp_path, "killed")
    ranks = Ranks(["-m", "distill.train", "--config", str(cfg)], tmp_path / "logs", ENV, {})
    survivor = 1 - victim
    ranks.kill_when(victim, lambda pid: (run / "checkpoint-2.tmp").exists())
    code, err = ranks.finish(survivor, timeout=LAUNCHER_BOUND_S), ranks.err(survivor)
    assert code == 1, err[-3000:]
    assert err.splitlines()[-1].startswith("distill.train: error: another process of this distributed job stopped"), (
        err[-3000:]
    )
    assert "Traceback" not in err and "internal error" not in err, err[-3000:]
    assert ranks.leftovers() == []
    assert [d.name for d in list_checkpoints(run)] == ["checkpoint-1"]
