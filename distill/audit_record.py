"""Which eval tasks were audited against which training corpus (`distill audit`), and what was found.

Why a record beside the feature cache: a student's run names its cache and its corpus's fingerprint
(`run_meta.json`, and an export's `training.json`), so `distill eval` can find the audits of the corpus the student
trained on from the student alone. Light (json only): eval reads it for every report.
"""

from __future__ import annotations

import json
from pathlib import Path

REGISTRY_SUFFIX = ".audits"  # FEATURES.h5.audits/FINGERPRINT.json: every task audited against that corpus


def registry_path(features: str | Path, fingerprint: str) -> Path:
    """Where the audits of the corpus with `fingerprint` are recorded: beside the cache a student's run names
    (`run_meta.json`'s `features`), so `distill eval` finds them from the student alone."""
    return Path(str(Path(features).resolve()) + REGISTRY_SUFFIX) / f"{fingerprint}.json"


def read_registry(features: str | Path, fingerprint: str) -> dict | None:
    path = registry_path(features, fingerprint)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def audit_status(features: str | Path, fingerprint: str, tasks: list[str]) -> dict[str, str]:
    """Per task, in words: whether it was audited against the corpus of `fingerprint`, and what was found."""
    done = (read_registry(features, fingerprint) or {}).get("tasks", {})
    out = {}
    for task in tasks:
        r = done.get(task)
        if r is None:
            out[task] = "never audited against the student's training corpus"
        elif r["rows"]:
            out[task] = (
                f"LEAK: {r['matched_images']} of {r['images']} images are copied by {r['rows']} rows of the "
                f"student's training corpus (cosine >= {r['threshold']}; {r['report']})"
            )
        else:
            out[task] = f"audited: none of its {r['images']} images is in the student's training corpus"
    return out


def training_audit(spec: str | None, tasks: list[str]) -> dict[str, str]:
    """`audit_status` for the student of SPEC when it is an export that records its training corpus
    (`local-dir:DIR` with DIR/training.json); {} for any other model."""
    if not spec or not spec.startswith("local-dir:"):
        return {}
    path = Path(spec.removeprefix("local-dir:")) / "training.json"
    try:
        training = json.loads(path.read_text())
        features, fingerprint = training["features"], training["corpus_fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    if not features or not fingerprint:
        return {}
    return audit_status(features, fingerprint, tasks)
