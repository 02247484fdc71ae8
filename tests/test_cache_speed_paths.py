"""`distill cache` at GPU speed (issue 10): shared transforms, tokenisation in the workers, parts written in a
background thread, loader sizes chosen from the device. Values must equal the plain path's; speed is measured
only in benchmarks/."""

from __future__ import annotations

import collections
import os
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest
import torchvision.transforms as T

import cache.build.image_rows as IR
import cache.build.run as B
import cache.store.writer as W
from cache import CacheError, CacheJob, build_cache, open_corpus
from cache.build.job import loader_sizes
from distill.cli import build_parser
from teachers.open_clip_teacher import OpenClipTeacher


def _job(data, teachers, out, **kw) -> CacheJob:
    kw = {
        "num_workers": 0,
        "batch_size": 8,
        "chunk_rows": 16,
        "progress": False,
        "dtype": "float32",
        "device": "cpu",
        **kw,
    }
    return CacheJob(data=str(data), teachers=teachers, out=str(out), **kw)


def _features(path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {f"{n}/{m}": g[m][:] for n, g in f["teachers"].items() for m in ("image", "text", "done")}


class _Counted:
    """A transform that counts its calls under its sharing key (num_workers=0: all in this process)."""

    def __init__(self, fn, key, calls: collections.Counter):
        self.fn, self.key, self.calls = fn, key, calls

    def __call__(self, *a):
        self.calls[self.key] += 1
        return self.fn(*a)


def _patched_inputs(monkeypatch, calls: collections.Counter, share: bool, seen: dict) -> None:
    real = IR.teacher_inputs

    def inputs(teachers, views):
        out = []
        for ti in real(teachers, views):
            key = ti.key if share else ("unshared", ti.name)
            seen[ti.name] = key
            out.append(IR.TeacherInput(ti.name, key, _Counted(ti.transform, key, calls), ti.min_side, ti.tokenize))
        return out

    monkeypatch.setattr(B, "teacher_inputs", inputs)


@pytest.mark.parametrize("views", [0, 2])
def test_equal_preprocessing_shares_one_transform_per_image_with_equal_values(
    tmp_path, tiny_corpus, tiny_teachers, monkeypatch, views
):
    teachers = {"a": tiny_teachers["oc"], "b": tiny_teachers["oc"], "c": tiny_teachers["hf"]}
    runs = {}
    for share in (True, False):
        calls, seen = collections.Counter(), {}
        with monkeypatch.context() as m:
            _patched_inputs(m, calls, share, seen)
            out = tmp_path / f"share{share}.h5"
            build_cache(_job(tiny_corpus, teachers, out, views=views))
        runs[share] = (_features(out), calls, seen)
    (shared, calls, seen), (plain, plain_calls, _) = runs[True], runs[False]
    per_image = views or 1
    if views:  # the stored views are replayed through the base view transform: equal configs (all 32 px) share
        assert seen["a"] == seen["b"] == seen["c"] and dict(calls) == {seen["a"]: 32 * per_image}
    else:  # two open_clip pipelines of equal preprocessing share; HF's processor is its own
        assert seen["a"] == seen["b"] != seen["c"]
        assert dict(calls) == {seen["a"]: 32, seen["c"]: 32}  # 2 transforms per image, not 3
    assert sum(plain_calls.values()) == 3 * 32 * per_image
    assert shared.keys() == plain.keys()
    for k in shared:
        np.testing.assert_array_equal(shared[k], plain[k], err_msg=k)


def test_transform_key_is_equal_only_for_provably_equal_pipelines():
    def make(size, mean=(0.5, 0.5, 0.5)):
        return T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor(), T.Normalize(mean, (0.2, 0.2, 0.2))])

    assert IR.transform_key(make(32)) == IR.transform_key(make(32)) is not None
    assert IR.transform_key(make(32)) != IR.transform_key(make(48))
    assert IR.transform_key(make(32)) != IR.transform_key(make(32, (0.4, 0.5, 0.5)))
    assert IR.transform_key(T.Compose([T.RandomResizedCrop(32), T.ToTensor()])) is None  # random: never shared
    scale = 2.0
    assert IR.transform_key(lambda img: img) is None
    assert IR.transform_key(T.Compose([T.ToTensor(), lambda x: x * scale])) is None  # a closure may hold state


def test_captions_are_tokenised_in_the_workers_with_equal_values(tmp_path, tiny_corpus, tiny_teachers, monkeypatch):
    ref = tmp_path / "ref.h5"
    build_cache(_job(tiny_corpus, tiny_teachers, ref))  # num_workers=0: everything in this process
    pids = tmp_path / "pids.txt"
    real = OpenClipTeacher.tokenize

    def tokenize(self, texts):
        with open(pids, "a") as f:
            f.write(f"{os.getpid()} {len(texts)}\n")
        return real(self, texts)

    monkeypatch.setattr(OpenClipTeacher, "tokenize", tokenize)
    out = tmp_path / "workers.h5"
    build_cache(_job(tiny_corpus, tiny_teachers, out, num_workers=2))
    calls = [line.split() for line in pids.read_text().splitlines()]
    assert {pid for pid, _ in calls} and str(os.getpid()) not in {pid for pid, _ in calls}
    assert sorted(int(n) for _, n in calls) == [8] * 4  # once per batch of 8 rows, 32 captions in all
    a, b = _features(ref), _features(out)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_collate_tokenises_only_each_teachers_good_rows_in_order(tiny_corpus):
    corpus = open_corpus(tiny_corpus)
    seen = []

    def tok(texts):
        seen.append(list(texts))
        return np.arange(len(texts))

    inputs = [IR.TeacherInput("t", "k", lambda img: T.ToTensor()(img.convert("RGB")), 0, tok)]
    ds = IR.ImageRows(corpus, np.array([3, 1, 2]), np.ones((3, 1), bool), inputs)
    item = ds[0]
    batch = IR.CollateRows(inputs)([item, (9, None, "empty caption", "row 9", " "), ds[2]])
    assert batch.inputs["t"][0] == [3, 2] and batch.bad == [(9, "empty caption", "row 9")]
    assert seen == [[corpus.captions[3], corpus.captions[2]]]
    assert batch.tokens["t"].tolist() == [0, 1]


