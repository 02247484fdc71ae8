"""Kill -9 at random moments (and at the worst instants of a commit) never loses a committed row; a rerun
completes the cache to exactly what an uninterrupted run writes.

Each run is a real process killed with SIGKILL. To keep the test fast the processes are forked from one
"zygote" that imported torch/open_clip/transformers once; the model is slowed down (a sleep per encode call)
so that random kills land mid-run, the way they would with a real teacher.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

pytestmark = pytest.mark.slow

ZYGOTE = textwrap.dedent("""
    import json, os, signal, sys, time, traceback
    import numpy as np, torch
    import cache.h5_writer as W
    from cache import CacheJob, build_cache
    from teachers.base import Teacher
    job_kw = json.loads(sys.argv[1])
    print("READY", flush=True)

    def die(*a, **k):
        os.kill(os.getpid(), signal.SIGKILL)

    def child(cmd):
        torch.set_num_threads(1)
        delay = cmd["delay"]
        for meth in ("encode_image", "encode_text"):
            orig = getattr(Teacher, meth)
            def slow(self, x, _orig=orig):
                time.sleep(delay)
                return _orig(self, x)
            setattr(Teacher, meth, slow)
        at = cmd.get("kill_at")
        if at == "fold-mid":          # inside a fold: rows written into the copy, before the rename
            W._write_bad = die
        elif at == "after-rename":    # the new file is in place, its parts not yet deleted
            W._fsync_dir = die
        elif at == "part-mid":        # half of the third part written to its temporary file
            calls, real = [0], np.savez
            def savez(f, **arrays):
                calls[0] += 1
                if calls[0] == 3:
                    f.write(b"PK\\x03\\x04 half a part")
                    f.flush()
                    die()
                real(f, **arrays)
            W.np.savez = savez
        build_cache(CacheJob(**{**job_kw, "out": cmd["out"]}))

    for line in sys.stdin:
        cmd = json.loads(line)
        pid = os.fork()
        if pid == 0:
            try:
                child(cmd)
                code = 0
            except BaseException:
                traceback.print_exc()
                code = 1
            sys.stdout.flush(); sys.stderr.flush()
            os._exit(code)
        print(f"PID {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        print(f"EXIT {os.waitstatus_to_exitcode(status)}", flush=True)
""")


class Zygote:
    def __init__(self, tmp: Path, job_kw: dict):
        script = tmp / "zygote.py"
        script.write_text(ZYGOTE)
        root = Path(__file__).resolve().parents[1]
        env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        self.p = subprocess.Popen([sys.executable, str(script), json.dumps(job_kw)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, env=env, cwd=root)
        assert self.p.stdout.readline().strip() == "READY"

    def run(self, out: Path, kill_after: float | None = None, kill_at: str | None = None,
            delay: float = 0.02) -> int:
        """Fork one cache run into `out`; SIGKILL it after `kill_after` seconds; return its exit code (-9: killed)."""
        self.p.stdin.write(json.dumps({"out": str(out), "kill_at": kill_at, "delay": delay}) + "\n")
        self.p.stdin.flush()
        pid = int(self.p.stdout.readline().split()[1])
        if kill_after is not None:
            time.sleep(kill_after)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        line = self.p.stdout.readline().split()
        assert line[0] == "EXIT"
        return int(line[1])

    def close(self) -> None:
        self.p.stdin.close()
        self.p.wait(timeout=30)


def _committed(out: Path, ref: dict) -> dict[str, set[int]]:
    """Rows committed so far (done in the file, or in a committed part), each checked against the reference."""
    rows: dict[str, set[int]] = {name: set() for name in ref}
    if out.exists():
        with h5py.File(out, "r") as f:  # must open: a kill never leaves a broken file
            assert f.attrs["format"] == "biomed-distill-features"
            for name in f["teachers"]:
                g = f[f"teachers/{name}"]
                done = np.flatnonzero(g["done"][:])
                for what in ("image", "text"):
                    np.testing.assert_allclose(g[what][:][done].astype(np.float32), ref[name][what][done],
                                               atol=2e-3)
                rows[name] |= set(done.tolist())
    for part in Path(str(out) + ".parts").glob("*/part-*.npz"):
        name = part.parent.name
        with np.load(part) as z:  # committed parts are complete
            r = z["rows"]
            np.testing.assert_allclose(z["image"].astype(np.float32), ref[name]["image"][r], atol=2e-3)
            np.testing.assert_allclose(z["text"].astype(np.float32), ref[name]["text"][r], atol=2e-3)
            rows[name] |= set(r.tolist())
    return rows


def _final_equals_reference(out: Path, ref: dict, ref_stats: dict) -> None:
    assert not Path(str(out) + ".parts").exists() and not Path(str(out) + ".tmp").exists()
    assert not Path(str(out) + ".lock").exists()
    with h5py.File(out, "r") as f:
        for name in ref:
            g = f[f"teachers/{name}"]
            assert g["done"][:].all()
            for what in ("image", "text"):
                np.testing.assert_allclose(g[what][:].astype(np.float32), ref[name][what], atol=2e-3)
            np.testing.assert_allclose(g["stats/image_cov"][:], ref_stats[name], atol=1e-4)
        assert len(f["bad/rows"]) == 0


def _check_nothing_lost(out: Path, ref: dict, history: list) -> None:
    now = _committed(out, ref)
    if history:  # nothing committed before a kill is ever lost
        for name in now:
            assert history[-1][name] <= now[name], f"rows of {name} lost after kill {len(history)}"
    history.append(now)


def test_kill_then_resume_equals_uninterrupted(tmp_path, tiny_corpus, tiny_teachers):
    kw = dict(data=str(tiny_corpus), teachers=tiny_teachers, batch_size=2, chunk_rows=4, num_workers=0,
              progress=False)
    ref_out = tmp_path / "ref.h5"
    zygote = Zygote(tmp_path, {**kw, "out": "PLACEHOLDER"})
    try:
        t0 = time.time()
        assert zygote.run(out=ref_out) == 0  # uninterrupted, same slowed-down model: the reference and its time
        duration = time.time() - t0
        with h5py.File(ref_out, "r") as f:
            ref = {n: {w: f[f"teachers/{n}/{w}"][:].astype(np.float32) for w in ("image", "text")}
                   for n in tiny_teachers}
            ref_stats = {n: f[f"teachers/{n}/stats/image_cov"][:] for n in tiny_teachers}

        # 1. SIGKILL at random moments of the run
        out, history, codes = tmp_path / "random.h5", [], []
        rng = random.Random(1234)
        for _ in range(4):
            codes.append(zygote.run(out=out, kill_after=rng.uniform(0.15, 0.7) * duration))
            _check_nothing_lost(out, ref, history)
        assert codes[0] == -signal.SIGKILL and sum(c == -signal.SIGKILL for c in codes) >= 1
        assert zygote.run(out=out, delay=0.0) == 0  # the same command again, to completion
        _final_equals_reference(out, ref, ref_stats)

        # 2. SIGKILL at the worst instants of a commit: each leaves work for the next
        out, history = tmp_path / "targeted.h5", []
        for at in ("part-mid", "fold-mid", "after-rename"):
            assert zygote.run(out=out, kill_at=at) == -signal.SIGKILL, f"the {at} kill did not happen"
            _check_nothing_lost(out, ref, history)
        assert Path(str(out) + ".lock").exists()  # the killed writer's lock is stale, and taken over
        assert zygote.run(out=out, delay=0.0) == 0
        _final_equals_reference(out, ref, ref_stats)
    finally:
        zygote.close()
