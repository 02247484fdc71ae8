"""The feature cache: layout and values, adding a teacher, refusals, bad samples, views, info, the reader."""

from __future__ import annotations

import csv
import hashlib
import io
import subprocess
import sys
import tarfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from corpus_helpers import copy_corpus

import cache.build.run as build_run  # load_teacher is patched where cache.build.run uses it
import cache.store.writer as W
from cache import BadSampleError, CacheError, CacheJob, FeatureReader, build_cache, info, open_corpus
from cache.build.views import draw_view_params
from cache.store.segments import copy_cache
from distill.tiny_models import make_tiny_open_clip
from teachers import load_teacher

ATOL = 2e-3  # float16 storage of unit vectors


def _job(data, teachers, out, **kw) -> CacheJob:
    kw.setdefault("num_workers", 0)
    kw.setdefault("batch_size", 8)
    kw.setdefault("chunk_rows", 16)
    kw.setdefault("progress", False)
    return CacheJob(data=str(data), teachers=teachers, out=str(out), **kw)


def _sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _reference(spec: str, corpus_path, rows=None) -> tuple[np.ndarray, np.ndarray]:
    """What the cache should hold: the teacher's own transform, encode_image and encode_text."""
    t = load_teacher(spec, "cpu")
    c = open_corpus(corpus_path)
    rows = range(len(c)) if rows is None else rows
    x = torch.stack([t.image_transform(c.load_image(i)) for i in rows])
    return (t.encode_image(x).numpy(), t.encode_text(t.tokenize([c.captions[i] for i in rows])).numpy())


@pytest.fixture(scope="module")
def full_cache(tmp_path_factory, tiny_corpus, tiny_teachers) -> Path:
    out = tmp_path_factory.mktemp("full") / "features.h5"
    build_cache(_job(tiny_corpus, tiny_teachers, out, num_workers=2))
    return out


def test_layout_attrs_and_values(full_cache, tiny_corpus, tiny_teachers):
    corpus = open_corpus(tiny_corpus)
    with h5py.File(full_cache, "r") as f:
        assert f.attrs["format"] == "biomed-distill-features" and int(f.attrs["version"]) == 2
        assert f.attrs["corpus_fingerprint"] == corpus.fingerprint()
        assert f.attrs["created_by"].startswith("biomed-distill ")
        assert f["keys"].asstr()[:].tolist() == corpus.keys
        assert "views" not in f and len(f["bad/rows"]) == 0
        for name, dim in (("oc", 24), ("hf", 40)):
            g = f[f"teachers/{name}"]
            t = load_teacher(tiny_teachers[name], "cpu")
            assert g.attrs["spec"] == tiny_teachers[name]
            assert int(g.attrs["embed_dim"]) == dim and int(g.attrs["views"]) == 0
            assert float(g.attrs["logit_scale"]) == pytest.approx(t.logit_scale)
            assert list(g.attrs["image_size"]) == [32, 32] and int(g.attrs["context_length"]) == t.context_length
            np.testing.assert_allclose(g.attrs["mean"], [0.5] * 3)
            np.testing.assert_allclose(g.attrs["std"], [0.25] * 3)
            assert g["image"].shape == (32, dim) and g["text"].shape == (32, dim)
            assert g["image"].dtype == np.float16 and g["image"].is_virtual  # rows live in segment files
            assert g["done"][:].all()
            img_ref, txt_ref = _reference(tiny_teachers[name], tiny_corpus)
            img, txt = g["image"][:].astype(np.float32), g["text"][:].astype(np.float32)
            np.testing.assert_allclose(img, img_ref, atol=ATOL)
            np.testing.assert_allclose(txt, txt_ref, atol=ATOL)
            np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1.0, atol=2e-3)
            s = g["stats"]
            np.testing.assert_allclose(s["image_mean"][:], img.mean(0), atol=1e-5)
            np.testing.assert_allclose(s["text_cov"][:], np.cov(txt, rowvar=False), atol=1e-5)
            assert int(s.attrs["count"]) == 32
    assert not Path(str(full_cache) + ".parts").exists() and not Path(str(full_cache) + ".lock").exists()


