"""SIGKILL of one rank (not the launcher) of a 2-process `distill cache` under torchrun, then the same command again.

The launcher must end, non-zero, within torchrun's shutdown bound; no process of the job may stay behind; what
was committed before the kill is kept; and the rerun ends with a file equal to an uninterrupted run's (features,
done flags, bad-sample records, statistics). One teacher gives NaN/zero embeddings for some rows, so bad records
go through the kill, and is slowed down (a sleep per image batch, only in the killed run) so that the kill lands
mid-run: after the victim committed its first chunk, while the other rank is still embedding.
Fast variant (no launcher): the survivor finishes its own chunks, then ends by itself, exit 1 and one line.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cache_zygote import check_nothing_lost
from rank_kill import LAUNCHER_BOUND_S, Ranks, TorchRun
from test_cache_faults import _assert_equal_to, _state

from cache.build.run import CacheJob, build_cache
from cache.store.segments import read_log, segment_dir
from distill.errors import ENVIRONMENT, Failure, describe, exit_code

TEACHER = '''
import os, time
import torch
from teachers import load_teacher

SPEC = {spec!r}


def make(device="cpu"):
    """The tiny open_clip teacher, slowed down by DISTILL_TEST_DELAY s per image batch, with bad rows: zero image
    embeddings for the brightest images, NaN text embeddings for captions picked by their tokens (tokenizing may
    happen in a DataLoader worker, so the rule must not need the caption)."""
    t = load_teacher(SPEC, device=device)
    img, txt, delay = t._image_features, t._text_features, float(os.environ.get("DISTILL_TEST_DELAY", "0"))

    def image_features(images):
        time.sleep(delay)
        x = img(images)
        return torch.where((images.flatten(1).mean(1) > -0.6)[:, None], torch.zeros_like(x), x)

    def text_features(tokens):
        x = txt(tokens)
        return torch.where((tokens.sum(1) % 7 == 0)[:, None], torch.full_like(x, float("nan")), x)

    t._image_features, t._text_features = image_features, text_features
    return t
'''


def _committed(out: Path, rank: int, pid: int) -> int:
    """Chunks committed by worker `rank` (pid `pid`): the lines of its segment's log."""
    seg = Path(segment_dir(str(out)))
    return sum(len(read_log(str(p))) for p in seg.glob(f"run-*-rank-{rank:04d}-{pid}.h5"))


@pytest.fixture()
def job(tmp_path, tiny_corpus, tiny_teachers, monkeypatch) -> dict:
    mods = tmp_path / "mods"
    mods.mkdir()
    (mods / "slow_bad_teacher.py").write_text(TEACHER.format(spec=tiny_teachers["oc"]))
    monkeypatch.syspath_prepend(str(mods))
    return {
        "data": str(tiny_corpus),
        "teachers": {"oc": tiny_teachers["oc"], "x": "py:slow_bad_teacher:make"},
        "batch_size": 2,
        "chunk_rows": 4,
        "num_workers": 1,
        "device": "cpu",
        "progress": False,
        "pythonpath": str(mods),
    }


def _argv(job: dict, out: Path) -> list[str]:
    return [
        "-m",
        "distill.cli",
        "cache",
        "--data",
        job["data"],
        "--out",
        str(out),
        "--batch-size",
        str(job["batch_size"]),
        "--chunk-rows",
        str(job["chunk_rows"]),
        "--num-workers",
        str(job["num_workers"]),
        "--device",
        "cpu",
    ] + [a for n, s in job["teachers"].items() for a in ("--teacher", f"{n}={s}")]


