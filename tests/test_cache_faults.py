"""Faults in `distill cache`: a full disk, and SIGKILLs spread over the whole run (not just before the first commit).

Each kill is a real SIGKILL of a real process (forked by cache_zygote.Zygote, which imported torch once). Kill
points are chosen by what the run has done, so they land everywhere: after k of this run's parts are committed,
while the fold writes FEATURES.h5.tmp (slowed down, as a big file's fold is), or at a random fraction of the
measured duration. After every kill nothing committed is lost; the final file (features, done flags, bad-sample
records, statistics) equals an uninterrupted run's. One teacher gives NaN/zero embeddings for some rows, so the bad
records go through the kills too.

CI runs 3 kills; `DISTILL_FAULT_KILLS=40 pytest -m slow tests/test_cache_faults.py` runs the long version.
"""

from __future__ import annotations

import errno
import os
import random
import signal
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from cache_zygote import ATOL, Zygote, check_nothing_lost, committed_rows
from test_cache_integrity import BAD_TEACHER

import cache.store.segment_writer as SW
import cache.store.writer as W
from cache.build.run import CacheJob, build_cache
from cache.store.schema import CacheError
from cache.store.segments import read_log
from distill.cli import main


def _parts_of(out: Path, pid: int) -> int:
    """Chunks committed by process `pid` (lines of its segments' logs); polled while the run folds and may delete
    what it scans."""
    try:
        return sum(len(read_log(str(p))) for p in Path(f"{out}.segments").glob(f"run-*-rank-*-{pid}.h5"))
    except (FileNotFoundError, OSError):  # a file vanished mid-scan (the fold dropped it): ask again at the next poll
        return 0


def _kill_plan(kind: str, rng: random.Random, duration: float, parts_per_run: int):
    """A kill condition: after k committed parts, inside the final fold, or at a fraction of the duration."""
    if kind == "parts":
        k = rng.randint(1, parts_per_run)
        return f"after {k} part(s)", lambda out: lambda pid, t: _parts_of(out, pid) >= k
    if kind == "fold":
        return "in the fold", lambda out: lambda pid, t: _parts_of(out, pid) > 0 and Path(f"{out}.tmp").exists()
    frac = rng.uniform(0.05, 1.0)
    return f"at {frac:.2f} of the run", lambda out: lambda pid, t: t >= frac * duration


def _state(out: Path) -> dict:
    with h5py.File(out, "r") as f:
        teachers = {n: {w: f[f"teachers/{n}/{w}"][:] for w in ("image", "text", "done")} for n in f["teachers"]}
        stats = {n: f[f"teachers/{n}/stats/image_cov"][:] for n in f["teachers"] if "stats" in f[f"teachers/{n}"]}
        bad = dict(zip(f["bad/rows"][:].tolist(), f["bad/reasons"].asstr()[:].tolist())) if "bad" in f else {}
    return {"teachers": teachers, "stats": stats, "bad": bad}


def _assert_equal_to(out: Path, ref: dict) -> None:
    assert not Path(f"{out}.parts").exists() and not Path(f"{out}.tmp").exists() and not Path(f"{out}.lock").exists()
    got = _state(out)
    assert got["bad"] == ref["bad"]
    for n, d in ref["teachers"].items():
        np.testing.assert_array_equal(got["teachers"][n]["done"], d["done"])
        for w in ("image", "text"):
            np.testing.assert_allclose(got["teachers"][n][w], d[w], atol=ATOL)
        np.testing.assert_allclose(got["stats"][n], ref["stats"][n], atol=1e-4)


@pytest.fixture()
def fault_job(tmp_path, tiny_corpus, tiny_teachers, monkeypatch) -> dict:
    mod = tmp_path / "mods"
    mod.mkdir()
    (mod / "bad_teacher_mod.py").write_text(BAD_TEACHER.format(spec=tiny_teachers["oc"]))
    monkeypatch.syspath_prepend(str(mod))
    return {
        "data": str(tiny_corpus),
        "teachers": {"oc": tiny_teachers["oc"], "x": "py:bad_teacher_mod:make"},
        "batch_size": 2,
        "chunk_rows": 4,
        "num_workers": 0,
        "device": "cpu",
        "progress": False,
        "_pythonpath": str(mod),
    }


def _kill_loop(tmp_path: Path, job: dict, kills: int, seed: int) -> list[str]:
    kw = {k: v for k, v in job.items() if not k.startswith("_")}
    zygote = Zygote(tmp_path, {**kw, "out": "PLACEHOLDER"}, job["_pythonpath"], delay=0.01, fold_delay=0.3)
    try:
        t0 = time.time()
        assert zygote.run(tmp_path / "ref.h5") == 0
        duration = time.time() - t0
        ref = _state(tmp_path / "ref.h5")
        assert len(ref["bad"]) == 7  # the NaN / zero rows of teacher x
        out, rng, seen = tmp_path / "killed.h5", random.Random(seed), []
        history: list[dict[str, set[int]]] = []
        parts_per_run = 8  # 32 rows / chunk_rows 4: one commit per chunk for both teachers
        for i in range(kills):  # the kinds in turn, so even 3 kills cover parts, fold and time
            done = sum(len(r) for r in history[-1].values()) if history else 0
            left = duration * max(0.25, 1 - done / 64)  # a rerun has less to do: aim inside what is left
            what, cond = _kill_plan(("parts", "fold", "time")[i % 3], rng, left, parts_per_run)
            code = zygote.run(out, kill_when=cond(out))
            seen.append(f"{what}: {'killed' if code == -signal.SIGKILL else f'exit {code}'}")
            assert code in (0, -signal.SIGKILL), seen
            check_nothing_lost(out, ref["teachers"], history, ref["bad"], why=seen)
            if code == 0:  # finished before the kill point: start over, so every kill hits a run with work left
                _assert_equal_to(out, ref)
                out.unlink()
                history.clear()
        assert zygote.run(out, delay=0.0, fold_delay=0.0) == 0  # the same command once more, to completion
        _assert_equal_to(out, ref)
        return seen
    finally:
        zygote.close()


