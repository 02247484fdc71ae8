"""Teachers: frozen biomedical CLIP models behind one interface, loaded from a SPEC string."""
from .base import Teacher
from .registry import TeacherLoadError, list_teachers, load_teacher, register_teacher, resolve_spec
from .spec import Spec, parse_spec
from .transforms import PreprocessCfg, apply_view, make_eval_transform, make_view_transform

__all__ = ["Teacher", "Spec", "parse_spec", "resolve_spec", "load_teacher", "list_teachers", "register_teacher",
           "TeacherLoadError", "PreprocessCfg", "apply_view", "make_eval_transform", "make_view_transform"]