def test_reader_reads_rows_in_any_order(full_cache, tiny_teachers):
    reader = FeatureReader(str(full_cache))
    assert sorted(reader.teacher_names) == ["hf", "oc"] and reader.num_views == 0 and len(reader.keys) == 32
    np.testing.assert_array_equal(reader.usable_rows(), np.arange(32))
    assert reader.teacher_attrs("hf")["embed_dim"] == 40
    assert reader.teacher_attrs("oc")["spec"] == tiny_teachers["oc"]
    rows = np.array([30, 2, 2, 17, 0, 31])
    with h5py.File(full_cache, "r") as f:
        want = {t: (f[f"teachers/{t}/image"][:], f[f"teachers/{t}/text"][:]) for t in ("oc", "hf")}
    for ratio in (4.0, 0.0):  # dense block read, then h5py point selection
        reader.max_span_ratio = ratio
        got = reader.read(rows)
        for t in ("oc", "hf"):
            assert got[t]["image"].dtype == np.float32
            np.testing.assert_array_equal(got[t]["image"], want[t][0][rows].astype(np.float32))
            np.testing.assert_array_equal(got[t]["text"], want[t][1][rows].astype(np.float32))
    assert list(reader.read(rows, teachers=["hf"])) == ["hf"]
    assert reader.view_params(rows) is None
    st = reader.stats("oc")
    assert st["image_cov"].shape == (24, 24) and st["text_mean"].shape == (24,)
    with pytest.raises(IndexError):
        reader.read([32])
    with pytest.raises(KeyError, match="available: hf, oc"):
        FeatureReader(str(full_cache), teachers=["nope"])
    reader.close()


def test_reader_is_fork_safe_in_dataloader_workers(full_cache):
    reader = FeatureReader(str(full_cache), teachers=["oc"])
    reader.read([0])  # a handle opened in the parent must not be reused by the forked workers

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return 32

        def __getitem__(self, i):
            return reader.read([i])["oc"]["image"][0]

    loader = torch.utils.data.DataLoader(DS(), batch_size=8, num_workers=2)
    got = torch.cat(list(loader)).numpy()
    np.testing.assert_array_equal(got, reader.read(np.arange(32))["oc"]["image"])


def test_adding_a_teacher_computes_only_it(tmp_path, tiny_corpus, tiny_teachers, monkeypatch):
    out = tmp_path / "f.h5"
    build_cache(_job(tiny_corpus, {"oc": tiny_teachers["oc"]}, out))
    with h5py.File(out, "r") as f:
        before = {k: f[f"teachers/oc/{k}"][:] for k in ("image", "text", "done")}
        stats_before = f["teachers/oc/stats/image_mean"][:]
    loaded = []
    real = build_run.load_teacher
    monkeypatch.setattr(
        build_run, "load_teacher", lambda spec, device="cpu", **kw: loaded.append(spec) or real(spec, device, **kw)
    )
    summary = build_cache(_job(tiny_corpus, tiny_teachers, out))
    assert loaded == [tiny_teachers["hf"]]
    assert summary.teachers["oc"].computed == 0 and summary.teachers["hf"].computed == 32
    with h5py.File(out, "r") as f:
        for k, v in before.items():
            np.testing.assert_array_equal(f[f"teachers/oc/{k}"][:], v)
        np.testing.assert_array_equal(f["teachers/oc/stats/image_mean"][:], stats_before)
        assert f["teachers/hf/done"][:].all()
    loaded.clear()
    again = build_cache(_job(tiny_corpus, tiny_teachers, out))  # nothing left: no teacher even loaded
    assert loaded == [] and all(t.computed == 0 for t in again.teachers.values())


