"""Reading a config file's text, with a message that says what is wrong with the path.

Why: `Path.is_file()` is false for a missing file, a folder, a device (`--config /dev/zero`) and a FIFO alike, and
`read_text()` on a device never ends; each gets its own one-line answer here, and a file over MAX_CONFIG_BYTES
is refused before it is read (a config is a few KB; a multi-GB file named by mistake must not be loaded whole).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path

from teachers.kernel.config_model import ConfigError

MAX_CONFIG_BYTES = 1 << 20  # 1 MiB; the configs shipped in configs/ are under 4 KB
_KINDS = {
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFIFO: "a pipe",
    stat.S_IFSOCK: "a socket",
}


def read_config_text(path: str | Path, what: str = "config file") -> str:
    """The UTF-8 text of `path`; ConfigError naming the path and the problem (missing, folder, device or pipe,
    over MAX_CONFIG_BYTES, not text). A permission error stays an OSError (the environment's: exit 1)."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except NotADirectoryError:
        raise ConfigError(f"{what} {path}: a part of this path is a file, not a folder; check the path") from None
    if stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{what} {path} is a folder; give a YAML file (e.g. configs/tiny-hybrid.yaml)")
    if not stat.S_ISREG(st.st_mode):  # a pipe too: the config is read twice (checked before torch, then loaded)
        kind = _KINDS.get(stat.S_IFMT(st.st_mode), "a special file")
        raise ConfigError(
            f"{what} {path} is {kind}, not a regular file; give a YAML file (write a generated config to a file first)"
        )
    if st.st_size > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"{what} {path} is {st.st_size:,} bytes, over the {MAX_CONFIG_BYTES:,}-byte limit of a "
            "config file; is it the right file?"
        )
    with open(path, "rb") as f:  # PermissionError propagates, naming the file
        data = f.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"{what} {path} grew over the {MAX_CONFIG_BYTES:,}-byte limit of a config file while being read"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} {path} is not UTF-8 text (byte {e.start}); is it the right file?") from None


def split_argv(argv: Sequence[str]) -> tuple[str, list[str]]:
    """(config path, overrides) from `--config PATH [section.key=value ...]`; ConfigError for anything else."""
    argv, path, overrides = list(argv), None, []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--config" and i + 1 < len(argv):
            path, i = argv[i + 1], i + 2
            continue
        if a.startswith("--config="):
            path = a.split("=", 1)[1]
        elif a.startswith("-"):
            raise ConfigError(
                f"unknown option {a!r}; usage: --config CONFIG.yaml [section.key=value ...] (--help lists the keys)"
            )
        else:
            overrides.append(a)
        i += 1
    if path is None:
        raise ConfigError("missing --config CONFIG.yaml (usage: --config CONFIG.yaml [section.key=value ...])")
    return path, overrides
