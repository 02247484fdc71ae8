"""One training per run folder: `RUN/.lock` (pid, host) refuses a second writer, a dead one's lock is taken over.

Why: two trainings into one folder both ran and log.jsonl held the same steps twice.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys

import pytest
import yaml
from train_fixtures import ROOT, tiny_config, tiny_tokenizer  # noqa: F401  (fixture)

import distill.train as train_mod
from distill.training.run_lock import RunInUseError


def _cfg(corpus, out, tokenizer, steps=1):
    return tiny_config(
        corpus,
        out,
        mode="contrastive",
        tokenizer=tokenizer,
        train__max_steps=steps,
        train__checkpoint_every=0,
        train__tensorboard="false",
    )


def _write_lock(run, pid: int, host: str | None = None):
    run.mkdir(parents=True, exist_ok=True)
    (run / ".lock").write_text(json.dumps({"pid": pid, "host": host or socket.gethostname()}))


def test_a_live_holder_is_refused_and_its_lock_kept(tiny_corpus, tiny_tokenizer, tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_lock(run, holder.pid)
        with pytest.raises(RunInUseError) as err:
            train_mod.train(_cfg(tiny_corpus, run, tiny_tokenizer))
        msg = str(err.value)
        assert f"pid {holder.pid}" in msg and socket.gethostname() in msg and str(run) in msg and "in use" in msg
        assert sorted(p.name for p in run.iterdir()) == [".lock"]  # refused before anything was written
        assert json.loads((run / ".lock").read_text())["pid"] == holder.pid
    finally:
        holder.kill()
        holder.wait()


def test_another_host_is_refused(tiny_corpus, tiny_tokenizer, tmp_path):
    run = tmp_path / "run"
    _write_lock(run, 1, host="some-other-node")
    with pytest.raises(RunInUseError, match=r"locked by pid 1 on host some-other-node .*delete .*\.lock"):
        train_mod.train(_cfg(tiny_corpus, run, tiny_tokenizer))


def test_a_dead_holder_is_taken_over_with_a_warning(tiny_corpus, tiny_tokenizer, tmp_path, caplog):
    run = tmp_path / "run"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _write_lock(run, dead.pid)
    with caplog.at_level(logging.WARNING, logger="cache.store.lock"):
        assert train_mod.train(_cfg(tiny_corpus, run, tiny_tokenizer))["step"] == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "stale" in r.getMessage()]
    assert len(warnings) == 1 and f"pid {dead.pid}" in warnings[0] and str(run / ".lock") in warnings[0]
    assert not (run / ".lock").exists()  # released after a normal run


def test_the_lock_is_released_after_a_failing_run(tiny_corpus, tiny_tokenizer, tmp_path, monkeypatch):
    run = tmp_path / "run"
    seen = []

    def boom(*args, **kwargs):
        seen.append((run / ".lock").exists())  # held while training
        raise RuntimeError("boom")

    monkeypatch.setattr(train_mod, "check_resume_teachers", boom)  # called only on resume: resume once first
    train_mod.train(_cfg(tiny_corpus, run, tiny_tokenizer, steps=1))
    with pytest.raises(RuntimeError, match="boom"):
        train_mod.train(_cfg(tiny_corpus, run, tiny_tokenizer, steps=2))
    assert seen == [True] and not (run / ".lock").exists()


def test_the_module_entry_point_refuses_in_one_line(tiny_corpus, tiny_tokenizer, tmp_path):
    """`python -m distill.train` (what `accelerate launch -m distill.train` runs) gives the CLI's line and code."""
    run = tmp_path / "run"
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump(_cfg(tiny_corpus, run, tiny_tokenizer).to_dict()))
    _write_lock(run, os.getpid())  # this test process: alive, and not the child
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "distill.train", "--config", str(cfg_file)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    err = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr
    assert err[-1].startswith("distill.train: error: ") and f"pid {os.getpid()}" in err[-1], done.stderr
    assert "Traceback" not in done.stderr