def test_refusals_leave_the_file_untouched(tmp_path, tiny_corpus, tiny_teachers):
    out = tmp_path / "f.h5"
    oc = {"oc": tiny_teachers["oc"]}
    build_cache(_job(tiny_corpus, oc, out))
    sha = _sha(out)

    other = copy_corpus(tiny_corpus, tmp_path / "other" / "c.csv", lambda rows: rows[3].update(caption="changed"))
    with pytest.raises(CacheError, match="built from another corpus"):
        build_cache(_job(other, oc, out))
    with pytest.raises(CacheError, match=r"teacher 'oc' already exists with spec .*use another name"):
        build_cache(_job(tiny_corpus, {"oc": tiny_teachers["hf"]}, out))
    with pytest.raises(CacheError, match="views=0, this run asks views=2"):
        build_cache(_job(tiny_corpus, oc, out, views=2))

    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        Path(str(out) + ".lock").write_text(f'{{"pid": {holder.pid}, "host": "{__import__("socket").gethostname()}"}}')
        with pytest.raises(CacheError, match=rf"another process \(pid {holder.pid}\)"):
            build_cache(_job(tiny_corpus, {"hf": tiny_teachers["hf"]}, out))
        assert Path(str(out) + ".lock").exists()  # the live writer's lock is not ours to remove
    finally:
        holder.kill()
        holder.wait()
    assert _sha(out) == sha
    # the holder is dead now: its lock is stale and is taken over
    summary = build_cache(_job(tiny_corpus, {"hf": tiny_teachers["hf"]}, out))
    assert summary.teachers["hf"].done == 32 and not Path(str(out) + ".lock").exists()

    (tmp_path / "alien.h5").write_bytes(b"")
    with h5py.File(tmp_path / "alien.h5", "w") as f:
        f.attrs["format"] = "something-else"
    with pytest.raises(CacheError, match="not a biomed-distill feature cache"):
        build_cache(_job(tiny_corpus, oc, tmp_path / "alien.h5"))


@pytest.fixture(scope="module")
def bad_corpus(tmp_path_factory, tiny_corpus) -> Path:
    d = tmp_path_factory.mktemp("badcorpus")
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 50)

    def edit(rows):
        rows[3]["image"] = str(d / "corrupt.png")
        rows[5]["image"] = str(d / "missing.png")
        rows[7]["caption"] = "  "

    return copy_corpus(tiny_corpus, d / "corpus.csv", edit)


def test_bad_samples_are_skipped_and_recorded(tmp_path, bad_corpus, tiny_corpus, tiny_teachers):
    out = tmp_path / "f.h5"
    summary = build_cache(_job(bad_corpus, {"oc": tiny_teachers["oc"]}, out))
    keys = open_corpus(bad_corpus).keys
    assert summary.teachers["oc"].done == 29 and summary.teachers["oc"].skipped == 3
    assert {k for k, _ in summary.bad} == {keys[3], keys[5], keys[7]}
    with h5py.File(out, "r") as f:
        assert f["bad/rows"][:].tolist() == [3, 5, 7]
        assert f["bad/keys"].asstr()[:].tolist() == [keys[3], keys[5], keys[7]]
        reasons = f["bad/reasons"].asstr()[:].tolist()
        assert "unreadable image" in reasons[0] and "missing image file" in reasons[1]
        assert reasons[2] == "empty caption"
        assert f["teachers/oc/done"][:].sum() == 29 and not f["teachers/oc/done"][[3, 5, 7]].any()
        assert "stats" in f["teachers/oc"] and int(f["teachers/oc/stats"].attrs["count"]) == 29
        good = [i for i in range(32) if i not in (3, 5, 7)]
        img_ref, _ = _reference(tiny_teachers["oc"], tiny_corpus, good)
        np.testing.assert_allclose(f["teachers/oc/image"][good].astype(np.float32), img_ref, atol=ATOL)
    reader = FeatureReader(str(out))
    np.testing.assert_array_equal(reader.usable_rows(), good)
    text = info(str(out))
    assert "bad samples: 3" in text and "skipped 3" in text and keys[3] in text
    assert build_cache(_job(bad_corpus, {"oc": tiny_teachers["oc"]}, out)).teachers["oc"].computed == 0


def test_on_bad_sample_fail_names_file_and_row(tmp_path, bad_corpus, tiny_teachers):
    out = tmp_path / "f.h5"
    with pytest.raises(BadSampleError, match=r"corpus\.csv row 4 \(line 5\).*unreadable image") as e:
        build_cache(_job(bad_corpus, {"oc": tiny_teachers["oc"]}, out, on_bad_sample="fail"))
    assert e.value.key == open_corpus(bad_corpus).keys[3]
    assert not Path(str(out) + ".lock").exists()


