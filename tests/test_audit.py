"""`distill audit`: planted duplicates (exact copy, resized, re-encoded JPEG, cropped by a few pixels) are found,
distinct images of the same class are not, a task's copied test images are found, and the outputs say so.

The teacher is a `py:` module written into tmp_path: its image embedding is the image's 16 x 16 pixels minus their
mean (deterministic, and discriminative where tiny random-weight teachers are not), and the cache is written with
its embeddings through the cache writer, recording that SPEC, so the audit loads the same teacher for task images.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from test_cli_export_eval import tasks  # noqa: F401  (fixture)
from train_fixtures import tiny_cache, tiny_config, tiny_tokenizer  # noqa: F401  (fixtures)

import cache.store.writer as W
import distill.train as train_mod
from benchmarks.bench_common import synthetic_teacher_meta
from cache.sources.corpus import open_corpus
from distill.audit import closest_in, nearest_within, run_audit
from distill.audit_record import audit_status, registry_path
from distill.cli import main
from distill.config.audit_job import AuditJob
from teachers.registry import load_teacher

TEACHER_MODULE = """
import torch
from torch import nn
from teachers.base import Teacher
from teachers.transforms import PreprocessCfg


class PixelCLIP(Teacher):
    def __init__(self):
        super().__init__(nn.Linear(1, 1), spec="py:audit_pixel_teacher:make", embed_dim=768, logit_scale=100.0,
                         preprocess_cfg=PreprocessCfg(image_size=(16, 16), mean=(0.5,) * 3, std=(0.5,) * 3),
                         context_length=4)

    def tokenize(self, texts):
        return torch.tensor([[len(t) % 768] for t in texts])

    def _image_features(self, images):
        x = images.flatten(1)
        return x - x.mean(1, keepdim=True)

    def _text_features(self, tokens):
        return torch.nn.functional.one_hot(tokens[:, 0], 768).float()


def make():
    return PixelCLIP()
