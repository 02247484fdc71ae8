"""A "zygote" for SIGKILL tests of `distill cache`, and the check made after each kill.

Each kill must hit a real process, but starting Python and importing torch/open_clip/transformers per run costs
seconds; so runs are forked from one process that imported them once. A run can be slowed down (a sleep per
teacher call, `delay`; a sleep in the fold, `fold_delay`) so that kills land mid-run as they would with a real
teacher and a big file, and can die at a planted instant of a commit (`kill_at`: half-way through writing a chunk
into the segment, inside the fold, just after the fold's rename). Used by test_cache_resume.py and
test_cache_faults.py.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Container
from pathlib import Path

import h5py
import numpy as np

import cache.store.layout as L
from cache.store.segments import SegmentInfo, list_segments, segment_dir
from teachers.kernel.modality import Modality

ATOL = 2e-3

ZYGOTE = textwrap.dedent("""
    import json, os, signal, sys, time, traceback
    import numpy as np, torch
    import cache.store.writer as W
    import cache.store.segment_writer as SW
    from cache import CacheJob, build_cache
    from teachers.base import Teacher
    job_kw = json.loads(sys.argv[1])
    print("READY", flush=True)

    def die(*a, **k):
        os.kill(os.getpid(), signal.SIGKILL)

    def child(cmd):
        torch.set_num_threads(1)
        for meth in ("encode_image", "encode_text"):  # a slower model, so kills land mid-run
            orig = getattr(Teacher, meth)
            def slow(self, x, _orig=orig):
                time.sleep(cmd["delay"])
                return _orig(self, x)
            setattr(Teacher, meth, slow)
        if cmd["fold_delay"]:  # a slower fold (a big file's copy takes time), so kills land inside it
            real_bad = W._write_bad
            def slow_bad(f, bad, *keys_from):
                time.sleep(cmd["fold_delay"])
                real_bad(f, bad, *keys_from)
            W._write_bad = slow_bad
        at = cmd["kill_at"]
        if at == "fold-mid":          # inside a fold: rows written into the copy, before the rename
            W._write_bad = die
        elif at == "after-rename":    # the new file is in place, its folded metas not yet deleted
            W._fsync_dir = die
        elif at == "part-mid":        # half of an HDF5 chunk of the second commit written into the segment
            calls, real = [0], SW._pwrite_all
            def pwrite(fd, data, offset):
                calls[0] += 1
                if calls[0] == 5:     # 2 teachers x (image, text): the second commit's first chunk
                    real(fd, bytes(data)[:len(data) // 2], offset)
                    die()
                real(fd, data, offset)
            SW._pwrite_all = pwrite
        elif at is not None:
            raise ValueError(f"unknown kill_at {at!r}")
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
    """Forks cache runs of one job (`job_kw`, its "out" replaced per run); `delay`/`fold_delay`: the runs' defaults."""

    def __init__(self, tmp: Path, job_kw: dict, pythonpath: str = "", delay: float = 0.02, fold_delay: float = 0.0):
        self.delay, self.fold_delay = delay, fold_delay
        script = tmp / "zygote.py"
        script.write_text(ZYGOTE)
        root = Path(__file__).resolve().parents[1]
        path = os.pathsep.join(p for p in (str(root), pythonpath, os.environ.get("PYTHONPATH", "")) if p)
        self.p = subprocess.Popen(
            [sys.executable, str(script), json.dumps(job_kw)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": path},
            cwd=root,
        )
        assert self.p.stdout is not None and self.p.stdin is not None  # both piped above
        self.stdin = self.p.stdin
        self.fd, self.buf = self.p.stdout.fileno(), b""
        assert self._line() == "READY"

    def _line(self, wait: float | None = None) -> str | None:
        """The zygote's next output line; None if none is complete within `wait` seconds (None: block)."""
        while b"\n" not in self.buf:  # own buffer, not readline's: select must not miss a line already read
            if wait is not None and not select.select([self.fd], [], [], wait)[0]:
                return None
            chunk = os.read(self.fd, 4096)
            assert chunk, "the zygote died"
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode().strip()

    def run(
        self,
        out: Path,
        kill_after: float | None = None,
        kill_when: Callable[[int, float], bool] | None = None,
        kill_at: str | None = None,
        delay: float | None = None,
        fold_delay: float | None = None,
        timeout: float = 120.0,
    ) -> int:
        """Fork one cache run into `out`; SIGKILL it after `kill_after` seconds or once `kill_when(pid, seconds)`
        holds (polled every 2 ms); `kill_at` plants a kill inside the run. Returns its exit code (-9: killed)."""
        cmd = {
            "out": str(out),
            "kill_at": kill_at,
            "delay": self.delay if delay is None else delay,
            "fold_delay": self.fold_delay if fold_delay is None else fold_delay,
        }
        self.stdin.write((json.dumps(cmd) + "\n").encode())
        self.stdin.flush()
        started = self._line()
        assert started is not None  # blocking read: a line, or the assert inside _line fired
        pid = int(started.split()[1])
        t0, killed = time.time(), False
        while (line := self._line(wait=0.002)) is None:
            t = time.time() - t0
            if not killed and (
                (kill_after is not None and t >= kill_after) or (kill_when is not None and kill_when(pid, t))
            ):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:  # it ended just now
                    pass
                killed = True
            assert t < timeout, "a cache run hung"
        word, code = line.split()
        assert word == "EXIT"
        return int(code)

    def close(self) -> None:
        self.stdin.close()
        self.p.wait(timeout=30)


def committed_rows(out: Path, ref: dict, bad: Container[int] | None = None) -> dict[str, set[int]]:
    """Rows committed so far (done in the file, or stored in a committed chunk of a segment), each checked against
    the reference values `ref[teacher]["image" | "text"]`; with `bad`, a segment's bad rows must be among them."""
    rows: dict[str, set[int]] = {name: set() for name in ref}
    if out.exists():
        with h5py.File(out, "r") as f:  # must open: a kill never leaves a broken file
            assert f.attrs["format"] == "biomed-distill-features"
            for name in f["teachers"]:
                g = f[f"teachers/{name}"]
                done = np.flatnonzero(g["done"][:])
                for what in ("image", "text"):
                    np.testing.assert_allclose(g[what][:][done].astype(np.float32), ref[name][what][done], atol=ATOL)
                rows[name] |= set(done.tolist())
    for path in list_segments(segment_dir(str(out))):
        seg = SegmentInfo.read(path)
        with h5py.File(path, "r") as f:  # committed chunks are complete, whatever else the file holds
            for name in seg.teachers:
                slots, ok = seg.written(name)
                r = seg.rows[slots[ok]]
                for what in ("image", "text") if len(r) else ():  # committed slots only: others may be half-written
                    got = f[L.feature(name, Modality(what))][slots[ok]].astype(np.float32)
                    np.testing.assert_allclose(got, ref[name][what][r], atol=ATOL)
                if bad is not None:
                    assert all(b in bad for b in seg.bad.get(name, {}))
                rows[name] |= set(r.tolist())
    return rows


def check_nothing_lost(out: Path, ref: dict, history: list, bad: Container[int] | None = None, why="") -> None:
    """Appends the rows committed now to `history`, after checking that none committed before the kill is lost."""
    now = committed_rows(out, ref, bad)
    if history:
        for name in now:
            assert history[-1][name] <= now[name], f"rows of {name} lost after kill {len(history)} {why}"
    history.append(now)
