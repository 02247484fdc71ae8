"""Logging for the command line: our own INFO lines (what a run decided: threads, routing counts, resumes) are
shown, libraries' INFO lines (open_clip's root-logger chatter, accelerate's one line per saved file) only with
`-v`, which shows everything at DEBUG."""
from __future__ import annotations

import logging

OUR_PACKAGES = ("distill", "cache", "student", "teachers")


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not verbose:
        for name in OUR_PACKAGES:
            logging.getLogger(name).setLevel(logging.INFO)
