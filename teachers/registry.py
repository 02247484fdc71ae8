"""Aliases for the real biomedical teachers, plug-in back-ends, and `load_teacher`, the one way from SPEC to Teacher.

timm-style: `list_teachers("*clip*")` matches with fnmatch; an unknown alias suggests near matches.
Other packages add back-ends without touching this one: an entry point in the `biomed_distill.teachers` group
named PREFIX, pointing at `load(spec: Spec, device) -> Teacher`, makes `PREFIX:TARGET` a valid SPEC.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from teachers.kernel.registry import Registry
from teachers.spec import PREFIXES, Spec, TeacherLoadError, parse_spec, training_run_message

if TYPE_CHECKING:  # torch loads with a back-end, not with the registry: `distill cache` checks SPECs before it
    import torch

    from teachers.base import Teacher

TEACHER_ALIASES: Registry[str] = Registry("teacher alias")
# Back-ends from other installed packages, by SPEC prefix; the built-in ones (PREFIXES) are dispatched below.
BACKENDS: Registry = Registry("teacher back-end", entry_point_group="biomed_distill.teachers")

for _name, _spec in {
    "biomedclip": "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224",
    "quiltnet-b32": "hf-hub:wisdomik/QuiltNet-B-32",
    "quiltnet-b16": "hf-hub:wisdomik/QuiltNet-B-16",
    "genmedclip": "hf-hub:wisdomik/GenMedClip",
    "plip": "hf-clip:vinid/plip",
    "pubmedclip": "hf-clip:flaviagiammarino/pubmed-clip-vit-base-patch32",
    # SiglipModel, 448 px, 64 tokens, sigmoid (logit_bias); gated: accept the Health AI Developer Foundations terms
    "medsiglip": "hf:google/medsiglip-448",
    # the repo's own code (needs --trust-remote-code); gated; its evaluation calls encode_image / encode_text
    "conceptclip": "hf:JerrryNie/ConceptCLIP",
}.items():
    TEACHER_ALIASES.add(_name, _spec)


def register_teacher(name: str, spec: str) -> None:
    """Add an alias (for example a lab's own `py:` teacher) usable wherever a SPEC is."""
    _plugin_spec(spec) or parse_spec(spec)
    TEACHER_ALIASES.add(name, spec)


def list_teachers(pattern: str = "*") -> list[str]:
    return TEACHER_ALIASES.list(pattern)


def _plugin_spec(spec: str) -> Spec | None:
    """`PREFIX:TARGET` when PREFIX is a plug-in back-end (a built-in prefix always wins), else None."""
    s = spec.strip() if isinstance(spec, str) else ""
    prefix, sep, target = s.partition(":")
    if not sep or not prefix or "/" in prefix or f"{prefix}:" in PREFIXES or prefix not in BACKENDS:
        return None
    if not target:
        raise ValueError(f"SPEC {spec!r}: nothing after {prefix + ':'!r}")
    return Spec(prefix, target, spec)


def resolve_spec(spec: str) -> Spec:
    """Parse SPEC, following registry aliases to the spec they stand for; plug-in prefixes included."""
    plugin = _plugin_spec(spec)
    if plugin is not None:
        return plugin
    parsed = parse_spec(spec)
    if parsed.kind == "alias":
        target = TEACHER_ALIASES.get(parsed.target)
        return _plugin_spec(target) or parse_spec(target)
    return parsed


def _load_hint(parsed: Spec) -> str:
    """The offline hint, on the same line (the CLI prints one line); not for a model given as a local folder."""
    local = parsed.kind == "local-dir" or os.path.isdir(os.path.expanduser(parsed.target))
    if not local and os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return (
            "; hint: offline (HF_HUB_OFFLINE=1), a hub model must already be in the Hugging Face cache "
            f"({os.environ.get('HF_HUB_CACHE') or os.environ.get('HF_HOME') or '~/.cache/huggingface'}), "
            "or give a local folder (local-dir:PATH, hf:PATH)"
        )
    return ""


def _one_line(e: BaseException) -> str:
    """A library's (often multi-line) error as one line: its lines joined with ' | '."""
    return " | ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__


def _check_local_folder(parsed: Spec, spec: str) -> None:
    """Before any back-end: a `local-dir:` folder that is not there, or a training run given for a model, each
    said in words (not as the back-end's "open_clip_config.json not found")."""
    if parsed.kind not in ("local-dir", "hf", "hf-clip"):
        return
    path = os.path.expanduser(parsed.target)
    if parsed.kind == "local-dir" and not os.path.isdir(path):
        what = "is a file, not a folder" if os.path.exists(path) else "does not exist"
        raise TeacherLoadError(
            f"SPEC {spec!r}: folder {parsed.target} {what}; check the path (local-dir: takes a "
            "folder holding open_clip_config.json, e.g. one written by `distill export`)"
        )
    run = training_run_message(parsed.target, spec)
    if run:
        raise TeacherLoadError(run)


def check_spec(spec: str) -> Spec:
    """resolve_spec, plus the local-folder checks (`_check_local_folder`): everything about a SPEC that can be
    said without loading it (and without importing torch)."""
    parsed = resolve_spec(spec)
    _check_local_folder(parsed, spec)
    return parsed


def load_teacher(spec: str, device: str | torch.device = "cpu", trust_remote_code: bool = False) -> Teacher:
    """Load any SPEC as a frozen Teacher on `device` (eval mode, no gradients, autocast on GPU).

    A model that cannot be loaded raises `TeacherLoadError` naming the SPEC (the library's error chained),
    never a randomly initialised teacher.
    """
    parsed = check_spec(spec)
    if parsed.backend == "py":
        from teachers.py_teacher import load_py_teacher  # noqa: PLC0415 (lazy: torch and back-ends kept off the light CLI path that checks SPECs)

        # the user's own code: its errors are its own
        return load_py_teacher(parsed, device=device, trust_remote_code=trust_remote_code)
    try:
        if parsed.backend == "open_clip":
            from teachers.open_clip_teacher import OpenClipTeacher  # noqa: PLC0415 (lazy: torch and back-ends kept off the light CLI path that checks SPECs)

            teacher: Teacher = OpenClipTeacher(parsed, device=device)
        elif parsed.backend in ("hf", "hf-clip"):
            from teachers.hf_teacher import HFTeacher  # noqa: PLC0415 (lazy: torch and back-ends kept off the light CLI path that checks SPECs)

            teacher = HFTeacher(parsed, device=device, trust_remote_code=trust_remote_code)
        else:  # a plug-in back-end (resolve_spec only returns kinds that BACKENDS has)
            teacher = _load_plugin_teacher(parsed, device, trust_remote_code)
    except (OSError, RuntimeError) as e:
        if isinstance(e, OSError) and e.errno is not None and not isinstance(e, FileNotFoundError):
            raise  # permission, full disk, too many open files: the environment's, named by the CLI
        alias = f" (alias of {parsed.raw})" if parsed.raw != spec else ""
        raise TeacherLoadError(
            f"cannot load teacher SPEC {spec!r}{alias} with the {parsed.backend} back-end: "
            f"{_one_line(e)}{_load_hint(parsed)}"
        ) from e
    return teacher.to_device(device)


def _load_plugin_teacher(parsed: Spec, device: str | torch.device, trust_remote_code: bool = False) -> Teacher:
    """Call a plug-in back-end's `load(spec, device)` (with `trust_remote_code=` when it takes one) and check that
    it kept the Teacher contract."""
    from teachers.base import Teacher  # noqa: PLC0415 (lazy: torch and back-ends kept off the light CLI path that checks SPECs)
    from teachers.py_teacher import accepted_kwargs  # noqa: PLC0415 (lazy: torch and back-ends kept off the light CLI path that checks SPECs)

    load = BACKENDS.get(parsed.kind)
    teacher = load(parsed, **accepted_kwargs(load, device=device, trust_remote_code=trust_remote_code))
    if not isinstance(teacher, Teacher):
        raise TypeError(
            f"SPEC {parsed.raw!r}: the {parsed.kind!r} back-end (entry point group "
            f"{BACKENDS.entry_point_group!r}) returned {type(teacher).__name__}, expected a "
            "teachers.Teacher subclass instance"
        )
    teacher.spec = parsed.raw
    return teacher
