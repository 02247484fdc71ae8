"""The BiomedCLIP-architecture student: presets, build, projection heads, freezing, export and load.

Names load lazily (PEP 562) so `student.tokenizer` and `student.presets` stay light: `distill tokenizer`
should not pay for importing torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "build": ["StudentBundle", "build_student", "instantiate", "write_text_config"],
    "export": ["export_checkpoint", "export_student", "load_student", "push_to_hub", "resolve_checkpoint"],
    "freeze": ["ParamSummary", "apply_freezing", "freeze_image_blocks", "lock_text_layers", "parameter_summary",
               "set_grad_checkpointing", "set_patch_dropout"],
    "heads": ["ProjectionHeads"],
    "presets": ["PRESETS", "StudentPreset", "get_preset", "list_presets", "register_preset"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'student' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