def test_on_bad_sample_fail_names_an_empty_caption(tmp_path, tiny_corpus, tiny_teachers):
    data = copy_corpus(tiny_corpus, tmp_path / "c" / "corpus.csv", lambda rows: rows[9].update(caption=""))
    with pytest.raises(BadSampleError, match=r"corpus\.csv row 10 \(line 11\).*empty caption"):
        build_cache(
            _job(data, {"oc": tiny_teachers["oc"]}, tmp_path / "f.h5", on_bad_sample="fail", chunk_rows=4, batch_size=2)
        )
    with h5py.File(tmp_path / "f.h5", "r") as f:  # the chunks before the bad row were committed and kept
        assert f["teachers/oc/done"][:].tolist() == [True] * 8 + [False] * 24
    assert not Path(str(tmp_path / "f.h5") + ".parts").exists()
    summary = build_cache(_job(data, {"oc": tiny_teachers["oc"]}, tmp_path / "f.h5"))
    assert summary.teachers["oc"].computed == 23 and summary.bad == [(open_corpus(data).keys[9], "empty caption")]


def test_views_are_stored_and_replayable(tmp_path, tiny_corpus, tiny_teachers):
    out = tmp_path / "f.h5"
    build_cache(_job(tiny_corpus, {"oc": tiny_teachers["oc"]}, out, views=3, seed=7, dtype="float32"))
    corpus = open_corpus(tiny_corpus)
    t = load_teacher(tiny_teachers["oc"], "cpu")
    with h5py.File(out, "r") as f:
        params = f["views/params"][:]
        assert params.shape == (32, 3, 5) and int(f["views/params"].attrs["seed"]) == 7
        np.testing.assert_array_equal(params, draw_view_params(32, 3, seed=7))
        assert ((params[..., 2] >= np.sqrt(0.5 * 3 / 4) - 1e-6) & (params[..., 2] <= 1)).all()
        assert ((params[..., 0] + params[..., 2]) <= 1 + 1e-6).all()
        assert set(np.unique(params[..., 4])) == {0}  # no flips unless --view-flip asks (laterality)
        g = f["teachers/oc"]
        assert g["image"].shape == (32, 3, 24) and g["image"].dtype == np.float32 and int(g.attrs["views"]) == 3
        for row in (0, 13, 31):
            img = corpus.load_image(row)
            for k in range(3):
                want = t.encode_image(t.view_transform(img, params[row, k])[None])[0].numpy()
                np.testing.assert_allclose(g["image"][row, k], want, atol=1e-5)
        assert np.abs(g["image"][0, 0] - g["image"][0, 1]).max() > 1e-3  # the views differ
        stored = g["image"][:]
    reader = FeatureReader(str(out))
    assert reader.num_views == 3
    rows, views = np.array([5, 1, 5]), np.array([2, 0, 1])
    got = reader.read(rows, views=views)["oc"]["image"]
    np.testing.assert_array_equal(got, stored[rows, views])
    assert reader.read(rows)["oc"]["image"].shape == (3, 3, 24)
    np.testing.assert_array_equal(reader.view_params(rows), params[rows])
    # a second teacher with views replays the same stored parameters; another K is refused
    build_cache(_job(tiny_corpus, {"hf": tiny_teachers["hf"]}, out, views=3, seed=99, dtype="float32"))
    with h5py.File(out, "r") as f:
        np.testing.assert_array_equal(f["views/params"][:], params)
        hf = load_teacher(tiny_teachers["hf"], "cpu")
        want = hf.encode_image(hf.view_transform(corpus.load_image(4), params[4, 2])[None])[0].numpy()
        np.testing.assert_allclose(f["teachers/hf/image"][4, 2], want, atol=1e-5)
    with pytest.raises(CacheError, match="stores 3 views per image; this run asks 2"):
        build_cache(_job(tiny_corpus, {"x": tiny_teachers["hf"]}, out, views=2))


def test_info_describes_the_file(full_cache, tiny_corpus, tiny_teachers):
    text = info(str(full_cache))
    corpus = open_corpus(tiny_corpus)
    assert "biomed-distill-features version 2" in text
    assert "rows: 32" in text and "size on disk:" in text
    assert corpus.keys[0] in text and corpus.keys[-1] in text
    assert corpus.fingerprint()[:16] in text
    assert "bad samples: 0" in text and "views: none" in text and "teachers: 2" in text
    assert f"oc: {tiny_teachers['oc']}" in text and f"hf: {tiny_teachers['hf']}" in text
    assert "dim 24, views 0, dtype float16, done 32/32, skipped 0, complete, stats yes" in text
    assert "dim 40, views 0, dtype float16, done 32/32" in text
    with pytest.raises(CacheError, match="not found"):
        info(str(full_cache) + ".missing")