def test_part_writer_keeps_order_surfaces_the_error_and_writes_nothing_after_it():
    done, gate = [], threading.Event()

    def commit(i):
        def run():
            assert threading.current_thread().name.startswith("cache-parts")
            if i == 0:
                gate.wait(5)
            if i == 1:
                raise CacheError("no space left on device writing x; free space and rerun the same command")
            done.append(i)

        return run

    w = W.PartWriter(depth=1)
    w.submit(commit(0))
    assert done == []  # submit returned while chunk 0 is still being written
    gate.set()
    w.submit(commit(1))  # waits for chunk 0 first
    assert done == [0]
    with pytest.raises(CacheError, match="^no space left on device writing x; free space"):
        w.submit(commit(2))  # chunk 1's error, in this thread
    w2 = W.PartWriter(depth=2)
    w2.submit(commit(1))
    w2.submit(commit(3))
    with pytest.raises(CacheError):
        w2.join()
    w2.close()
    w.close()
    assert done == [0]  # neither chunk 2 nor 3 was written after a failed one


def test_parts_are_written_off_the_main_thread(tmp_path, tiny_corpus, tiny_teachers, monkeypatch):
    threads, real = [], W.write_part

    def write_part(*a, **k):
        threads.append(threading.current_thread().name)
        return real(*a, **k)

    monkeypatch.setattr(W, "write_part", write_part)
    build_cache(_job(tiny_corpus, tiny_teachers, tmp_path / "f.h5"))
    assert len(threads) == 2 * 2 and all(t.startswith("cache-parts") for t in threads)  # 2 chunks x 2 teachers


def test_auto_loader_sizes_follow_the_device(monkeypatch):
    monkeypatch.setattr("cache.build.job.usable_cores", lambda: 16)
    assert loader_sizes("cpu") == (64, 2)
    assert loader_sizes("cuda:0") == (256, 8)
    assert loader_sizes("cuda:1", local_procs=8) == (256, 2)
    monkeypatch.setattr("cache.build.job.usable_cores", lambda: 3)
    assert loader_sizes("cuda") == (256, 3)
    assert loader_sizes("cuda", local_procs=8) == (256, 1)
    job = CacheJob(data="c.csv", teachers={"a": "plip"}, out="f.h5")
    assert (job.batch_size, job.num_workers) == ("auto", "auto")
    cfg = job.embedding("cuda:0")
    assert (cfg.batch_size, cfg.num_workers) == (256, 3)
    cfg = CacheJob(data="c.csv", teachers={"a": "plip"}, out="f.h5", batch_size=5).embedding("cuda:0")
    assert (cfg.batch_size, cfg.num_workers) == (5, 3)


@pytest.mark.parametrize(
    "kw, msg",
    [
        ({"batch_size": 0}, "batch_size=0; use an integer >= 1 or 'auto'"),
        ({"num_workers": "many"}, "num_workers='many'; use an integer >= 0 or 'auto'"),
    ],
)
def test_bad_loader_sizes_are_refused(kw, msg):
    with pytest.raises(CacheError, match=f"^{msg}"):
        CacheJob(data="c.csv", teachers={"a": "plip"}, out="f.h5", **kw)


def test_cli_defaults_to_auto_and_takes_integers(capsys):
    p = build_parser()
    base = ["cache", "--data", "c.csv", "--teacher", "a=plip", "--out", "f.h5"]
    args = p.parse_args(base)
    assert (args.batch_size, args.num_workers) == ("auto", "auto")
    args = p.parse_args([*base, "--batch-size", "128", "--num-workers", "0"])
    assert (args.batch_size, args.num_workers) == (128, 0)
    with pytest.raises(SystemExit):
        p.parse_args([*base, "--batch-size", "0"])
    assert "expected an integer >= 1 or auto, got '0'" in capsys.readouterr().err


def test_auto_sizes_are_logged(tmp_path, tiny_corpus, tiny_teachers, caplog):
    caplog.set_level("INFO", logger="cache.build.run")
    build_cache(
        _job(tiny_corpus, {"oc": tiny_teachers["oc"]}, tmp_path / "f.h5", batch_size="auto", num_workers="auto")
    )
    assert "distill cache: batch size 64, 2 decoding worker(s) per process on cpu (auto)" in caplog.text
    assert Path(tmp_path / "f.h5").exists()