@pytest.mark.slow  # 2 launches of 2 processes (about 45 s on 2 loaded cores); the fast variant is below
@pytest.mark.parametrize("victim", [1, 0])
def test_sigkill_of_one_cache_rank_ends_the_launch_and_the_rerun_equals_uninterrupted(tmp_path, job, victim):
    kw = {k: v for k, v in job.items() if k != "pythonpath"}
    build_cache(CacheJob(**{**kw, "num_workers": 0}, out=str(tmp_path / "ref.h5")))  # uninterrupted, in-process
    ref = _state(tmp_path / "ref.h5")
    assert 4 < len(ref["bad"]) < 16  # the NaN / zero rows of teacher x (under --max-bad-fraction 0.5)

    out = tmp_path / "killed.h5"
    run = TorchRun(
        _argv(job, out), tmp_path / "killed.log", {"PYTHONPATH": job["pythonpath"], "DISTILL_TEST_DELAY": "0.1"}
    )
    pid = run.kill_rank_when(victim, lambda pid: _committed(out, victim, pid) >= 1)
    code = run.finish()
    log = run.output()
    assert code != 0, log[-3000:]  # a lost rank fails the launch, which says which one and how
    assert f"exitcode  : -9 (pid: {pid})" in log and "Signal 9 (SIGKILL)" in log, log[-3000:]
    assert run.leftovers() == [], log[-3000:]  # the surviving rank and every DataLoader worker are gone
    check_nothing_lost(out, ref["teachers"], [{n: set() for n in ref["teachers"]}], ref["bad"])
    assert _committed(out, victim, pid) >= 1  # the victim's committed chunk waits for the rerun

    rerun = TorchRun(_argv(job, out), tmp_path / "rerun.log", {"PYTHONPATH": job["pythonpath"]})
    assert rerun.finish() == 0, rerun.output()[-3000:]
    assert rerun.leftovers() == []
    assert "taking over the stale lock" in rerun.output()  # the killed job's lock (rank 0 held it)
    _assert_equal_to(out, ref)


@pytest.mark.parametrize("victim", [1, 0])
def test_the_surviving_cache_rank_ends_by_itself_in_one_line(tmp_path, job, victim):
    """No launcher to stop it: the other rank finishes its own chunks, fails at the next collective, and exits 1
    with one line (no traceback, no "internal error"); a rerun (here one process) completes the cache."""
    kw = {k: v for k, v in job.items() if k != "pythonpath"}
    build_cache(CacheJob(**{**kw, "num_workers": 0}, out=str(tmp_path / "ref.h5")))
    ref = _state(tmp_path / "ref.h5")
    out, survivor = tmp_path / "killed.h5", 1 - victim
    ranks = Ranks(
        _argv(job, out), tmp_path / "logs", {"PYTHONPATH": job["pythonpath"]}, {victim: {"DISTILL_TEST_DELAY": "0.5"}}
    )  # the survivor is fast: it waits for the victim
    spid = ranks.procs[survivor].pid
    ranks.kill_when(victim, lambda pid: _committed(out, survivor, spid) == 4 and _committed(out, victim, pid) >= 1)
    code, err = ranks.finish(survivor, timeout=LAUNCHER_BOUND_S), ranks.err(survivor)
    assert code == 1, err[-3000:]
    assert err.splitlines()[-1].startswith("distill cache: error: another process of this distributed job stopped")
    assert "Traceback" not in err and "internal error" not in err, err[-3000:]
    assert ranks.leftovers() == []
    check_nothing_lost(out, ref["teachers"], [{n: set() for n in ref["teachers"]}], ref["bad"])
    build_cache(CacheJob(**kw, out=str(out)))  # the rerun (one process here) takes over and completes it
    _assert_equal_to(out, ref)


@pytest.mark.parametrize(
    "text",
    [
        "[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:44696. This "
        "is typically caused by a remote worker crashing.",  # seen by a rank in a collective when the other died
        "[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:28062: Connection reset by "
        "peer.",
    ],
)
def test_a_lost_peer_is_an_environment_failure_in_one_line(text):
    failure = describe(RuntimeError(text))
    assert failure is not None and failure.code == ENVIRONMENT
    assert failure.message.startswith("another process of this distributed job stopped (Connection ")
    assert failure.message.endswith("rerun the same command: work already committed is kept")
    assert describe(RuntimeError("Connection reset by peer")) is None  # not from a collective: still a bug


def test_a_lost_peer_leaves_at_once_and_other_failures_return(monkeypatch, capsys):
    """A survivor's process group is broken: its normal interpreter shutdown can abort in gloo's threads
    (std::terminate, exit -6, after the error line), so `exit_code` leaves with os._exit, output flushed."""
    left = []

    def fake_exit(code):
        left.append(code)
        raise SystemExit(code)

    monkeypatch.setattr(os, "_exit", fake_exit)
    lost = describe(RuntimeError("[gloo] Connection closed by peer [127.0.0.1]:29500"))
    assert lost is not None and lost.abandon
    with pytest.raises(SystemExit):
        exit_code(lost)
    assert left == [ENVIRONMENT]
    assert exit_code(Failure("no space left on device", ENVIRONMENT)) == ENVIRONMENT and left == [ENVIRONMENT]