def test_random_sigkills_spread_over_the_run_then_resume_equals_uninterrupted(tmp_path, fault_job):
    seen = _kill_loop(tmp_path, fault_job, kills=3, seed=8)
    assert sum("killed" in s for s in seen) >= 2 and "in the fold: killed" in seen, seen


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("DISTILL_FAULT_KILLS"), reason="set DISTILL_FAULT_KILLS=N for the long run")
def test_many_random_sigkills(tmp_path, fault_job):
    kills = int(os.environ["DISTILL_FAULT_KILLS"])
    seen = _kill_loop(tmp_path, fault_job, kills=kills, seed=int(os.environ.get("DISTILL_FAULT_SEED", "0")))
    assert sum("killed" in s for s in seen) >= kills * 2 // 3, seen


# -- a full disk ------------------------------------------------------------------------------------------------
def _fail_at(monkeypatch, owner, name: str, calls: set[int], code: int = errno.ENOSPC) -> list[int]:
    """Make owner.name raise OSError(code) at the given call numbers (1-based); returns the call counter."""
    real, count = getattr(owner, name), [0]

    def failing(*a, **k):
        count[0] += 1
        if count[0] in calls:
            raise OSError(code, os.strerror(code))
        return real(*a, **k)

    monkeypatch.setattr(owner, name, failing)
    return count


def test_no_space_writing_a_part_is_a_message_and_the_rerun_completes(tmp_path, fault_job, monkeypatch):
    kw = {k: v for k, v in fault_job.items() if not k.startswith("_")}
    build_cache(CacheJob(**kw, out=str(tmp_path / "ref.h5")))
    ref = _state(tmp_path / "ref.h5")
    out = tmp_path / "f.h5"
    with monkeypatch.context() as m:
        _fail_at(m, SW, "_pwrite_all", {5})  # 2 teachers x (image, text) per chunk: the second chunk's first write
        with pytest.raises(CacheError) as e:
            build_cache(CacheJob(**kw, out=str(out)))
    msg = str(e.value)
    assert msg.startswith(f"no space left on device writing {out}.segments/run-")
    assert msg.endswith("; free space and rerun the same command: committed rows are kept and the next run resumes")
    before = committed_rows(out, ref["teachers"], ref["bad"])
    assert before["oc"] == {0, 1, 2, 3}  # the first part was committed, and folded in on the way out
    build_cache(CacheJob(**kw, out=str(out)))
    _assert_equal_to(out, ref)


def test_no_space_in_the_fold_keeps_the_old_file_and_the_parts(tmp_path, fault_job, monkeypatch, capsys):
    kw = {k: v for k, v in fault_job.items() if not k.startswith("_")}
    build_cache(CacheJob(**kw, out=str(tmp_path / "ref.h5")))
    ref = _state(tmp_path / "ref.h5")
    out = tmp_path / "f.h5"
    argv = [
        "cache",
        "--data",
        kw["data"],
        "--out",
        str(out),
        "--batch-size",
        "2",
        "--chunk-rows",
        "4",
        "--num-workers",
        "0",
        "--device",
        "cpu",
    ] + [a for n, s in kw["teachers"].items() for a in ("--teacher", f"{n}={s}")]
    with monkeypatch.context() as m:
        _fail_at(m, W.shutil, "copyfile", set(range(1, 100)))  # the disk stays full: every fold fails
        assert main(argv) == 1
    err = capsys.readouterr().err
    assert (
        f"distill cache: error: no space left on device writing {out}.tmp; free space and rerun the same "
        "command: committed rows are kept"
        in err
        and "Traceback" not in err
    )
    assert not Path(f"{out}.tmp").exists()
    with h5py.File(out, "r") as f:  # the previous file (here: the new, empty one) still opens, untouched
        assert "oc" not in f["teachers"]
    rows = committed_rows(out, ref["teachers"], ref["bad"])
    assert rows["oc"] == set(range(32))  # every row waits in a committed part
    assert main(argv) == 0
    _assert_equal_to(out, ref)


@pytest.mark.parametrize(
    "code,words",
    [
        (errno.EROFS, "read-only file system: cannot write"),
        (errno.EACCES, "permission denied writing"),
        (errno.EDQUOT, "disk quota exceeded writing"),
    ],
)
def test_other_disk_errors_are_named(tmp_path, code, words):
    with pytest.raises(CacheError, match=f"^{words} {tmp_path}/x; "):
        with W.disk_errors(str(tmp_path / "x")):
            raise OSError(code, os.strerror(code))
    with pytest.raises(OSError, match="unrelated"):  # other OSErrors pass through untouched
        with W.disk_errors(str(tmp_path / "x")):
            raise OSError(errno.EIO, "unrelated")
