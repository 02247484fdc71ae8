"""Logging for the command line: our own INFO lines (what a run decided: threads, routing counts, resumes) are
shown, libraries' INFO lines (open_clip's root-logger chatter, accelerate's one line per saved file) only with
`-v`, which shows everything at DEBUG on stderr.

Why our INFO lines go to stdout and only warnings and errors to stderr: a command that fails prints exactly one
line on stderr, its error (docs/reliability.md), so a script or a user reading stderr sees the failure and nothing else;
stdout already carries what a run did (its summary, the result line of `distill train`).
"""

from __future__ import annotations

import logging
import sys

OUR_PACKAGES = ("distill", "cache", "student", "teachers")
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _Below(logging.Filter):
    """Passes records under `level` (INFO to stdout; WARNING and above take the stderr handler)."""

    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < self.level


def setup_logging(verbose: bool = False) -> None:
    """Configure the root logger once (as `logging.basicConfig`: a no-op when it has handlers, e.g. in a notebook
    or under pytest); our packages log INFO, libraries WARNING, or everything at DEBUG with `verbose`."""
    root = logging.getLogger()
    if verbose:
        logging.basicConfig(level=logging.DEBUG, format=FORMAT)
        return
    if not root.handlers:
        formatter = logging.Formatter(FORMAT)
        out, err = logging.StreamHandler(sys.stdout), logging.StreamHandler(sys.stderr)
        out.addFilter(_Below(logging.WARNING))
        err.setLevel(logging.WARNING)
        for handler in (out, err):
            handler.setFormatter(formatter)
            root.addHandler(handler)
        root.setLevel(logging.WARNING)
    for name in OUR_PACKAGES:
        logging.getLogger(name).setLevel(logging.INFO)
