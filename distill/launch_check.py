"""Warn when a launcher was asked for more processes than the trainer got, and show the CPU recipe that works.

Why: `accelerate launch --cpu --num_processes 2 -m distill.train ...` starts ONE process (with `--cpu` the launcher
always takes its simple launcher; docs/multi-gpu.md), and `accelerate launch --multi_gpu` without
`ACCELERATE_USE_CPU=1` on a machine without GPUs starts two processes that each train alone. Both looked like a
2-process run and silently were not.
How the request is seen: torchrun and `accelerate launch --multi_gpu` export WORLD_SIZE, MPI exports its size;
accelerate's simple launcher exports only MASTER_ADDR/MASTER_PORT when given --num_processes > 1 (not the number),
so the number is read from the launcher's command line (the parent process, on Linux) when it is there.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

CPU_RECIPE = (
    "on CPU start N processes with `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N "
    "-m distill.train ...` or `ACCELERATE_USE_CPU=1 torchrun --nproc_per_node N -m distill.train ...` "
    "(docs/multi-gpu.md)"
)
_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def _flag_value(argv: Sequence[str], names: Sequence[str]) -> int | None:
    for i, a in enumerate(argv):
        for name in names:
            text = (
                argv[i + 1]
                if a == name and i + 1 < len(argv)
                else a[len(name) + 1 :]
                if a.startswith(name + "=")
                else None
            )
            if text is not None:
                try:
                    return int(text)
                except ValueError:
                    return None
    return None


def parent_cmdline() -> list[str]:
    """The parent process's argv (Linux /proc), [] where it cannot be read."""
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def requested_processes(env: Mapping[str, str], launcher_argv: Sequence[str]) -> int | None:
    """How many processes the launcher was asked for: a size variable, else (accelerate's simple launcher, which
    sets MASTER_ADDR only for several processes) its --num_processes; 2 meaning "more than one" when the number
    cannot be read; None when nothing says several were asked for."""
    for var in _SIZE_VARS:
        try:
            n = int(env.get(var, ""))
        except ValueError:
            continue
        return n
    if env.get("MASTER_ADDR") and "LOCAL_RANK" not in env and "RANK" not in env:
        flag = _flag_value(launcher_argv, ("--num_processes", "--num-processes"))
        return flag if flag is not None else 2
    return None


def process_mismatch(
    seen: int, env: Mapping[str, str] | None = None, launcher_argv: Sequence[str] | None = None
) -> str | None:
    """The warning when more processes were asked for than the trainer sees (`seen`), else None."""
    env = os.environ if env is None else env
    argv = parent_cmdline() if launcher_argv is None else list(launcher_argv)
    asked = requested_processes(env, argv)
    if asked is None or asked <= seen:
        return None
    sized = any(v in env for v in _SIZE_VARS)
    known = sized or _flag_value(argv, ("--num_processes", "--num-processes")) is not None
    cpu = str(env.get("ACCELERATE_USE_CPU", "")).lower() in ("1", "true", "yes") and not sized
    return (
        f"{asked if known else 'several'} processes were asked for, but this trainer sees {seen}"
        f"{' (`accelerate launch --cpu` always starts one)' if cpu else ''}: it trains as a {seen}-process "
        f"run; {CPU_RECIPE}"
    )
