"""Modality's base on Python 3.10 (no enum.StrEnum there) behaves as 3.11's StrEnum for what the project uses."""

import enum
import json

import pytest

from teachers.kernel.modality import MODALITIES, Modality, _StrEnum310


@pytest.mark.skipif(not hasattr(enum, "StrEnum"), reason="compares with enum.StrEnum (Python >= 3.11)")
def test_fallback_str_enum_matches_stdlib():
    class Old(_StrEnum310):
        IMAGE = "image"

    class New(enum.StrEnum):  # type: ignore[name-defined,misc,unused-ignore]
        IMAGE = "image"

    for a, b in ((Old.IMAGE, New.IMAGE),):
        assert str(a) == str(b) == "image"
        assert f"{a}" == f"{b}" == "image" and f"{a:>6}" == f"{b:>6}"
        assert a == b == "image" and hash(a) == hash("image")
        assert "/".join([a, "x"]) == "image/x" and json.dumps(a) == json.dumps(b)
        assert Old("image") is Old.IMAGE


def test_modality_is_a_str():
    assert MODALITIES == (Modality.IMAGE, Modality.TEXT)
    assert f"{Modality.TEXT}" == str(Modality.TEXT) == "text" and isinstance(Modality.IMAGE, str)
