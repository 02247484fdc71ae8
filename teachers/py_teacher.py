"""`py:module:function` back-end: custom code (PMC-CLIP, MedCLIP, UniMed-CLIP forks) returning a Teacher.

The function is called as `function(device=..., trust_remote_code=...)` (each only when its signature names it) and
must return a `teachers.Teacher`; anything else is refused with the spec named, so a mistake surfaces at load time
rather than deep in the cache loop. Why pass `trust_remote_code` on: an adapter that loads a hub model with its own
code (docs/teachers.md) then runs it only when the user gave --trust-remote-code.
"""
from __future__ import annotations

import importlib
import inspect

import torch

from .base import Teacher
from .spec import Spec


def accepted_kwargs(fn, **kwargs) -> dict:
    """The `kwargs` that `fn`'s signature names (all of them when it takes **kwargs)."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


def load_py_teacher(spec: Spec, device: str | torch.device = "cpu", trust_remote_code: bool = False) -> Teacher:
    module_name, _, func_name = spec.target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ImportError(f"SPEC {spec.raw!r}: cannot import module {module_name!r} ({e}); "
                          "is it installed or on PYTHONPATH?") from e
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise AttributeError(f"SPEC {spec.raw!r}: module {module_name!r} has no callable {func_name!r}")
    teacher = fn(**accepted_kwargs(fn, device=device, trust_remote_code=trust_remote_code))
    if not isinstance(teacher, Teacher):
        raise TypeError(f"SPEC {spec.raw!r}: {func_name}() returned {type(teacher).__name__}, "
                        "expected a teachers.Teacher subclass instance")
    teacher.spec = spec.raw
    return teacher.to_device(device)
