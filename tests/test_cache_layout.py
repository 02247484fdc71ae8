"""The HDF5 layout is named in one module (`cache.store.layout`), and modalities are one typed structure (issue 9).

Why: the writer, reader, inspector, verifier and builder all walk the same tree; a path spelled twice drifts.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import h5py
import numpy as np
import pytest

import cache.store.layout as L
import cache.store.writer as W
from cache.store.reader import FeatureReader
from teachers.kernel.modality import MODALITIES, Modality, Pair

ROOT = Path(__file__).resolve().parents[1]
# a dataset path of the cache: teachers/..., bad/..., views/... (with or without a leading slash)
PATH_LIKE = re.compile(r"(^|[\s'\"/(])/?(teachers|bad|views)/")


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the Constant nodes that are docstrings (the layout may be described in prose)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def path_literals(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every string literal (f-string parts too) that spells a cache dataset path."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    docs = _docstrings(tree)
    return sorted(
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in docs
        and PATH_LIKE.search(node.value)
    )


def test_only_the_layout_module_spells_dataset_paths():
    found = [
        f"{p.relative_to(ROOT)}:{line}: {text!r}"
        for room in ("cache", "distill")
        for p in sorted((ROOT / room).rglob("*.py"))
        if p != ROOT / "cache" / "store" / "layout.py"
        for line, text in path_literals(p)
    ]
    assert found == [], "use cache.store.layout's names instead of spelling these paths:\n" + "\n".join(found)


def test_the_path_check_sees_literals_and_f_strings(tmp_path):
    """The check above would catch what it forbids (and not prose in a docstring)."""
    src = tmp_path / "m.py"
    src.write_text(
        '"""/teachers/NAME/image in prose is fine."""\n'
        'a = f["teachers/oc/done"]\nb = f[f"teachers/{t}/image"]\nc = "bad/rows"\nd = "views/params"\n'
        'e = "teachers"\n'
    )
    assert [line for line, _ in path_literals(src)] == [2, 3, 4, 5]


def test_layout_names():
    assert L.teacher("oc") == "teachers/oc"
    assert L.feature("oc", Modality.IMAGE) == "teachers/oc/image"
    assert L.feature("oc", "text") == "teachers/oc/text"
    assert L.done("oc") == "teachers/oc/done" and L.stats("oc") == "teachers/oc/stats"
    assert (L.BAD_ROWS, L.BAD_KEYS, L.BAD_REASONS, L.VIEW_PARAMS) == (
        "bad/rows",
        "bad/keys",
        "bad/reasons",
        "views/params",
    )
    assert L.STATS_FIELDS == ("image_mean", "image_cov", "text_mean", "text_cov")
    assert [L.row_chunk(n, 256) for n in (0, 1, 100, 256, 10_000)] == [1, 1, 100, 256, 256]
    with pytest.raises(ValueError):
        L.feature("oc", "audio")


def test_a_folded_file_has_exactly_the_layouts_tree(tmp_path):
    """Writer output, walked with h5py: every name, shape, chunk and checksum flag is what the layout says."""
    out = str(tmp_path / "f.h5")
    n, d, k = 10, 4, 2
    W.create_file(out, [f"k{i}" for i in range(n)], fingerprint="fp", source="c.csv")
    W.add_views(out, np.zeros((n, k, 5), np.float32), {"seed": 3}, h5_chunk_rows=4)
    W.write_meta(
        out,
        "t",
        {
            "attrs": {"spec": "x", "embed_dim": d, "views": k},
            "dtype": "float16",
            "fingerprint": "fp",
            "h5_chunk_rows": 4,
        },
    )
    rows = np.arange(1, n)
    image = np.zeros((len(rows), k, d), np.float16)
    image[..., 0] = 1
    text = np.zeros((len(rows), d), np.float16)
    text[:, 1] = 1
    W.write_part(out, "t", rows, image, text, bad_rows=[0], bad_reasons=["broken image"])
    assert W.fold(out) == {"t": 9}
    with h5py.File(out, "r") as f:
        names = []
        f.visit(names.append)
        assert sorted(names) == sorted(
            [
                L.KEYS,
                L.VIEWS,
                L.VIEW_PARAMS,
                L.TEACHERS,
                L.teacher("t"),
                L.feature("t", Modality.IMAGE),
                L.feature("t", Modality.TEXT),
                L.done("t"),
                L.stats("t"),
                *(f"{L.stats('t')}/{s}" for s in L.STATS_FIELDS),
                L.BAD,
                L.BAD_ROWS,
                L.BAD_KEYS,
                L.BAD_REASONS,
            ]
        )
        assert dict(f.attrs)[L.Root.NUM_ROWS] == n and f.attrs[L.Root.SOURCE] == "c.csv"
        img, _txt, done = f[L.feature("t", "image")], f[L.feature("t", "text")], f[L.done("t")]
        # format 2: features, keys and views are virtual datasets over files in the segment folder
        assert all(f[x].is_virtual for x in (L.feature("t", "image"), L.feature("t", "text"), L.KEYS, L.VIEW_PARAMS))
        assert (img.shape, img.dtype, L.chunk_rows_of(img), L.chunk_rows_of(f[L.VIEW_PARAMS])) == (
            (n, k, d),
            np.float16,
            4,
            4,
        )
        (src,) = {vs.file_name for vs in img.virtual_sources()}
        assert src.startswith("f.h5.segments/run-") and f.attrs[L.Root.SEGMENTS] == "f.h5.segments"
        with h5py.File(tmp_path / src, "r") as s:  # the segment: the same teacher tree, chunked and checksummed
            si, st = s[L.feature("t", "image")], s[L.feature("t", "text")]
            assert (si.shape, si.chunks, si.fletcher32, si.dtype) == ((n, k, d), (4, k, d), True, np.float16)
            assert (st.shape, st.chunks, st.fletcher32) == ((n, d), (4, d), True)
        assert (done.chunks, done.fletcher32, done[:].tolist()) == ((n,), True, [False] + [True] * 9)  # checksummed
        assert int(f.attrs[L.Root.VERSION]) == 2
        np.testing.assert_array_equal(img[1:], image)  # read through the mapping
        assert np.isnan(img[0]).all()  # the bad row was never stored: NaN, not a zero vector
        assert f[L.BAD_KEYS].asstr()[:].tolist() == ["k0"] and f[L.BAD_REASONS].asstr()[0] == "broken image"
        np.testing.assert_allclose(f[f"{L.stats('t')}/text_mean"][:], [0, 1, 0, 0])


def test_reader_returns_typed_embeddings(tmp_path):
    out = str(tmp_path / "f.h5")
    W.create_file(out, ["a", "b", "c"], fingerprint="fp", source="c.csv")
    W.write_meta(
        out, "t", {"attrs": {"spec": "x", "embed_dim": 2, "views": 0}, "dtype": "float32", "fingerprint": "fp"}
    )
    W.write_part(out, "t", np.arange(3), np.eye(3, 2, dtype=np.float32), np.eye(3, 2, 1, dtype=np.float32))
    W.fold(out)
    with FeatureReader(out) as r:
        got = r.read([2, 0])
    e = got["t"]
    assert isinstance(e, Pair)
    np.testing.assert_array_equal(e.image, [[0, 0], [1, 0]])
    np.testing.assert_array_equal(e.text, [[0, 0], [0, 1]])
    assert e[Modality.TEXT] is e.text and e["image"] is e.image
    assert [m for m, _ in e.items()] == [Modality.IMAGE, Modality.TEXT]


def test_pair_and_modality():
    assert MODALITIES == (Modality.IMAGE, Modality.TEXT) and Modality.IMAGE == "image" and f"{Modality.TEXT}" == "text"
    p = Pair.build(lambda m: m.value.upper())
    assert p == Pair("IMAGE", "TEXT") and p.map(len) == Pair(5, 4)
    with pytest.raises(ValueError):
        p["audio"]
    with pytest.raises(AttributeError):
        p.image = "x"  # frozen
