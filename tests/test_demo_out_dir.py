"""`distill demo --out DIR` replaces only a previous demo folder; a user's folder (e.g. `--out .`) is left alone."""

from __future__ import annotations

import pytest

from distill.cli import main
from distill.demo import MARKER, prepare_out_dir


def test_previous_demo_is_replaced_and_marked(tmp_path):
    out = tmp_path / "demo-out"
    prepare_out_dir(out)
    assert [p.name for p in out.iterdir()] == [MARKER]
    (out / "features.h5").write_bytes(b"old run")
    prepare_out_dir(out)  # a rerun: the old demo's files go, the marker is written again
    assert [p.name for p in out.iterdir()] == [MARKER]


def test_demo_folder_from_before_the_marker_is_recognised_by_its_summary(tmp_path):
    out = tmp_path / "demo-out"
    out.mkdir()
    (out / "demo_summary.json").write_text("{}")
    prepare_out_dir(out)
    assert [p.name for p in out.iterdir()] == [MARKER]


def test_empty_existing_folder_is_used(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    prepare_out_dir(out)
    assert (out / MARKER).is_file()


def test_a_users_folder_is_refused_and_untouched(tmp_path, capsys):
    mine = tmp_path / "my-project"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(ValueError, match="not empty and was not written by distill demo"):
        prepare_out_dir(mine)
    assert main(["demo", "--out", str(mine)]) == 2  # the CLI prints the message, exit status 2, no traceback
    assert "choose a new --out" in capsys.readouterr().err
    assert [p.name for p in mine.iterdir()] == ["thesis.tex"]
    assert (mine / "thesis.tex").read_text() == "years of work"


def test_a_file_named_like_the_folder_is_refused(tmp_path):
    f = tmp_path / "demo-out"
    f.write_text("not a folder")
    with pytest.raises(ValueError, match="a file of that name exists"):
        prepare_out_dir(f)
    assert f.read_text() == "not a folder"
