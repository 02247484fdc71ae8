"""Teachers: frozen biomedical CLIP models behind one interface, loaded from a SPEC string.

The bottom room: it imports none of `cache`, `student`, `distill`, so what every room needs (the generic
`Registry`, the package version) lives here too. Names load lazily (PEP 562), as in `student`, so reading the
version or parsing a SPEC does not pay for importing torch.
"""

from __future__ import annotations

from teachers.kernel.lazy_exports import lazy_exports

_EXPORTS = {
    "base": ["Teacher"],
    "kernel.registry": ["PluginLoadError", "Registry"],
    "registry": ["BACKENDS", "TeacherLoadError", "list_teachers", "load_teacher", "register_teacher", "resolve_spec"],
    "spec": ["Spec", "parse_spec"],
    "transforms": ["PreprocessCfg", "apply_view", "make_eval_transform", "make_view_transform"],
    "kernel.version": ["package_version"],
}
__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