def test_webdataset_shards_cache_like_the_table(tmp_path, full_cache, tiny_corpus, tiny_teachers):
    """The same samples as .tar shards: same keys and fingerprint, same features as the CSV cache."""
    with open(tiny_corpus, newline="") as f:
        rows = list(csv.DictReader(f))
    shards = tmp_path / "shards"
    shards.mkdir()
    for s in range(0, 32, 12):
        with tarfile.open(shards / f"{s // 12:05d}.tar", "w") as tar:
            for r in rows[s : s + 12]:
                image = (tiny_corpus.parent / r["image"]).read_bytes()
                for ext, data in (("png", image), ("txt", r["caption"].encode())):
                    ti = tarfile.TarInfo(f"{r['key']}.{ext}")
                    ti.size = len(data)
                    tar.addfile(ti, io.BytesIO(data))
    out = tmp_path / "wds.h5"
    build_cache(_job(f"{shards}/{{00000..00002}}.tar", {"oc": tiny_teachers["oc"]}, out))
    with h5py.File(out, "r") as a, h5py.File(full_cache, "r") as b:
        assert a.attrs["corpus_fingerprint"] == b.attrs["corpus_fingerprint"]
        assert a["keys"].asstr()[:].tolist() == [r["key"] for r in rows]
        for what in ("image", "text"):
            np.testing.assert_allclose(
                a[f"teachers/oc/{what}"][:].astype(np.float32),
                b[f"teachers/oc/{what}"][:].astype(np.float32),
                atol=ATOL,
            )


def _count_loads(monkeypatch, corpus_path) -> list[int]:
    """Record every `load_image` call of the corpus class (num_workers=0 keeps the calls in this process)."""
    cls = type(open_corpus(corpus_path))
    calls: list[int] = []
    real = cls.load_image

    def load_image(self, i):
        calls.append(i)
        return real(self, i)

    monkeypatch.setattr(cls, "load_image", load_image)
    return calls


def _record_parts(monkeypatch) -> dict[str, list[int]]:
    parts: dict[str, list[int]] = {}
    real = W.write_part

    def write_part(out, name, rows, *a, **k):
        parts.setdefault(name, []).extend(int(r) for r in rows)
        return real(out, name, rows, *a, **k)

    monkeypatch.setattr(W, "write_part", write_part)
    return parts


@pytest.mark.parametrize("views", [0, 2])
def test_each_image_is_decoded_once_for_all_teachers(
    tmp_path, tiny_corpus, tiny_teachers, full_cache, monkeypatch, views
):
    calls = _count_loads(monkeypatch, tiny_corpus)
    out = tmp_path / "f.h5"
    summary = build_cache(_job(tiny_corpus, tiny_teachers, out, views=views, dtype="float32"))
    assert sorted(calls) == list(range(32))  # 2 teachers, 32 rows: 32 decodes, not 64
    assert all(t.computed == 32 for t in summary.teachers.values())
    if views:  # each teacher's stored views, replayed from the one decode
        corpus = open_corpus(tiny_corpus)
        with h5py.File(out, "r") as f:
            params = f["views/params"][:]
            for name in ("oc", "hf"):
                t = load_teacher(tiny_teachers[name], "cpu")
                x = torch.stack([t.view_transform(corpus.load_image(6), p) for p in params[6]])
                np.testing.assert_allclose(f[f"teachers/{name}/image"][6], t.encode_image(x).numpy(), atol=1e-5)
        return
    with h5py.File(out, "r") as a, h5py.File(full_cache, "r") as b:  # same values as the workers' run
        for name in ("oc", "hf"):
            for what in ("image", "text"):
                np.testing.assert_allclose(a[f"teachers/{name}/{what}"][:], b[f"teachers/{name}/{what}"][:], atol=ATOL)


