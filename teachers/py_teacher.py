"""`py:module:function` back-end: custom code (PMC-CLIP, MedCLIP, UniMed-CLIP forks) returning a Teacher.

The function is called as `function(device=..., trust_remote_code=...)` (each only when its signature names it) and
must return a `teachers.Teacher`; anything else is refused with the spec named, so a mistake surfaces at load time
rather than deep in the cache loop. Why pass `trust_remote_code` on: an adapter that loads a hub model with its own
code (docs/teachers.md) then runs it only when the user gave --trust-remote-code.
A module or function that is not there is bad input (a typo in the SPEC, a folder missing from PYTHONPATH): the
error is a `TeacherLoadError` (exit 2 at the command line) naming what was not found, not a bug.
"""

from __future__ import annotations

import difflib
import importlib
import inspect

import torch

from teachers.base import Teacher
from teachers.spec import Spec, TeacherLoadError


class PyModuleNotFound(TeacherLoadError, ImportError):
    """The SPEC's module (or a module it imports) cannot be imported."""


class PyFunctionNotFound(TeacherLoadError, AttributeError):
    """The SPEC's module has no callable of that name."""


class NotATeacherError(TeacherLoadError, TypeError):
    """The SPEC's function returned something other than a teachers.Teacher."""


def accepted_kwargs(fn, **kwargs) -> dict:
    """The `kwargs` that `fn`'s signature names (all of them when it takes **kwargs)."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


def _import(spec: Spec, module_name: str):
    """The SPEC's module; PyModuleNotFound saying whether the module itself or one it imports is missing."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        missing = e.name or ""
        if missing and (module_name == missing or module_name.startswith(missing + ".")):
            raise PyModuleNotFound(
                f"SPEC {spec.raw!r}: no module named {missing!r}: check the spelling, or put "
                "the folder holding it on PYTHONPATH (or install its package)"
            ) from e
        raise PyModuleNotFound(
            f"SPEC {spec.raw!r}: module {module_name!r} was found, but importing it failed: {e}; install what it needs"
        ) from e
    except ImportError as e:
        raise PyModuleNotFound(f"SPEC {spec.raw!r}: importing module {module_name!r} failed: {e}") from e


def load_py_teacher(spec: Spec, device: str | torch.device = "cpu", trust_remote_code: bool = False) -> Teacher:
    module_name, _, func_name = spec.target.partition(":")
    module = _import(spec, module_name)
    fn = getattr(module, func_name, None)
    if not callable(fn):
        where = getattr(module, "__file__", None) or module_name
        if fn is not None:
            raise PyFunctionNotFound(
                f"SPEC {spec.raw!r}: {func_name!r} in module {module_name!r} ({where}) is a "
                f"{type(fn).__name__}, not a function"
            )
        names = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n, None))]
        close = difflib.get_close_matches(func_name, names, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise PyFunctionNotFound(
            f"SPEC {spec.raw!r}: module {module_name!r} ({where}) has no callable {func_name!r}{hint}"
        )
    teacher = fn(**accepted_kwargs(fn, device=device, trust_remote_code=trust_remote_code))
    if not isinstance(teacher, Teacher):
        raise NotATeacherError(
            f"SPEC {spec.raw!r}: {func_name}() returned {type(teacher).__name__}, "
            "expected a teachers.Teacher subclass instance"
        )
    teacher.spec = spec.raw
    return teacher.to_device(device)
