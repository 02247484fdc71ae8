"""The built-in term kinds the config checks before torch is imported are read from distill/losses' source."""

from __future__ import annotations

from pathlib import Path

from distill.config.loss_names import BUILTIN_TERMS, _registered_in_source


def test_a_new_term_module_is_found_without_an_entry_elsewhere(tmp_path: Path):
    (tmp_path / "base.py").write_text(
        "class LossTerm:\n    uses_teachers = True\n\n"
        "@register_loss(key='plain')\nclass Plain(LossTerm):\n    uses_teachers = False\n"
    )
    (tmp_path / "extra.py").write_text(
        "@register_loss(key='inherits')\nclass Inherits(Plain):\n    pass\n\n"
        "@register_loss('positional')\nclass Positional(LossTerm):\n    weight = 2\n\n"
        "class NotRegistered(LossTerm):\n    uses_teachers = False\n"
    )
    assert _registered_in_source(tmp_path) == {"plain": False, "inherits": False, "positional": True}


def test_the_project_terms_are_all_found():
    assert BUILTIN_TERMS == {
        "infonce": False,
        "siglip": False,
        "feature": True,
        "icl": True,
        "affinity": True,
        "spatial": True,
    }
