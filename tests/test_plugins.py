"""Plug-ins through Python entry points: other packages add teacher back-ends (`biomed_distill.teachers`) and loss
terms (`biomed_distill.losses`). An installed package is faked by monkeypatching `importlib.metadata.entry_points`
to return real `EntryPoint`s that point at a module written into tmp_path.
"""

from __future__ import annotations

import importlib.metadata
import sys
import textwrap

import pytest
import torch

from distill.losses import LOSSES
from teachers import BACKENDS, PluginLoadError, Registry, Teacher, load_teacher, resolve_spec
from teachers.registry import TEACHER_ALIASES

PLUGIN = '''
from teachers import load_teacher

LOADS = []


def load(spec, device="cpu"):
    """A lab's back-end: `tinyoc:FOLDER` is the tiny open_clip teacher in FOLDER."""
    LOADS.append(spec.target)
    return load_teacher(f"local-dir:{spec.target}", device=device)


def not_a_teacher(spec, device="cpu"):
    return "a string"


class MyLoss:
    uses_teachers = False
'''


@pytest.fixture
def installed(tmp_path, monkeypatch):
    """Installs fake entry points; returns a function taking (name, value, group) triples."""
    (tmp_path / "lab_plugin.py").write_text(textwrap.dedent(PLUGIN))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "lab_plugin", raising=False)

    def install(*eps):
        fake = [importlib.metadata.EntryPoint(name=n, value=v, group=g) for n, v, g in eps]
        monkeypatch.setattr(
            importlib.metadata,
            "entry_points",
            lambda group=None: [ep for ep in fake if group is None or ep.group == group],
        )

    yield install
    for name in list(BACKENDS._loaded):  # forget what the fake plug-ins loaded
        BACKENDS._items.pop(name)
        BACKENDS._loaded.discard(name)


def test_a_teacher_back_end_entry_point_is_picked_up(installed, tiny_teachers):
    installed(("tinyoc", "lab_plugin:load", "biomed_distill.teachers"))
    folder = tiny_teachers["oc"].removeprefix("local-dir:")
    assert "tinyoc" in BACKENDS and "tinyoc" in BACKENDS.list()
    spec = resolve_spec(f"tinyoc:{folder}")
    assert (spec.kind, spec.backend, spec.target) == ("tinyoc", "tinyoc", folder)

    t = load_teacher(f"tinyoc:{folder}")
    assert isinstance(t, Teacher) and t.spec == f"tinyoc:{folder}"
    assert sys.modules["lab_plugin"].LOADS == [folder]  # loaded lazily, once asked for
    ref = load_teacher(tiny_teachers["oc"])
    img = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(t.encode_image(img), ref.encode_image(img))

    TEACHER_ALIASES.add("lab-tiny", f"tinyoc:{folder}")  # an alias may name a plug-in SPEC
    try:
        assert resolve_spec("lab-tiny") == spec.__class__("tinyoc", folder, f"tinyoc:{folder}")
    finally:
        TEACHER_ALIASES._items.pop("lab-tiny")


def test_unknown_prefixes_and_bad_plug_ins_are_refused_with_the_entry_point_named(installed, tiny_teachers):
    installed(
        ("broken", "lab_plugin_missing:load", "biomed_distill.teachers"),
        ("liar", "lab_plugin:not_a_teacher", "biomed_distill.teachers"),
        ("hf-clip", "lab_plugin:load", "biomed_distill.teachers"),
    )  # shadows a built-in prefix: ignored
    with pytest.raises(ValueError, match="unknown prefix"):
        resolve_spec("s3:bucket/x")  # no such entry point: the built-in parser's message
    with pytest.raises(PluginLoadError, match=r"'broken'.*'lab_plugin_missing:load'.*biomed_distill\.teachers"):
        load_teacher("broken:x")
    with pytest.raises(TypeError, match=r"'liar' back-end.*returned str"):
        load_teacher("liar:x")
    assert resolve_spec(tiny_teachers["hf"]).kind == "hf-clip"  # the built-in still parses it


def test_registry_loads_entry_points_lazily_and_code_wins(installed):
    installed(
        ("mine", "lab_plugin:MyLoss", "g"),
        ("taken", "lab_plugin:MyLoss", "g"),
        ("other", "lab_plugin:MyLoss", "another group"),
    )
    reg: Registry[object] = Registry("thing", entry_point_group="g")
    reg.add("taken", 1)
    with pytest.warns(UserWarning, match="entry point 'taken'.*ignored: a built-in thing has that name"):
        assert reg.list() == ["mine", "taken"]  # "other" is another group's
    assert reg._items == {"taken": 1}  # listing loads nothing
    assert reg.get("mine") is sys.modules["lab_plugin"].MyLoss and reg.get("taken") == 1
    with pytest.raises(KeyError, match="did you mean mine"):
        reg.get("mien")
    assert "other" not in Registry("thing") and Registry("thing").list() == []  # no group: no plug-ins


def test_loss_terms_come_from_the_biomed_distill_losses_group(installed):
    installed(("lab_loss", "lab_plugin:MyLoss", "biomed_distill.losses"))
    try:
        assert "lab_loss" in LOSSES and LOSSES.get("lab_loss") is sys.modules["lab_plugin"].MyLoss
    finally:
        LOSSES._items.pop("lab_loss", None)
        LOSSES._loaded.discard("lab_loss")
