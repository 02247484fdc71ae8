"""`py:module:function` back-end: custom code (PMC-CLIP, MedCLIP, UniMed-CLIP forks) returning a Teacher.

The function is called as `function(device=...)` and must return a `teachers.Teacher`; anything else is refused
with the spec named, so a mistake surfaces at load time rather than deep in the cache loop.
"""
from __future__ import annotations

import importlib
import inspect

import torch

from .base import Teacher
from .spec import Spec


def load_py_teacher(spec: Spec, device: str | torch.device = "cpu") -> Teacher:
    module_name, _, func_name = spec.target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ImportError(f"SPEC {spec.raw!r}: cannot import module {module_name!r} ({e}); "
                          "is it installed or on PYTHONPATH?") from e
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise AttributeError(f"SPEC {spec.raw!r}: module {module_name!r} has no callable {func_name!r}")
    kwargs = {"device": device} if "device" in inspect.signature(fn).parameters else {}
    teacher = fn(**kwargs)
    if not isinstance(teacher, Teacher):
        raise TypeError(f"SPEC {spec.raw!r}: {func_name}() returned {type(teacher).__name__}, "
                        "expected a teachers.Teacher subclass instance")
    teacher.spec = spec.raw
    return teacher.to_device(device)
