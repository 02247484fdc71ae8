"""A 2-process `torchrun` job whose every process can be found, one of whose ranks is SIGKILLed (not the launcher).

Each launch carries a unique tag in its environment, which every process it starts inherits (torchrun's workers,
their DataLoader workers): after the launcher ends, any process still carrying the tag is an orphan. The launcher
runs in a session of its own, so a hung launch can be cleaned up whole. Used by test_cache_rank_kill.py and
test_train_rank_kill.py.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TAG = "DISTILL_TEST_LAUNCH_TAG"
# torchrun sends SIGTERM to the other workers when one fails, then SIGKILL 30 s later; the launcher must end
# within that grace plus its own start-up and shut-down
LAUNCHER_BOUND_S = 90.0


def _environ(pid: int) -> dict[str, str]:
    """A process's environment ({} for a zombie, a process gone or not ours)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            raw = f.read()
    except OSError:
        return {}
    return dict(kv.split("=", 1) for kv in raw.decode(errors="replace").split("\0") if "=" in kv)


def _ppid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def tagged(tag: str) -> dict[int, dict[str, str]]:
    """Every live process carrying `tag`: pid -> its environment."""
    found = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != os.getpid():
            env = _environ(int(name))
            if env.get(TAG) == tag:
                found[int(name)] = env
    return found


def _describe(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f"pid {pid}: " + f.read().replace(b"\0", b" ").decode(errors="replace")[:200]
    except OSError:
        return f"pid {pid}: (gone)"


def leftovers(tag: str, grace: float = 10.0) -> list[str]:
    """Processes carrying `tag` still alive after up to `grace` s (none, unless one is orphaned)."""
    deadline = time.monotonic() + grace
    while (alive := tagged(tag)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [_describe(pid) for pid in alive]


def kill_all(groups: list[int], tag: str) -> None:
    """SIGKILL the process groups `groups` and every process carrying `tag` (cleanup after a failure)."""
    for pgid in groups:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for pid in tagged(tag):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class TorchRun:
    """`python -m torch.distributed.run --standalone --nproc_per_node N ARGS...`, its output in `log`."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str], nproc: int = 2):
        self.tag, self.log = uuid.uuid4().hex, log
        path = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        full = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            **env,
            "PYTHONPATH": path,
            TAG: self.tag,
        }
        with open(log, "w") as f:  # a file, not a pipe nobody reads, which could fill and block the job
            self.p = subprocess.Popen(
                [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args],
                cwd=ROOT,
                env=full,
                stdout=f,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def ranks(self) -> dict[int, int]:
        """rank -> pid of the launcher's workers (its own children; their DataLoader workers carry RANK too)."""
        return {
            int(env["RANK"]): pid for pid, env in tagged(self.tag).items() if "RANK" in env and _ppid(pid) == self.p.pid
        }

    def kill_rank_when(self, rank: int, ready: Callable[[int], bool], timeout: float = 120.0) -> int:
        """SIGKILL worker `rank` once `ready(its pid)` holds (polled every 5 ms); returns its pid. Fails if the job
        ends first or the moment never comes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.p.poll() is None, (
                f"the job ended (exit {self.p.returncode}) before the kill:\n{self.output()[-3000:]}"
            )
            pid = self.ranks().get(rank)
            if pid is not None and ready(pid):
                os.kill(pid, signal.SIGKILL)
                return pid
            time.sleep(0.005)
        self.abort()
        raise AssertionError(f"rank {rank} never reached the kill point:\n{self.output()[-3000:]}")

    def finish(self, timeout: float = LAUNCHER_BOUND_S) -> int:
        """The launcher's exit code; a launcher still running after `timeout` s is killed with its job (a hang)."""
        try:
            return self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.abort()
            raise AssertionError(
                f"the launcher hung: still running {timeout:.0f} s later\n{self.output()[-3000:]}"
            ) from None

    def leftovers(self, grace: float = 10.0) -> list[str]:
        """Processes of this job still alive `grace` s after the launcher ended (none, unless one is orphaned)."""
        return leftovers(self.tag, grace)

    def abort(self) -> None:
        """Kill the launcher's session and every process of the job (cleanup after a failure)."""
        kill_all([self.p.pid], self.tag)
        self.p.wait(timeout=30)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Ranks:
    """The ranks of one job started by hand with the environment torchrun gives them, but no launcher watching:
    when one dies, the others must end by themselves. Rank r's stdout and stderr go to `logs/r.out`, `logs/r.err`."""

    def __init__(
        self, args: list[str], logs: Path, env: dict[str, str], rank_env: dict[int, dict[str, str]], world: int = 2
    ):
        self.tag, self.logs = uuid.uuid4().hex, logs
        logs.mkdir(parents=True, exist_ok=True)
        port, path = _free_port(), os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        self.procs = []
        for r in range(world):
            full = {
                **os.environ,
                "OMP_NUM_THREADS": "1",
                "HF_HUB_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false",
                **env,
                **rank_env.get(r, {}),
                "PYTHONPATH": path,
                TAG: self.tag,
                "RANK": str(r),
                "LOCAL_RANK": str(r),
                "WORLD_SIZE": str(world),
                "LOCAL_WORLD_SIZE": str(world),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
            }
            with open(logs / f"{r}.out", "w") as out, open(logs / f"{r}.err", "w") as err:
                self.procs.append(
                    subprocess.Popen(
                        [sys.executable, *args], cwd=ROOT, env=full, stdout=out, stderr=err, start_new_session=True
                    )
                )

    def err(self, rank: int) -> str:
        return (self.logs / f"{rank}.err").read_text(errors="replace")

    def kill_when(self, rank: int, ready: Callable[[int], bool], timeout: float = 120.0) -> int:
        """SIGKILL rank `rank` once `ready(its pid)` holds (polled every 5 ms); returns its pid."""
        p, deadline = self.procs[rank], time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert p.poll() is None, f"rank {rank} ended (exit {p.returncode}) before the kill:\n{self.err(rank)}"
            if ready(p.pid):
                p.kill()
                p.wait()
                return p.pid
            time.sleep(0.005)
        self.abort()
        raise AssertionError(f"rank {rank} never reached the kill point:\n{self.err(rank)[-3000:]}")

    def finish(self, rank: int, timeout: float) -> int:
        """Rank `rank`'s exit code; one still running after `timeout` s is killed with the job (a hang)."""
        try:
            return self.procs[rank].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.abort()
            raise AssertionError(
                f"rank {rank} hung: still running {timeout:.0f} s after the other died\n{self.err(rank)[-3000:]}"
            ) from None

    def leftovers(self, grace: float = 10.0) -> list[str]:
        return leftovers(self.tag, grace)

    def abort(self) -> None:
        kill_all([p.pid for p in self.procs], self.tag)
        for p in self.procs:
            p.wait(timeout=30)
