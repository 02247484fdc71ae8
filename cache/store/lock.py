"""One writer per file or folder: a lock file holding the writer's pid and host (`FEATURES.h5.lock`, `RUN/.lock`).

Created with O_EXCL so two writers cannot both win. A lock left by a killed writer (same host, pid gone) is
stale and taken over with a warning; a live one is refused with the pid named, so nothing is overwritten.
"""

from __future__ import annotations

import json
import logging
import os
import socket

from cache.store.schema import CacheError

log = logging.getLogger(__name__)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class WriterLock:
    """Context manager: `with WriterLock("features.h5"): ...` holds `features.h5.lock`.

    `lock_path` puts the lock elsewhere (a run folder locks `RUN/.lock`); `error` is the exception type raised when
    the lock is held, so each caller's refusal reads as its own kind of error.
    """

    def __init__(self, path: str, lock_path: str | None = None, error: type[Exception] = CacheError):
        self.path = os.fspath(lock_path) if lock_path is not None else os.fspath(path) + ".lock"
        self.target = os.fspath(path)
        self.error = error
        self.held = False

    def _holder(self) -> dict | None:
        try:
            with open(self.path) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, OSError):
            return {}  # half-written by a writer killed mid-create: treat as stale

    def acquire(self) -> WriterLock:
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None:
                    continue  # released between our two calls: try again
                pid, host = holder.get("pid"), holder.get("host")
                if pid == me["pid"] and host == me["host"]:
                    raise self.error(f"{self.target} is already being written by this process") from None
                if host not in (None, me["host"]):
                    raise self.error(
                        f"{self.target} is locked by pid {pid} on host {host} ({self.path}); if no "
                        f"writer is running there, delete {self.path} and rerun"
                    ) from None
                if isinstance(pid, int) and _pid_alive(pid):
                    raise self.error(
                        f"{self.target} is being written by another process (pid {pid}) on host "
                        f"{host}, so it is in use; wait for it to finish, or if that process is not "
                        f"writing it, delete {self.path}"
                    ) from None
                log.warning(
                    "taking over the stale lock %s: its writer (pid %s on host %s) is gone",
                    self.path,
                    pid,
                    host or me["host"],
                )
                try:  # stale: its writer is gone
                    os.remove(self.path)
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise self.error(f"could not take the lock {self.path}; delete it if no writer is running")

    def release(self) -> None:
        if self.held:
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
            self.held = False

    def __enter__(self) -> WriterLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
