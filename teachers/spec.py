"""The one parser for model SPEC strings (docs/teachers.md): which back-end loads a model, and from where.

Forms: `hf-hub:org/repo`, `local-dir:PATH`, `MODEL/PRETRAINED_TAG` (open_clip built-in), `hf:ID_OR_PATH` (any
`transformers` dual encoder; `hf-clip:ID_OR_PATH` is the same back-end), `py:module:function`, or a registry alias
(`biomedclip`, `plip`, ...). A bare string that looks like a
path is refused with the prefix to use, as timm's `parse_model_name` does.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

PREFIXES = ("hf-hub:", "local-dir:", "hf-clip:", "hf:", "py:")


class TeacherLoadError(ValueError):
    """A SPEC that parses but whose model cannot be loaded (missing folder or weights, not in the offline cache, a
    `py:` module or function that is not there, a training run folder given for a model)."""


@dataclass(frozen=True)
class Spec:
    """A parsed SPEC: `kind` picks the back-end, `target` is passed to it untouched."""

    kind: str  # "hf-hub" | "local-dir" | "open_clip" | "hf" | "hf-clip" | "py" | "alias" | a plug-in's prefix
    target: str
    raw: str

    @property
    def backend(self) -> str:
        return {"hf-hub": "open_clip", "local-dir": "open_clip", "open_clip": "open_clip"}.get(self.kind, self.kind)


def parse_spec(spec: str) -> Spec:
    """Parse a SPEC string; raise ValueError with the right form when it is malformed."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(
            "empty model SPEC; expected one of hf-hub:ORG/REPO, local-dir:PATH, "
            "MODEL/TAG, hf:ID_OR_PATH, py:module:function or a registry alias"
        )
    s = spec.strip()
    for prefix in PREFIXES:
        if s.startswith(prefix):
            rest = s[len(prefix) :]
            if not rest:
                raise ValueError(f"SPEC {spec!r}: nothing after {prefix!r}")
            kind = prefix[:-1]
            if kind == "py" and rest.count(":") != 1:
                raise ValueError(f"SPEC {spec!r}: expected py:module.path:function")
            if kind == "hf-hub" and rest.count("/") != 1:
                raise ValueError(f"SPEC {spec!r}: expected hf-hub:ORG/REPO")
            return Spec(kind, rest, spec)
    if ":" in s.split("/")[0] and not os.path.exists(s):
        raise ValueError(f"SPEC {spec!r}: unknown prefix; known prefixes are {', '.join(PREFIXES)}")
    looks_like_path = s.startswith((".", "/", "~")) or os.sep in s and os.path.exists(s) or os.path.isdir(s)
    run = training_run_message(s, spec) if looks_like_path else None
    if run:
        raise ValueError(run)
    if looks_like_path:
        hint = (
            "hf:"
            if os.path.isfile(os.path.join(s, "config.json"))
            and not os.path.isfile(os.path.join(s, "open_clip_config.json"))
            else "local-dir:"
        )
        raise ValueError(f"SPEC {spec!r} looks like a path; write {hint}{s}")
    if "/" in s:
        model, _, tag = s.partition("/")
        if not model or not tag or "/" in tag:
            raise ValueError(f"SPEC {spec!r}: expected MODEL/PRETRAINED_TAG (open_clip built-in)")
        return Spec("open_clip", s, spec)
    return Spec("alias", s, spec)


# What `distill train` writes into a run folder (student.run_files: the bottom room cannot import it).
_RUN_FILES = ("run_meta.json", "log.jsonl")
_CHECKPOINT_FILE = "train_state.json"
_RUN_STUDENT_DIRS = ("student", "student-config")  # the run's config-only student folder (no weights)
_CHECKPOINT = re.compile(r"checkpoint-\d+")


def training_run_message(path: str, spec: str) -> str | None:
    """A message when `path` is a training run (or a checkpoint, or the run's config-only student folder) given
    where a model is expected: say what it is and that `distill export` makes a model of it; else None.

    Why: a first-time user evaluates the run folder right after training; "cannot load teacher SPEC ..." does not
    tell them that a run must be exported first.
    """
    folder = os.path.normpath(os.path.expanduser(path))
    if not os.path.isdir(folder) or _is_model(folder):
        return None
    parent = os.path.dirname(folder)
    if os.path.isfile(os.path.join(folder, _CHECKPOINT_FILE)) or _CHECKPOINT.fullmatch(os.path.basename(folder)):
        what, run = "a training checkpoint", path
    elif _is_run(folder):
        what, run = "a training run folder", path
    elif os.path.basename(folder) in _RUN_STUDENT_DIRS and _is_run(parent):
        what, run = "the config-only student folder of a training run (no weights)", parent
    else:
        return None
    return (
        f"SPEC {spec!r}: {path} is {what}, not an exported model; export it first with `distill export {run} "
        f"--out STUDENT_DIR`, then give local-dir:STUDENT_DIR"
    )


def _is_model(folder: str) -> bool:
    """A model config (open_clip's or transformers') beside a weights file: a model, wherever it sits."""
    names = _listdir(folder)
    return any(n in names for n in ("open_clip_config.json", "config.json")) and any(
        n.endswith((".safetensors", ".bin")) for n in names
    )


def _is_run(folder: str) -> bool:
    """run_meta.json or log.jsonl, or a checkpoint-STEP folder inside: what `distill train` leaves."""
    return any(os.path.isfile(os.path.join(folder, f)) for f in _RUN_FILES) or any(
        _CHECKPOINT.fullmatch(e) and os.path.isdir(os.path.join(folder, e)) for e in _listdir(folder)
    )


def _listdir(folder: str) -> list[str]:
    try:
        return os.listdir(folder)
    except OSError:
        return []
