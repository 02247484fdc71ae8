"""Issue 20, item 1: `distill teachers`, checked on a hand-built cache whose answer is known.

Two teachers, each knowing one half of the rows: teacher `a`'s image and text embeddings of a row match on half 1
and are unrelated on half 2, teacher `b` the opposite. Teacher `a`'s images of the two halves are also offset in
opposite directions, so k-means on them finds the halves.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

import cache.store.writer as W
from cache.sources.corpus import open_corpus
from distill import teacher_report as tr
from distill.cli import main
from distill.config.train_config import Config
from distill.errors import BAD_INPUT
from distill.teacher_report_out import routing_block

ROOT = Path(__file__).resolve().parents[1]
N, D, POOL = 512, 32, 16
HALF = N // 2
WORDS = {"one": "chest xray lung opacity", "two": "skin lesion dermoscopy naevus"}


def _knows(rng: np.random.Generator, n: int, offset: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    z = rng.standard_normal((n, D))
    return z + 0.1 * rng.standard_normal((n, D)) + offset, z + offset


def _unrelated(rng: np.random.Generator, n: int, offset: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return rng.standard_normal((n, D)) + offset, rng.standard_normal((n, D))


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> tuple[Path, Path]:
    """(FEATURES.h5, corpus.csv) of the two-halves cache; the corpus has a `half` column."""
    root = tmp_path_factory.mktemp("teachers")
    data = root / "corpus.csv"
    with open(data, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption", "key", "half"])
        for i in range(N):
            half = "one" if i < HALF else "two"
            w.writerow([str(root / f"img{i}.png"), f"{WORDS[half]} case {i}", f"k{i}", half])
    corpus = open_corpus(str(data))
    path = root / "features.h5"
    W.create_file(str(path), list(corpus.keys), fingerprint=corpus.fingerprint(), source=str(data))
    rng = np.random.default_rng(0)
    e0, e1 = np.eye(D)[0] * 8, np.eye(D)[1] * 8
    halves = {
        "a": [_knows(rng, HALF, e0), _unrelated(rng, HALF, e1)],
        "b": [_unrelated(rng, HALF, 0 * e0), _knows(rng, HALF, 0 * e0)],
    }
    with h5py.File(path, "r+") as f:
        for name, parts in halves.items():
            meta = {
                "attrs": {"spec": f"synthetic:{name}", "embed_dim": D, "logit_scale": 100.0, "views": 0},
                "dtype": "float16",
                "h5_chunk_rows": 64,
            }
            g = W._ensure_group(f, name, meta)
            image = np.concatenate([p[0] for p in parts])
            text = np.concatenate([p[1] for p in parts])
            g["image"][...] = image / np.linalg.norm(image, axis=1, keepdims=True)
            g["text"][...] = text / np.linalg.norm(text, axis=1, keepdims=True)
            g["done"][...] = True
    return path, data


def _check_halves(report: tr.Report, names: dict[str, str]) -> None:
    by_name = {s.name: s for s in report.slices}
    for slice_name, knower in names.items():
        s = by_name[slice_name]
        other = "b" if knower == "a" else "a"
        assert s.rows == HALF and s.scored == HALF
        assert s.best == knower
        assert s.accuracy[knower] > 0.95
        assert s.accuracy[other] < 4 / POOL  # chance is 1/POOL
        assert s.skill[knower] > 0.9 and abs(s.skill[other]) < 4 / POOL  # distinct captions: skill ~ accuracy
        assert s.chance == pytest.approx(1 / POOL)
        assert 0 <= s.agreement[knower] < 0.3


def test_by_column_finds_each_halfs_teacher(cache) -> None:
    path, data = cache
    report = tr.score(path, tr.by_column(path, data, "half"), pool=POOL, seed=1)
    assert report.teachers == ["a", "b"]
    _check_halves(report, {"one": "a", "two": "b"})


def test_reading_by_small_blocks_gives_the_same_counts(cache) -> None:
    path, data = cache
    slices = tr.by_column(path, data, "half")
    big, small = tr.score(path, slices, pool=POOL, block_rows=4096), tr.score(path, slices, pool=POOL, block_rows=64)
    for s, t in zip(big.slices, small.slices):
        assert s.scored == t.scored and s.rows == t.rows
        assert abs(s.accuracy["a"] - t.accuracy["a"]) < 0.05 and abs(s.accuracy["b"] - t.accuracy["b"]) < 0.05


def test_clusters_recover_the_halves_and_are_named_by_caption_words(cache) -> None:
    path, data = cache
    slices = tr.by_clusters(path, 2, seed=3, data=data)
    for j in range(2):
        members = slices.rows[slices.ids == j]
        assert len(members) == HALF
        assert (members < HALF).all() or (members >= HALF).all()
    assert sorted(slices.names) == ["chest xray lung", "skin lesion dermoscopy"]
    _check_halves(tr.score(path, slices, pool=POOL), {"chest xray lung": "a", "skin lesion dermoscopy": "b"})
    again = tr.by_clusters(path, 2, seed=3, data=data)
    assert np.array_equal(again.ids, slices.ids)  # seeded
    block = routing_block(tr.score(path, slices, pool=POOL), 0.1, auto={"clusters": 2, "on": "joint", "seed": 3})
    base = yaml.safe_load((ROOT / "configs" / "tiny-hybrid.yaml").read_text())
    base.setdefault("loss", {})["routing"] = block["loss"]["routing"]
    routing = Config.from_dict(base, static=True).loss.routing
    assert routing is not None and routing.column is None and routing.auto is not None
    assert (routing.auto.clusters, routing.auto.seed, routing.auto.margin, routing.auto.pool) == (2, 3, 0.1, POOL)
    unnamed = tr.by_clusters(path, 2, seed=3)
    assert sorted(unnamed.names) == ["cluster-0", "cluster-1"]


def test_cli_writes_table_json_heatmap_and_a_routing_block_training_accepts(cache, tmp_path, capsys) -> None:
    path, data = cache
    out, suggest = tmp_path / "report", tmp_path / "routing.yaml"
    argv = ["teachers", str(path), "--by", "half", "--data", str(data), "--pool", str(POOL)]
    assert main([*argv, "--out", str(out), "--suggest", str(suggest), "--margin", "0.1"]) == 0
    printed = capsys.readouterr().out
    assert "one" in printed and "two" in printed and "best" in printed
    got = json.loads((out / "teachers.json").read_text())
    assert [s["best"] for s in got["slices"]] == ["a", "b"]
    assert (out / "teachers.png").read_bytes()[:4] == b"\x89PNG"
    block = yaml.safe_load(suggest.read_text())
    assert block == {
        "loss": {"routing": {"column": "half", "teachers": {"one": ["a"], "two": ["b"]}, "default": ["a", "b"]}}
    }
    base = yaml.safe_load((ROOT / "configs" / "tiny-hybrid.yaml").read_text())
    base.setdefault("loss", {})["routing"] = block["loss"]["routing"]
    config = Config.from_dict(base, static=True)
    assert config.loss.routing is not None and config.loss.routing.teachers == {"one": ("a",), "two": ("b",)}


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--by", "site", "--data", "{data}"], "site"),
        (["--clusters", "100000"], "--clusters 100000"),
        (["--clusters", "2", "--pool", "1"], "--pool"),
        (["--by", "half"], "--data"),
        ([], "--by COLUMN"),
        (["--by", "half", "--data", "{missing}"], "not found"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(cache, tmp_path, capsys, extra, needle) -> None:
    path, data = cache
    extra = [a.format(data=data, missing=tmp_path / "nope.csv") for a in extra]
    assert main(["teachers", str(path), *extra]) == BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err


def test_a_missing_cache_is_one_line(tmp_path, capsys) -> None:
    assert main(["teachers", str(tmp_path / "none.h5"), "--clusters", "2"]) == BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "none.h5" in err and "not found" in err


def test_clusters_suggest_an_auto_block_and_one_teachers_image_clusters_too(cache, tmp_path) -> None:
    path, data = cache
    suggest = tmp_path / "auto.yaml"
    argv = ["teachers", str(path), "--clusters", "2", "--seed", "3", "--pool", str(POOL), "--data", str(data)]
    assert main([*argv, "--suggest", str(suggest), "--margin", "0.2"]) == 0
    block = yaml.safe_load(suggest.read_text())
    assert block == {
        "loss": {"routing": {"auto": {"clusters": 2, "on": "joint", "seed": 3, "margin": 0.2, "pool": 16}}}
    }
    # teacher a's images alone also split the halves (they are offset in opposite directions)
    alone = tr.by_clusters(path, 2, seed=3, data=data, teacher="a", on="image")
    assert sorted(alone.names) == ["chest xray lung", "skin lesion dermoscopy"] and "image embeddings of a" in alone.how


def test_skill_removes_what_a_teachers_constant_choice_scores_on_templated_captions(tmp_path) -> None:
    """Two templated captions (half the rows each): teacher `knows` matches each image to its class's caption,
    teacher `constant` sends every image to the first caption. Accuracy: 1 and 0.5; skill: each pool's hits minus
    sum_c (rows choosing c)(rows holding c) / n, i.e. 1 - 0.5 = 0.5 for `knows` and exactly 0 for `constant`."""
    n, d = 128, 8
    data = tmp_path / "corpus.csv"
    labels = np.arange(n) % 2
    with open(data, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption", "key"])
        w.writerows(
            [f"i{i}.png", f"an ultrasound, {'benign' if c == 0 else 'malignant'}", f"k{i}"]
            for i, c in enumerate(labels)
        )
    corpus = open_corpus(str(data))
    path = tmp_path / "features.h5"
    W.create_file(str(path), list(corpus.keys), fingerprint=corpus.fingerprint(), source=str(data))
    text = np.eye(d)[labels]  # identical rows for identical captions
    rng = np.random.default_rng(0)
    images = {
        "knows": np.eye(d)[labels] + 0.1 * rng.random((n, d)),
        "constant": np.eye(d)[np.zeros(n, int)] + 0.1 * rng.random((n, d)),
    }
    with h5py.File(path, "r+") as f:
        for name, image in images.items():
            meta = {
                "attrs": {"spec": f"synthetic:{name}", "embed_dim": d, "views": 0},
                "dtype": "float16",
                "h5_chunk_rows": 64,
            }
            g = W._ensure_group(f, name, meta)
            g["image"][...], g["text"][...], g["done"][...] = image, text, True
    whole = tr.Slices(["all"], np.arange(n), np.zeros(n, dtype=np.int64), "one slice")
    s = tr.score(path, whole, pool=POOL, seed=0).slices[0]
    assert s.accuracy == {"knows": 1.0, "constant": 0.5} and s.skill["constant"] == 0.0
    pools = labels[np.random.default_rng(0).permutation(n)].reshape(-1, POOL)  # score's pools (one block, seed 0)
    own = [np.bincount(p, minlength=2) for p in pools]
    assert s.skill["knows"] == pytest.approx(1 - sum((c**2).sum() / POOL for c in own) / n, abs=1e-12)
    assert s.best == "knows" and tr.within_margin(s, ["knows", "constant"], 0.4) == ["knows"]
