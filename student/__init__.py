"""The BiomedCLIP-architecture student: presets, build, freezing, export and load.

Projection heads live in distill.training.heads.

Names load lazily (PEP 562) so `student.tokenizer` and `student.presets` stay light: `distill tokenizer`
should not pay for importing torch.
"""

from __future__ import annotations

from teachers.kernel.lazy_exports import lazy_exports

_EXPORTS = {
    "build": ["StudentBundle", "build_student", "instantiate", "write_text_config"],
    "export": ["export_checkpoint", "export_student", "load_student", "push_to_hub", "resolve_checkpoint"],
    "freeze": [
        "ParamSummary",
        "apply_freezing",
        "freeze_image_blocks",
        "lock_text_layers",
        "parameter_summary",
        "set_grad_checkpointing",
        "set_patch_dropout",
    ],
    "presets": ["PRESETS", "StudentPreset", "get_preset", "list_presets", "register_preset"],
}
__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