"""
SPEC = "py:audit_pixel_teacher:make"
# The pixel teacher is not shift-invariant as a CLIP is: a 3-pixel crop scores 0.92 with it (distinct images at most
# 0.67), so these tests audit at 0.9, not at the 0.95 default meant for real teachers.
TOY = 0.9


def _pattern(rng: np.random.Generator, cls: int) -> Image.Image:
    """A 64 px image of class `cls` (0: a bright disc, 1: a bright bar) at a random place on smooth noise."""
    noise = rng.integers(0, 160, (8, 8, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(noise).resize((64, 64), Image.Resampling.BILINEAR)).astype(np.int16)
    cy, cx = rng.integers(16, 48, 2)
    yy, xx = np.mgrid[:64, :64]
    shape = ((yy - cy) ** 2 + (xx - cx) ** 2 < 100) if cls == 0 else (np.abs(yy - cy) < 5)
    img[shape] = 240
    return Image.fromarray(img.clip(0, 255).astype(np.uint8))


@pytest.fixture()
def pixel_teacher(tmp_path, monkeypatch):
    mod = tmp_path / "mods"
    mod.mkdir()
    (mod / "audit_pixel_teacher.py").write_text(TEACHER_MODULE)
    monkeypatch.syspath_prepend(str(mod))
    return load_teacher(SPEC)


def _cache(corpus_csv: Path, out: Path, teacher) -> Path:
    """The corpus's rows cached for teacher `pix` with the pixel teacher's embeddings (its SPEC recorded)."""
    corpus = open_corpus(str(corpus_csv))
    batch = np.stack([teacher.image_transform(corpus.load_image(i)).numpy() for i in range(len(corpus))])
    image = teacher.encode_image(torch.from_numpy(batch)).numpy()
    text = teacher.encode_text(teacher.tokenize(corpus.captions)).numpy()
    W.create_file(str(out), list(corpus.keys), fingerprint=corpus.fingerprint(), source=str(corpus_csv))
    meta = synthetic_teacher_meta("pix", 768, 16, fingerprint=corpus.fingerprint())
    meta["attrs"] |= {"spec": SPEC, "resolved_spec": SPEC}
    W.write_meta(str(out), "pix", meta)
    W.write_part(str(out), "pix", np.arange(len(corpus)), image, text)
    W.fold(str(out))
    return out


@pytest.fixture()
def planted(tmp_path, pixel_teacher):
    """12 rows: 8 distinct images (4 discs, 4 bars), then copies of rows 0-3: exact bytes, resized to 48 px,
    re-encoded as JPEG (quality 60), cropped by 3 pixels. Returns (corpus csv, cache, rows of the planted copies)."""
    rng = np.random.default_rng(0)
    img = tmp_path / "img"
    img.mkdir()
    rows = []
    for i in range(8):
        _pattern(rng, i % 2).save(img / f"d{i}.png")
        rows.append([f"img/d{i}.png", f"{'disc' if i % 2 == 0 else 'bar'} number {i}", f"d{i}"])
    shutil.copy(img / "d0.png", img / "exact.png")
    Image.open(img / "d1.png").resize((48, 48), Image.Resampling.BICUBIC).save(img / "resized.png")
    Image.open(img / "d2.png").convert("RGB").save(img / "jpeg.jpg", quality=60)
    Image.open(img / "d3.png").crop((3, 0, 64, 61)).save(img / "cropped.png")
    for name in ("exact.png", "resized.png", "jpeg.jpg", "cropped.png"):
        rows.append([f"img/{name}", f"copy {name}", name.split(".")[0]])
    data = tmp_path / "corpus.csv"
    with data.open("w", newline="") as f:
        csv.writer(f).writerows([["image", "caption", "key"], *rows])
    return data, _cache(data, tmp_path / "features.h5", pixel_teacher), [8, 9, 10, 11]


def _task(tmp_path: Path) -> Path:
    """A zero-shot task whose 4 test images are: a byte copy of corpus row 4, a re-encoded (JPEG) copy of corpus
    row 5, and two new images."""
    folder = tmp_path / "task"
    folder.mkdir()
    shutil.copy(tmp_path / "img" / "d4.png", folder / "leak_exact.png")
    Image.open(tmp_path / "img" / "d5.png").convert("RGB").save(folder / "leak_jpeg.jpg", quality=70)
    rng = np.random.default_rng(7)
    _pattern(rng, 0).save(folder / "new0.png")
    _pattern(rng, 1).save(folder / "new1.png")
    with (folder / "test.csv").open("w", newline="") as f:
        csv.writer(f).writerows(
            [["image", "label", "split"]]
            + [
                [n, lab, "test"]
                for n, lab in [("leak_exact.png", 0), ("leak_jpeg.jpg", 1), ("new0.png", 0), ("new1.png", 1)]
            ]
        )
    task = {
        "name": "shapes",
        "kind": "zeroshot",
        "dataset": {"path": "test.csv", "split_column": "split"},
        "classes": ["disc", "bar"],
    }
    path = folder / "shapes.yaml"
    path.write_text(yaml.safe_dump(task))
    return path


def test_planted_duplicates_are_found_and_distinct_images_of_a_class_are_not(planted, tmp_path):
    data, features, copies = planted
    audit, _, _ = run_audit(AuditJob(features=str(features), data=str(data), threshold=TOY, device="cpu"))
    assert [d.row for d in audit.drops] == copies
    reasons = {d.key: d.reason for d in audit.drops}
    assert reasons == {
        "exact": "exact copy of d0",
        "resized": "near copy of d1",
        "jpeg": "near copy of d2",
        "cropped": "near copy of d3",
    }
    assert (audit.exact_groups, audit.near_groups) == (1, 3)
    assert audit.rows == 12 and audit.tasks == []
    near = {(p.row, p.other) for p in audit.pairs if p.kind == "near"}
    assert near == {(1, 9), (2, 10), (3, 11)}
    assert all(p.cosine >= TOY for p in audit.pairs)
    # the distinct images really are apart (else the test proves nothing): only the copies have a neighbour >= 0.9
    # (the 3 near pairs, both sides; the exact copy is not searched twice), and the crop is the weakest copy
    assert (audit.nearest[0.90], audit.nearest[0.95]) == (6, 4)
    assert "no task checked" in audit.verdict() and "1 exact and 3 near-duplicate groups" in audit.verdict()


def test_a_higher_threshold_misses_the_weakest_copy_and_a_lower_one_flags_distinct_images(planted, tmp_path):
    """The threshold is what decides: at 0.96 the crop (0.92) is missed; at -1 every row matches another."""
    data, features, _ = planted
    strict, _, _ = run_audit(AuditJob(features=str(features), data=str(data), threshold=0.96, device="cpu"))
    assert [d.key for d in strict.drops] == ["exact", "resized", "jpeg"]
    loose, _, _ = run_audit(AuditJob(features=str(features), data=str(data), threshold=-1.0, device="cpu"))
    assert (loose.near_groups, len(loose.drops)) == (1, 11)  # one group of all 11 searched rows, plus the copy


def test_copied_task_images_are_leaks(planted, tmp_path):
    data, features, copies = planted
    job = AuditJob(features=str(features), data=str(data), tasks=(str(_task(tmp_path)),), threshold=TOY, device="cpu")
    audit, _, splits = run_audit(job)
    assert list(splits) == ["shapes (test)"]
    [check] = audit.tasks
    assert (check.name, check.images, check.matched_images, check.rows) == ("shapes (test)", 4, 2, 2)
    leaks = {(p.kind, p.row, p.other) for p in audit.pairs if p.scope == "shapes (test)"}
    assert leaks == {("exact", 4, 0), ("near", 5, 1)}
    assert [d.row for d in audit.drops] == [4, 5, *copies]
    assert audit.verdict().startswith("LEAK") and "2 of 4 images copied by 2 rows" in audit.verdict()


def test_the_command_writes_the_reports_and_the_clean_corpus(planted, tmp_path, capsys):
    data, features, copies = planted
    out, clean = tmp_path / "audit", tmp_path / "clean.csv"
    argv = ["audit", "--features", str(features), "--data", str(data), "--task", str(_task(tmp_path))]
    assert main([*argv, "--out", str(out), "--write-clean", str(clean), "--device", "cpu", "--threshold", "0.9"]) == 0
    printed = capsys.readouterr().out
    assert "verdict: LEAK" in printed and "6 rows to drop" in printed
    with (out / "drop.csv").open() as f:
        dropped = list(csv.DictReader(f))
    assert [(r["row"], r["key"]) for r in dropped] == [
        ("4", "d4"),
        ("5", "d5"),
        ("8", "exact"),
        ("9", "resized"),
        ("10", "jpeg"),
        ("11", "cropped"),
    ]
    assert dropped[0]["reason"] == "matches shapes (test) image 0"
    kept = open_corpus(str(clean))
    assert list(kept.keys) == ["d0", "d1", "d2", "d3", "d6", "d7"]
    assert kept.captions[0] == "disc number 0" and kept.load_image(0).size == (64, 64)
    record = json.loads((out / "audit.json").read_text())
    assert record["corpus_fingerprint"] == open_corpus(str(data)).fingerprint()
    assert [t["name"] for t in record["tasks"]] == ["shapes (test)"] and record["rows_to_drop"] == 6
    fingerprint = record["corpus_fingerprint"]
    # the record beside the cache, which distill eval reads for a student trained on this corpus
    assert registry_path(features, fingerprint).is_file()
    status = audit_status(features, fingerprint, ["shapes", "other"])
    assert status["shapes"].startswith("LEAK: 2 of 4 images are copied by 2 rows of the student's training corpus")
    assert status["other"] == "never audited against the student's training corpus"
    assert audit_status(features, "another corpus", ["shapes"])["shapes"].startswith("never audited")
    with (out / "pairs.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 6
    assert Image.open(out / "pairs.png").size[0] > 0


def test_block_search_equals_the_full_matrix():
    """Blocks of 7 rows (odd, not dividing 50) give each row's top k and closest query as the whole matrix does."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((50, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = rng.standard_normal((11, 8)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    full = x @ x.T
    np.fill_diagonal(full, -np.inf)
    s, i = nearest_within(x, 3, block_rows=7)
    np.testing.assert_array_equal(i, np.argsort(-full, axis=1, kind="stable")[:, :3])
    np.testing.assert_allclose(s, np.sort(full, axis=1)[:, ::-1][:, :3], atol=1e-6)
    s, i = nearest_within(x, 3, block_rows=7, floor=0.5)  # only neighbours at >= 0.5 kept; the rest -inf and -1
    above = np.sort(np.where(full >= 0.5, full, -np.inf), axis=1)[:, ::-1][:, :3]
    np.testing.assert_allclose(s, above, atol=1e-6)
    assert ((i == -1) == np.isinf(above)).all() and (s > -np.inf).sum() == (full >= 0.5).sum(1).clip(max=3).sum()
    cs, ci = closest_in(x, q, block_rows=7)
    np.testing.assert_array_equal(ci, np.argmax(x @ q.T, axis=1))
    np.testing.assert_allclose(cs, np.max(x @ q.T, axis=1), atol=1e-6)


