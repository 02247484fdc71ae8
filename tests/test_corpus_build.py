"""`distill corpus` / cache.corpus_build: labelled data (npz, CSV, class folders) -> a shuffled training corpus."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cache.corpus_build import (
    CORPUS_COLUMNS,
    CorpusBuildError,
    CorpusSource,
    build_corpus,
    load_recipe,
    part_indices,
    template_fields,
)
from cache.sources.corpus import open_corpus
from distill.cli import main

SHARED = Path(__file__).parents[1] / "../shared/data"


def read_rows(path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture()
def npz(tmp_path) -> Path:
    """MedMNIST layout: grey train (6) and test (3) splits, labels (N, 1)."""
    rng = np.random.default_rng(0)
    p = tmp_path / "tinymnist.npz"
    np.savez(
        p,
        train_images=rng.integers(0, 256, (6, 8, 8), dtype=np.uint8),
        train_labels=np.array([[0], [1], [1], [0], [1], [1]], dtype=np.uint8),
        test_images=rng.integers(0, 256, (3, 8, 8), dtype=np.uint8),
        test_labels=np.array([[1], [0], [1]], dtype=np.uint8),
    )
    return p


@pytest.fixture()
def derm_csv(tmp_path) -> Path:
    """A HAM10000-like CSV: image, label, diagnosis, localization, site (a domain), age (one blank)."""
    d = tmp_path / "derm"
    (d / "images").mkdir(parents=True)
    rows = []
    for i in range(8):
        Image.new("RGB", (10, 10), (i * 30, 10, 200)).save(d / "images" / f"img{i}.png")
        rows.append(
            {
                "image": f"images/img{i}.png",
                "label": str(i % 2),
                "diagnosis": ["melanoma", "nevus"][i % 2],
                "localization": ["back", "face"][i // 4],
                "site": ["clinic-a", "clinic-b"][i % 2],
                "age": "" if i == 5 else str(30 + i),
            }
        )
    p = d / "train.csv"
    with open(p, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return p


def labelled_csv(tmp_path, counts: dict[str, int]) -> Path:
    """A CSV of len(sum(counts)) rows with the given label counts (images need not exist for selection tests)."""
    p = tmp_path / "many.csv"
    with open(p, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "label"])
        k = 0
        for label, n in counts.items():
            for _ in range(n):
                w.writerow([f"im/{k}.png", label])
                k += 1
    (tmp_path / "im").mkdir(exist_ok=True)
    for j in range(k):
        Image.new("L", (2, 2), j % 256).save(tmp_path / "im" / f"{j}.png")
    return p


# -- npz -----------------------------------------------------------------------------------------------
def test_npz_pngs_equal_the_arrays_and_labels_become_class_names(npz, tmp_path):
    src = CorpusSource(
        str(npz), ("a scan showing {label}",), split="train", class_names=("normal", "pneumonia"), domain="chest x-ray"
    )
    res = build_corpus([src], tmp_path / "out", shuffle=False)
    rows = read_rows(res.csv)
    assert list(rows[0])[:6] == list(CORPUS_COLUMNS) and list(rows[0])[6:] == ["split"]
    with np.load(npz) as z:
        images, labels = z["train_images"], z["train_labels"][:, 0]
    assert [r["key"] for r in rows] == [f"tinymnist/train/{i}" for i in range(6)]
    for i, r in enumerate(rows):
        with Image.open(tmp_path / "out" / r["image"]) as im:
            assert im.mode == "L"
            np.testing.assert_array_equal(np.asarray(im), images[i])
        name = ("normal", "pneumonia")[labels[i]]
        assert r["caption"] == f"a scan showing {name}" and r["label"] == name
        assert (r["domain"], r["source"], r["split"]) == ("chest x-ray", "tinymnist", "train")
    assert res.rows_per_source == {"tinymnist": 6} and res.rows_per_domain == {"chest x-ray": 6}
    assert res.classes_per_source == {"tinymnist": ("normal", "pneumonia")}
    corpus = open_corpus(res.csv)
    assert len(corpus) == 6 and corpus.captions[1] == "a scan showing pneumonia"
    np.testing.assert_array_equal(np.asarray(corpus.load_image(0).convert("L")), images[0])


def test_npz_rgb_stays_rgb_and_all_splits_without_split(tmp_path):
    rng = np.random.default_rng(1)
    p = tmp_path / "colour.npz"
    arr = rng.integers(0, 256, (3, 5, 5, 3), dtype=np.uint8)
    np.savez(
        p, train_images=arr, train_labels=np.array([[2], [0], [1]]), val_images=arr[:1], val_labels=np.array([[1]])
    )
    res = build_corpus([CorpusSource(str(p), ("class {label}",))], tmp_path / "o", shuffle=False)
    rows = read_rows(res.csv)
    assert [r["key"] for r in rows] == ["colour/train/0", "colour/train/1", "colour/train/2", "colour/val/0"]
    assert [r["caption"] for r in rows] == ["class 2", "class 0", "class 1", "class 1"]  # raw labels, no names
    assert [r["domain"] for r in rows] == ["colour"] * 4  # default: source name
    with Image.open(tmp_path / "o" / rows[2]["image"]) as im:
        assert im.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(im), arr[2])


# -- CSV and folders -----------------------------------------------------------------------------------
def test_csv_templates_domain_column_and_relative_images(derm_csv, tmp_path):
    templates = (
        "dermoscopy of a {diagnosis} on the {localization}",
        "a {diagnosis} ({label}) seen on the {localization}",
    )
    src = CorpusSource(str(derm_csv), templates, name="derm", domain_column="site", class_names=("mel", "nv"))
    out = tmp_path / "corpus"
    res = build_corpus([src], out, seed=3, shuffle=False)
    rows = read_rows(res.csv)
    assert list(rows[0]) == [*CORPUS_COLUMNS, "diagnosis", "localization", "site", "age"]
    assert [r["key"] for r in rows] == [f"derm/images/img{i}.png" for i in range(8)]
    for i, r in enumerate(rows):
        diag, loc, name = ["melanoma", "nevus"][i % 2], ["back", "face"][i // 4], ["mel", "nv"][i % 2]
        assert r["caption"] in (f"dermoscopy of a {diag} on the {loc}", f"a {diag} ({name}) seen on the {loc}")
        assert r["domain"] == ["clinic-a", "clinic-b"][i % 2] and r["label"] == name
        assert (out / r["image"]).resolve() == (derm_csv.parent / "images" / f"img{i}.png").resolve()
    assert len({r["caption"].split(" ")[0] for r in rows}) == 2  # both templates drawn
    again = build_corpus([src], tmp_path / "again", seed=3, shuffle=False)
    assert [r["caption"] for r in read_rows(again.csv)] == [r["caption"] for r in rows]
    assert res.rows_per_domain == {"clinic-a": 4, "clinic-b": 4}
    corpus = open_corpus(res.csv)
    assert corpus.load_image(2).getpixel((0, 0)) == (60, 10, 200)


def test_copy_images_and_caption_column_and_reserved_names(tmp_path, derm_csv):
    p = derm_csv.parent / "captions.csv"
    with open(p, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption", "modality"])
        w.writerow(["images/img0.png", "CT shows a mass.", "CT"])
        w.writerow(["images/img1.png", "MR shows oedema.", "MR"])
    res = build_corpus(
        [CorpusSource(str(p), ("{caption}",), domain_column="modality")],
        tmp_path / "c",
        shuffle=False,
        copy_images=True,
    )
    rows = read_rows(res.csv)
    assert [r["image"] for r in rows] == ["images/captions/images/img0.png", "images/captions/images/img1.png"]
    assert (tmp_path / "c" / rows[1]["image"]).read_bytes() == (derm_csv.parent / "images/img1.png").read_bytes()
    assert [(r["caption"], r["orig_caption"], r["domain"]) for r in rows] == [
        ("CT shows a mass.", "CT shows a mass.", "CT"),
        ("MR shows oedema.", "MR shows oedema.", "MR"),
    ]
    assert [r["label"] for r in rows] == ["", ""] and res.classes_per_source == {"captions": ()}


def test_folder_per_class(tmp_path):
    root = tmp_path / "cells"
    for cls, n in (("benign", 2), ("malignant", 3)):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (4, 4)).save(root / cls / f"{i}.jpg")
    res = build_corpus([CorpusSource(str(root), ("a {label} cell",))], tmp_path / "o", shuffle=False)
    rows = read_rows(res.csv)
    assert [(r["key"], r["caption"], r["label"]) for r in rows] == [
        ("cells/benign/0.jpg", "a benign cell", "benign"),
        ("cells/benign/1.jpg", "a benign cell", "benign"),
        ("cells/malignant/0.jpg", "a malignant cell", "malignant"),
        ("cells/malignant/1.jpg", "a malignant cell", "malignant"),
        ("cells/malignant/2.jpg", "a malignant cell", "malignant"),
    ]
    assert len(open_corpus(res.csv)) == 5


# -- shuffle, fractions, parts ----------------------------------------------------------------------------
def test_shuffle_is_deterministic_and_mixes_sources(npz, derm_csv, tmp_path):
    sources = [
        CorpusSource(str(npz), ("grey {label}",), split="train"),
        CorpusSource(str(derm_csv), ("a {diagnosis}",), name="derm"),
    ]
    a = build_corpus(sources, tmp_path / "a", seed=7)
    b = build_corpus(sources, tmp_path / "b", seed=7)
    c = build_corpus(sources, tmp_path / "c", seed=8)
    plain = build_corpus(sources, tmp_path / "plain", shuffle=False)
    assert a.csv.read_bytes() == b.csv.read_bytes()
    ra, rc, rp = read_rows(a.csv), read_rows(c.csv), read_rows(plain.csv)
    assert [r["key"] for r in ra] != [r["key"] for r in rc]
    as_set = lambda rows: Counter(tuple(sorted(r.items())) for r in rows)  # noqa: E731
    assert len(ra) == 14 and len(set(r["key"] for r in ra)) == 14
    assert [r["source"] for r in rp] == ["tinymnist"] * 6 + ["derm"] * 8  # source order without shuffle
    assert [r["source"] for r in ra] != [r["source"] for r in rp]  # sources interleaved
    # the captions are drawn per row, so shuffling changes only the order, not the rows
    assert as_set(rp) == as_set(ra) == as_set(rc)


def test_fraction_is_stratified_and_keeps_every_class(tmp_path):
    p = labelled_csv(tmp_path, {"0": 50, "1": 20, "2": 3})
    res = build_corpus([CorpusSource(str(p), ("x {label}",), fraction=0.1)], tmp_path / "o")
    counts = Counter(r["label"] for r in read_rows(res.csv))
    assert counts == {"0": 5, "1": 2, "2": 1}  # 0.3 of class 2 -> still 1
    assert res.classes_per_source == {"many": ("0", "1", "2")}
    none = build_corpus([CorpusSource(str(p), ("x {label}",), fraction=0.1, label_column=None)], tmp_path / "n")
    assert none.rows == 7  # 0.1 * 73, no strata
    capped = build_corpus([CorpusSource(str(p), ("x",), max_rows=4)], tmp_path / "m")
    assert capped.rows == 4


def test_parts_are_disjoint_covering_and_deterministic(tmp_path):
    labels = [str(i % 3) for i in range(40)] + ["3"]
    cuts = [0.0, 0.25, 0.8, 1.0]
    parts = [part_indices(labels, len(labels), (a, b), seed=5) for a, b in zip(cuts, cuts[1:])]
    joined = np.concatenate(parts)
    assert len(joined) == len(set(joined.tolist())) == len(labels)  # disjoint and covering
    assert np.array_equal(part_indices(labels, 41, (0.25, 0.8), seed=5), parts[1])
    assert not np.array_equal(part_indices(labels, 41, (0.0, 0.25), seed=6), parts[0])
    assert Counter(labels[i] for i in parts[0]) == {"0": 4, "1": 3, "2": 3, "3": 1}  # round(0.25 * 14/13/13/1), >= 1
    # through build_corpus: train and held-out parts of one CSV, in one build, share no key
    p = labelled_csv(tmp_path, {"a": 30, "b": 10})
    res = build_corpus(
        [
            CorpusSource(str(p), ("{label}",), name="train", part=(0.0, 0.8)),
            CorpusSource(str(p), ("{label}",), name="held", part=(0.8, 1.0)),
        ],
        tmp_path / "o",
        seed=2,
    )
    rows = read_rows(res.csv)
    train = {r["image"] for r in rows if r["source"] == "train"}
    held = {r["image"] for r in rows if r["source"] == "held"}
    assert len(train) == 32 and len(held) == 8 and not train & held
    assert Counter(r["label"] for r in rows if r["source"] == "held") == {"a": 6, "b": 2}
    assert len(open_corpus(res.csv)) == 40


# -- errors ----------------------------------------------------------------------------------------------
def test_template_naming_a_missing_column_is_refused(derm_csv, tmp_path):
    with pytest.raises(CorpusBuildError) as e:
        build_corpus([CorpusSource(str(derm_csv), ("a {diagnosis} in the {site}", "a {dx}"))], tmp_path / "o")
    msg = str(e.value)
    assert "template 'a {dx}' uses column 'dx'" in msg and str(derm_csv) in msg
    assert "available: label, diagnosis, localization, site, age" in msg
    with pytest.raises(CorpusBuildError, match="must name a column"):
        template_fields("a {} lesion")


def test_missing_value_names_the_row_and_suggests_another_template(derm_csv, tmp_path):
    src = CorpusSource(str(derm_csv), ("a {diagnosis} in a {age} year old", "a {diagnosis} on the {localization}"))
    with pytest.raises(CorpusBuildError) as e:
        build_corpus([src], tmp_path / "o")
    msg = str(e.value)
    assert f"{derm_csv} row 6 (line 7)" in msg and "'age' is empty" in msg
    assert "'a {diagnosis} on the {localization}'" in msg  # the template to keep


def test_a_source_csv_that_is_not_utf8_names_the_line_and_column(derm_csv, tmp_path, capsys):
    data = derm_csv.read_bytes().splitlines(keepends=True)
    data[3] = data[3].replace(b",", b",\xe9", 1)  # Latin-1 "e acute" on line 4, right after the first comma
    derm_csv.write_bytes(b"".join(data))
    column = data[3].index(b"\xe9") + 1
    with pytest.raises(CorpusBuildError) as e:
        build_corpus([CorpusSource(str(derm_csv), ("a {diagnosis}",))], tmp_path / "o")
    assert str(e.value) == (f"{derm_csv} line 4: not UTF-8 (byte 0xe9 at column {column}); save the file as UTF-8")
    assert (
        main(["corpus", "--source", str(derm_csv), "--template", "a {diagnosis}", "--out", str(tmp_path / "o2")]) == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "line 4: not UTF-8" in err[0]


def test_bad_options_are_refused(npz, tmp_path):
    with pytest.raises(CorpusBuildError, match="fraction .* or part"):
        CorpusSource(str(npz), ("x",), fraction=0.5, part=(0.5, 1.0))
    with pytest.raises(CorpusBuildError, match="not both"):
        CorpusSource(str(npz), ("x",), domain="a", domain_column="b")
    with pytest.raises(CorpusBuildError, match="no split 'dev'.*train, test"):
        build_corpus([CorpusSource(str(npz), ("x",), split="dev")], tmp_path / "o")
    with pytest.raises(CorpusBuildError, match="two sources are named 'tinymnist'"):
        build_corpus([CorpusSource(str(npz), ("x",)), CorpusSource(str(npz), ("y",))], tmp_path / "o")
    with pytest.raises(CorpusBuildError, match=r"label '1' is not a class index 0..0"):
        build_corpus([CorpusSource(str(npz), ("x",), class_names=("only",))], tmp_path / "o")


def test_unknown_recipe_key_is_refused(tmp_path, npz):
    r = tmp_path / "recipe.yaml"
    r.write_text(f"- path: {npz.name}\n  templates: ['{{label}}']\n  fractoin: 0.5\n")
    with pytest.raises(CorpusBuildError) as e:
        load_recipe(r)
    assert "source 1: unknown key 'fractoin'" in str(e.value) and "fraction" in str(e.value)
    assert "did you mean 'fraction'?" in str(e.value) and "known keys here: path, templates, name" in str(e.value)


# -- CLI -----------------------------------------------------------------------------------------------
def test_cli_single_source(npz, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(
        [
            "corpus",
            "--source",
            str(npz),
            "--split",
            "test",
            "--class-names",
            "normal, pneumonia",
            "--template",
            "an x-ray with {label}",
            "--domain",
            "chest x-ray",
            "--out",
            str(out),
            "--no-shuffle",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert f"wrote 3 rows to {out / 'corpus.csv'}" in printed and "chest x-ray" in printed
    rows = read_rows(out / "corpus.csv")
    assert [r["caption"] for r in rows] == [
        "an x-ray with pneumonia",
        "an x-ray with normal",
        "an x-ray with pneumonia",
    ]
    assert len(open_corpus(out / "corpus.csv")) == 3


def test_cli_recipe_and_errors(npz, derm_csv, tmp_path, capsys):
    recipe = tmp_path / "recipes" / "mix.yaml"
    recipe.parent.mkdir()
    recipe.write_text(
        f"- path: ../{npz.name}\n  split: train\n  class_names: [normal, pneumonia]\n"
        "  templates: ['a chest x-ray showing {label}']\n  domain: chest x-ray\n"
        f"- path: ../derm/{derm_csv.name}\n  name: derm\n  part: [0.0, 0.5]\n  domain: dermoscopy\n"
        "  templates: ['dermoscopy of a {diagnosis} on the {localization}']\n"
    )
    out = tmp_path / "mix"
    assert main(["corpus", "--recipe", str(recipe), "--out", str(out), "--seed", "1"]) == 0
    printed = capsys.readouterr().out
    assert "tinymnist" in printed and "derm" in printed
    corpus = open_corpus(out / "corpus.csv")
    assert len(corpus) == 10
    assert Counter(r["domain"] for r in read_rows(out / "corpus.csv")) == {"chest x-ray": 6, "dermoscopy": 4}
    assert all(corpus.load_image(i) is not None for i in range(len(corpus)))

    recipe.write_text(f"- path: ../{npz.name}\n  templates: x\n  colour: red\n")
    assert main(["corpus", "--recipe", str(recipe), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("distill corpus: error:") and "unknown key 'colour'" in err and len(err.splitlines()) == 1
    assert main(["corpus", "--source", str(derm_csv), "--template", "a {dx}", "--out", str(out)]) == 2
    assert "uses column 'dx'" in capsys.readouterr().err
    assert main(["corpus", "--recipe", str(recipe), "--template", "x", "--out", str(out)]) == 2
    assert "with --recipe" in capsys.readouterr().err


# -- real data -------------------------------------------------------------------------------------------
def test_real_ham10000_and_pneumoniamnist(tmp_path):
    if not SHARED.is_dir():
        pytest.skip(f"real data folder {SHARED.resolve()} is absent (it ships beside the project in CI only)")
    ham = CorpusSource(
        str(SHARED / "ham10000/train.csv"),
        ("dermoscopy of a {diagnosis} on the {localization}",),
        name="ham10000",
        domain="dermoscopy",
        fraction=0.2,
    )
    pneu = CorpusSource(
        str(SHARED / "medmnist/pneumoniamnist.npz"),
        ("a chest x-ray showing {label}",),
        split="train",
        class_names=("no pneumonia", "pneumonia"),
        domain="chest x-ray",
    )
    res = build_corpus([ham, pneu], tmp_path / "real", seed=0)
    assert abs(res.rows_per_source["ham10000"] - 1197) <= 3  # 0.2 * 5984, per class
    assert len(res.classes_per_source["ham10000"]) == 7
    assert res.rows_per_source["pneumoniamnist"] == 4708
    assert res.rows_per_domain == {"chest x-ray": 4708, "dermoscopy": res.rows_per_source["ham10000"]}
    corpus = open_corpus(res.csv)
    assert len(corpus) == res.rows
    rows = read_rows(res.csv)
    first_ham = next(i for i, r in enumerate(rows) if r["source"] == "ham10000")
    assert corpus.load_image(first_ham).size == (128, 128)
    assert (
        rows[first_ham]["caption"] == f"dermoscopy of a {rows[first_ham]['diagnosis']} on the "
        f"{rows[first_ham]['localization']}"
    )