def test_per_teacher_done_masks_decode_only_the_rows_still_needed(
    tmp_path, tiny_corpus, tiny_teachers, full_cache, monkeypatch
):
    """Rows missing for oc only, for hf only, and for both: each row is decoded once, each teacher embeds only
    its own missing rows, rows done for both are not touched, and the result equals an uninterrupted run."""
    out = tmp_path / "f.h5"
    copy_cache(str(full_cache), str(out))  # the file and its segment folder
    missing = {"oc": [1, 2, 3, 20], "hf": [3, 4, 5, 20, 31]}
    with h5py.File(out, "r+") as f:
        for name, rows in missing.items():
            done = f[f"teachers/{name}/done"][:]
            done[rows] = False
            f[f"teachers/{name}/done"][...] = done  # what a kill leaves: rows never committed
            del f[f"teachers/{name}/stats"]
    calls = _count_loads(monkeypatch, tiny_corpus)
    parts = _record_parts(monkeypatch)
    summary = build_cache(_job(tiny_corpus, tiny_teachers, out, chunk_rows=4, batch_size=3))
    assert sorted(calls) == [1, 2, 3, 4, 5, 20, 31]
    assert {k: sorted(v) for k, v in parts.items()} == missing
    assert summary.teachers["oc"].computed == 4 and summary.teachers["hf"].computed == 5
    with h5py.File(out, "r") as a, h5py.File(full_cache, "r") as b:
        for name in ("oc", "hf"):
            assert a[f"teachers/{name}/done"][:].all()
            for what in ("image", "text"):
                np.testing.assert_allclose(a[f"teachers/{name}/{what}"][:], b[f"teachers/{name}/{what}"][:], atol=ATOL)
            np.testing.assert_allclose(
                a[f"teachers/{name}/stats/image_cov"][:], b[f"teachers/{name}/stats/image_cov"][:], atol=1e-4
            )


def test_a_bad_image_is_bad_for_every_teacher_and_decoded_once(tmp_path, bad_corpus, tiny_teachers, monkeypatch):
    calls = _count_loads(monkeypatch, bad_corpus)
    parts = _record_parts(monkeypatch)
    summary = build_cache(_job(bad_corpus, tiny_teachers, tmp_path / "f.h5"))
    assert sorted(calls) == [i for i in range(32) if i != 7]  # row 7's empty caption: its image is not opened
    assert {t: (s.done, s.skipped) for t, s in summary.teachers.items()} == {"oc": (29, 3), "hf": (29, 3)}
    assert all(sorted(rows) == [i for i in range(32) if i not in (3, 5, 7)] for rows in parts.values())
    with h5py.File(tmp_path / "f.h5", "r") as f:
        assert f["bad/rows"][:].tolist() == [3, 5, 7]


def _file_digest(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_a_teacher_whose_embeddings_disagree_with_its_dimension_is_refused(
    tmp_path, tiny_corpus, tiny_teachers, monkeypatch
):
    """A custom teacher declaring the wrong embed_dim is stopped with its name, spec and both dimensions."""
    (tmp_path / "wrong_dim_teacher.py").write_text(
        "from teachers import load_teacher\n"
        "def make(device='cpu'):\n"
        f"    t = load_teacher({tiny_teachers['oc']!r}, device=device)\n"
        "    t.embed_dim = 30  # the model really gives 24\n"
        "    return t\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "f.h5"
    with pytest.raises(
        CacheError,
        match=r"teacher 'bad' \(py:wrong_dim_teacher:make\) declares embed_dim 30 but "
        r"its image embeddings have dimension 24",
    ):
        build_cache(
            CacheJob(
                data=str(tiny_corpus),
                teachers={"bad": "py:wrong_dim_teacher:make"},
                out=str(out),
                batch_size=16,
                num_workers=0,
                device="cpu",
                progress=False,
            )
        )
    if out.exists():  # nothing of the bad teacher was committed
        with h5py.File(out, "r") as f:
            assert "bad" not in f.get("teachers", {}) or not f["teachers/bad/done"][:].any()


def test_a_teacher_that_changed_dimension_under_the_same_spec_is_refused(tmp_path, tiny_corpus):
    """The folder behind a cached teacher now holds a model of another dimension: refused, file untouched."""
    folder = make_tiny_open_clip(tmp_path / "t", embed_dim=24, seed=3)
    out = tmp_path / "f.h5"
    job = CacheJob(
        data=str(tiny_corpus),
        teachers={"t": f"local-dir:{folder}"},
        out=str(out),
        batch_size=16,
        num_workers=0,
        device="cpu",
        progress=False,
    )
    build_cache(job)
    with h5py.File(out, "r+") as f:  # pretend the last rows are still to do, so the teacher must be loaded again
        f["teachers/t/done"][-4:] = False
    before = _file_digest(out)
    make_tiny_open_clip(folder, embed_dim=32, seed=3)
    with pytest.raises(CacheError, match=r"teacher 't' was cached with embed_dim 24, .* now gives 32"):
        build_cache(job)
    assert _file_digest(out) == before