def test_bad_input_is_one_line(planted, tmp_path, capsys):
    data, features, _ = planted
    base = ["audit", "--features", str(features), "--data", str(data)]
    assert main([*base, "--threshold", "1.5"]) == 2
    assert "--threshold is a cosine" in capsys.readouterr().err
    assert main([*base, "--teacher", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--teacher 'nope' is not in" in err and "pix" in err and "\n" not in err


def test_eval_states_the_audit_of_the_students_training_corpus(
    tiny_corpus,
    tiny_cache,  # noqa: F811
    tiny_tokenizer,  # noqa: F811
    tasks,  # noqa: F811
    tmp_path,
    caplog,
    capsys,
):
    """An export records its run's corpus fingerprint and cache (training.json); distill eval looks up the audits
    recorded beside that cache: 'never audited' (and a warning) before `distill audit --task`, its finding after."""
    run = tmp_path / "run"
    cfg = tiny_config(
        tiny_corpus, run, tiny_cache, tokenizer=tiny_tokenizer, train__max_steps=2, train__tensorboard="false"
    )
    train_mod.train(cfg)
    export = tmp_path / "student"
    assert main(["export", str(run), "--out", str(export)]) == 0
    training = json.loads((export / "training.json").read_text())
    fingerprint = open_corpus(str(tiny_corpus)).fingerprint()
    assert training == {
        "corpus": str(tiny_corpus),
        "corpus_fingerprint": fingerprint,
        "features": str(tiny_cache.resolve()),
    }

    def evaluate(out):
        argv = ["eval", "--model", f"student=local-dir:{export}", "--task", str(tasks["rt"]), "--out", str(out)]
        assert main([*argv, "--bootstrap", "0", "--device", "cpu"]) == 0
        return json.loads((out / "report.json").read_text())["tasks"]["rt"]["audit"]

    with caplog.at_level(logging.WARNING, logger="distill.eval.runner"):
        assert evaluate(tmp_path / "before") == "never audited against the student's training corpus"
    assert "task(s) rt were never audited against the student's training corpus" in caplog.text
    argv = ["audit", "--features", str(tiny_cache), "--data", str(tiny_corpus), "--task", str(tasks["rt"])]
    assert main([*argv, "--teacher", "oc", "--out", str(tmp_path / "audit"), "--device", "cpu"]) == 0
    capsys.readouterr()
    after = evaluate(tmp_path / "after")
    assert after == audit_status(tiny_cache, fingerprint, ["rt"])["rt"] and not after.startswith("never")
    assert f"**Audit**: {after}." in (tmp_path / "after" / "report.md").read_text()
