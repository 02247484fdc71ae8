"""Streamed WebDataset corpora (issue 12): shards by URL or pipe: command read front to back, the same samples and
the same cache as the local folder, bad shards retried then recorded (never dropped silently), training in stream
order (deterministic for a seed), eval over a stream."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from test_corpus import _write_shards
from train_fixtures import read_log, tiny_config

import cache.sources.shard_listing as shard_listing
import cache.sources.stream as corpus_stream
from cache import build_cache, info, open_corpus
from cache.build.job import CacheJob
from cache.sources.corpus import CorpusError, StreamCorpus, StreamOptions
from cache.sources.shard_io import Retry
from cache.store.shard_record import read_record, record_path
from distill.cli import main
from distill.data.samplers import Dealing
from distill.data.stream_data import buffer_shuffle, stream_order
from distill.eval import load_splits, load_task
from distill.eval.context import EvalContext
from distill.eval.retrieval import evaluate_retrieval
from distill.train import train
from teachers import load_teacher

N_SHARDS = 4  # the 32-row tiny corpus, 10 rows per shard: 10, 10, 10, 2
FAST = Retry(attempts=2, backoff_s=0.0)
OPEN_SHARD = corpus_stream.open_shard


@pytest.fixture(autouse=True)
def listings(tmp_path, monkeypatch):
    """Each test lists its shards afresh, into its own folder."""
    monkeypatch.setenv("BIOMED_DISTILL_LISTINGS", str(tmp_path / "listings"))
    return tmp_path / "listings"


@pytest.fixture(scope="module")
def shards(tiny_corpus, tmp_path_factory):
    folder = tmp_path_factory.mktemp("wds") / "shards"
    _write_shards(tiny_corpus, folder, per_shard=10)
    return folder


def _url(folder, last=N_SHARDS - 1) -> str:
    return f"file://{folder}/{{00000..{last:05d}}}.tar"


def _job(data, teachers, out, **kw) -> CacheJob:
    kw = {"num_workers": 0, "batch_size": 8, "chunk_rows": 16, "progress": False, "shard_backoff": 0.0, **kw}
    return CacheJob(data=str(data), teachers=teachers, out=str(out), **kw)


def _count_opens(monkeypatch) -> list[str]:
    """Every shard stream the cursor opens (in this process) from now on."""
    opened: list[str] = []

    def counting_open(url):
        opened.append(url)
        return OPEN_SHARD(url)

    monkeypatch.setattr(corpus_stream, "open_shard", counting_open)
    return opened


def test_file_url_and_pipe_give_the_local_folders_samples(shards, monkeypatch):
    local = open_corpus(shards)
    for spec in (_url(shards), f"pipe:cat {shards}/{{00000..00003}}.tar"):
        c = open_corpus(spec)
        assert isinstance(c, StreamCorpus) and c.unlisted == {}
        assert c.keys == local.keys and c.captions == local.captions and c.fingerprint() == local.fingerprint()
        assert c.shard_of.tolist() == [0] * 10 + [1] * 10 + [2] * 10 + [3] * 2
        opened = _count_opens(monkeypatch)
        assert all(c.load_bytes(i) == local.load_bytes(i) for i in range(len(c)))  # in order: each shard once
        assert len(opened) == N_SHARDS
        assert c.load_bytes(3) == local.load_bytes(3) and len(opened) == N_SHARDS + 1  # behind: reopened
        assert np.array_equal(np.asarray(c.load_image(31)), np.asarray(local.load_image(31)))
        assert c.describe(12).startswith(spec.split("{")[0]) and repr(local.keys[12]) in c.describe(12)
    # listed once: a second open reads the listings, no shard
    monkeypatch.setattr(shard_listing, "open_shard", lambda url: pytest.fail(f"{url} listed again"))
    assert open_corpus(_url(shards)).keys == local.keys


def test_read_ahead_serves_a_shuffled_window_from_one_pass(shards, monkeypatch):
    c = open_corpus(_url(shards)).with_read_ahead(4)
    local = open_corpus(shards)
    opened = _count_opens(monkeypatch)
    order = [2, 0, 1, 5, 3, 4, 6, 9, 7, 8]  # within 4 rows of the stream position
    assert [c.load_bytes(i) for i in order] == [local.load_bytes(i) for i in order]
    assert len(opened) == 1


def test_a_read_failure_mid_shard_is_retried_from_where_it_was(shards, monkeypatch):
    """The first stream of shard 0 breaks after 3 KB: the cursor reopens it, skips what it had, and goes on."""
    real, calls = corpus_stream.open_shard, []

    class Breaks:
        def __init__(self, f):
            self.f, self.n = f, 0

        def read(self, n=-1):
            if self.n > 3000:
                raise ConnectionResetError("peer reset")
            data = self.f.read(n)
            self.n += len(data)
            return data

        def close(self):
            self.f.close()

    monkeypatch.setattr(
        corpus_stream,
        "open_shard",
        lambda url: calls.append(url) or (Breaks(real(url)) if len(calls) == 1 else real(url)),
    )
    c, local = open_corpus(_url(shards), StreamOptions(retry=FAST)), open_corpus(shards)
    assert [c.load_bytes(i) for i in range(10)] == [local.load_bytes(i) for i in range(10)]
    assert len(calls) == 2


def test_unknown_or_uninstalled_schemes_are_one_line():
    with pytest.raises(CorpusError, match=r"s3:// shards needs s3fs \(pip install s3fs\)"):
        open_corpus("s3://bucket/shards-{0000..0099}.tar")
    with pytest.raises(CorpusError, match="unknown URL scheme nope://"):
        open_corpus("nope://host/a.tar")


def test_stream_cache_equals_the_local_folders(shards, tiny_teachers, tmp_path, capsys):
    """`distill cache` over the file:// URL (2 workers) writes the features of the local folder's cache."""
    teacher = {"oc": tiny_teachers["oc"]}
    build_cache(_job(shards, teacher, tmp_path / "local.h5"))
    out = tmp_path / "url.h5"
    assert (
        main(
            [
                "cache",
                "--data",
                _url(shards),
                "--teacher",
                f"oc={teacher['oc']}",
                "--out",
                str(out),
                "--num-workers",
                "2",
                "--batch-size",
                "4",
                "--chunk-rows",
                "8",
                "--shard-attempts",
                "2",
                "--shard-backoff",
                "0",
            ]
        )
        == 0
    )
    assert "oc: computed 32, done 32/32, skipped 0" in capsys.readouterr().out
    with h5py.File(tmp_path / "local.h5", "r") as a, h5py.File(out, "r") as b:
        assert a.attrs["corpus_fingerprint"] == b.attrs["corpus_fingerprint"]
        assert a["keys"].asstr()[:].tolist() == b["keys"].asstr()[:].tolist()
        np.testing.assert_array_equal(a["teachers/oc/done"][:], b["teachers/oc/done"][:])
        for what in ("image", "text"):  # other batch compositions: float16 rounding may differ by an ulp
            np.testing.assert_allclose(a[f"teachers/oc/{what}"][:], b[f"teachers/oc/{what}"][:], atol=1e-4)
    assert not (tmp_path / "url.h5.shards.json").exists()


def test_an_unlisted_shard_is_retried_recorded_and_the_rest_cached(shards, tiny_teachers, tmp_path, monkeypatch):
    folder = tmp_path / "shards"
    shutil.copytree(shards, folder)
    attempts, real = [], shard_listing.open_shard
    monkeypatch.setattr(shard_listing, "open_shard", lambda url: attempts.append(url) or real(url))
    out, spec = tmp_path / "f.h5", _url(folder, last=N_SHARDS)  # 00004.tar does not exist
    summary = build_cache(_job(spec, {"oc": tiny_teachers["oc"]}, out, shard_attempts=3))
    missing = f"file://{folder}/00004.tar"
    assert attempts.count(missing) == 3 and len(attempts) == N_SHARDS + 3
    assert summary.rows == 32 and summary.teachers["oc"].done == 32  # the other shards, all of them
    record = read_record(str(out))
    assert list(record.unlisted) == [missing] and "after 3 attempt(s)" in record.unlisted[missing]
    assert "FileNotFoundError" in record.unlisted[missing] and record.unread == {}
    text = str(summary)
    assert "unlisted shards: 1 could not be listed" in text and missing in text
    assert "unlisted shards: 1" in info(str(out)) and missing in info(str(out))
    # the shard appears: the cache's rows stay as they were (rerunning neither fails nor changes them)
    shutil.copy(folder / "00003.tar", folder / "00004.tar")
    again = build_cache(_job(spec, {"oc": tiny_teachers["oc"]}, out))
    assert again.rows == 32 and again.teachers["oc"].computed == 0 and missing in read_record(str(out)).unlisted


def test_a_shard_unreadable_at_embedding_keeps_its_rows_missing_until_a_rerun(shards, tiny_teachers, tmp_path):
    """Listed, then gone: its 10 rows are neither done nor bad, the record names it, a plain rerun fills them."""
    folder = tmp_path / "shards"
    shutil.copytree(shards, folder)
    spec, out, teacher = _url(folder), tmp_path / "f.h5", {"oc": tiny_teachers["oc"]}
    open_corpus(spec)  # lists every shard
    (folder / "00001.tar").rename(tmp_path / "away.tar")
    first = build_cache(_job(spec, teacher, out, num_workers=2))
    url = f"file://{folder}/00001.tar"
    assert first.teachers["oc"].done == 22 and first.teachers["oc"].skipped == 0 and first.bad == []
    with h5py.File(out, "r") as f:
        assert f["teachers/oc/done"][:].tolist() == [True] * 10 + [False] * 10 + [True] * 12
    assert list(read_record(str(out)).unread) == [url]
    assert "bad shards: 1 could not be read" in str(first) and "rerun the same `distill cache`" in str(first)
    assert url in info(str(out))
    (tmp_path / "away.tar").rename(folder / "00001.tar")
    second = build_cache(_job(spec, teacher, out))
    assert second.teachers["oc"].computed == 10 and second.teachers["oc"].done == 32
    assert not (tmp_path / "f.h5.shards.json").exists() and record_path(str(out)).endswith(".shards.json")
    build_cache(_job(shards, teacher, tmp_path / "local.h5"))
    with h5py.File(tmp_path / "local.h5", "r") as a, h5py.File(out, "r") as b:
        np.testing.assert_array_equal(a["teachers/oc/image"][:], b["teachers/oc/image"][:])


def test_a_failing_pipe_command_is_a_bad_shard(shards):
    c = open_corpus(f"pipe:cat {shards}/{{00000,nothing}}.tar", StreamOptions(retry=FAST))
    assert len(c) == 10 and list(c.unlisted) == [f"pipe:cat {shards}/nothing.tar"]  # cat exits 1: left out
    bad = c.unlisted[f"pipe:cat {shards}/nothing.tar"]
    assert "exited with status 1" in bad and "after 2 attempt(s)" in bad


def test_buffer_shuffle_and_stream_order():
    rng = np.random.default_rng(0)
    perm = buffer_shuffle(100, 8, rng)
    assert sorted(perm.tolist()) == list(range(100)) and perm.tolist() != list(range(100))
    assert all(perm[k] < k + 8 for k in range(100))  # never more than 8 ahead of the stream
    shard_ids = np.repeat(np.arange(6), 10)  # 6 shards of 10 rows
    dealing = Dealing(ranks=2, workers=2, batch_size=4)
    order = stream_order(shard_ids, dealing, 3, np.random.default_rng(1))
    assert sorted(order.tolist()) == list(range(60))
    for p in range(dealing.pairs):  # a pair's rows: a few shards, each read forward within the buffer
        mine = np.concatenate([order[g * 4 : (g + 1) * 4] for g in range(12) if dealing.pair_of_batch(g) == p])
        assert len(set(shard_ids[mine].tolist())) <= 3
        for s in set(shard_ids[mine].tolist()):
            rows = mine[shard_ids[mine] == s]
            pos = np.flatnonzero(shard_ids[mine] == s)
            assert all(rows[k] - rows.min() < pos[k] - pos.min() + 3 + 1 for k in range(len(rows)))


@pytest.fixture(scope="module")
def stream_cache(shards, tiny_teachers, tmp_path_factory):
    """The URL corpus cached with both tiny teachers and 2 stored views (what training reads)."""
    root = tmp_path_factory.mktemp("stream_cache")
    listing = root / "listings"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BIOMED_DISTILL_LISTINGS", str(listing))
        build_cache(_job(_url(shards), tiny_teachers, root / "f.h5", views=2))
    return root / "f.h5", listing


def test_training_on_a_stream_runs_in_stream_order_and_is_deterministic(shards, stream_cache, tmp_path, monkeypatch):
    features, listing = stream_cache
    monkeypatch.setenv("BIOMED_DISTILL_LISTINGS", str(listing))

    runs = []
    for k in range(2):
        opened = _count_opens(monkeypatch)
        cfg = tiny_config(
            _url(shards),
            tmp_path / f"run{k}",
            features,
            train__max_steps=8,
            train__checkpoint_every=0,
            data__stream_buffer=4,
        )
        assert train(cfg)["step"] == 8
        # 8 steps of 8 rows = 2 epochs of 32 rows: each shard read front to back once per epoch
        assert sorted(opened) == sorted([f"file://{shards}/{s:05d}.tar" for s in range(N_SHARDS)] * 2)
        runs.append([r["loss"] for r in read_log(tmp_path / f"run{k}")])
    assert runs[0] == runs[1] and all(np.isfinite(runs[0]))
    with pytest.raises(Exception, match="data.sampler=random needs random access"):
        train(tiny_config(_url(shards), tmp_path / "random", features, data__sampler="random"))


def test_eval_retrieval_over_a_stream_equals_the_csv(shards, tiny_corpus, tiny_teachers, tmp_path):
    model = load_teacher(tiny_teachers["oc"], "cpu")
    results = []
    for name, path in (("csv", str(tiny_corpus)), ("url", _url(shards))):
        f = tmp_path / f"{name}.yaml"
        f.write_text(yaml.safe_dump({"name": name, "kind": "retrieval", "dataset": {"path": path}}))
        task = load_task(str(f))
        splits = load_splits(task)
        assert len(splits["test"]) == 32
        res = evaluate_retrieval(task, model, "oc", splits, EvalContext(bootstrap=0))
        results.append({k: v.point for k, v in res.items()})
    assert results[0] == results[1] and results[0]["image_to_text_R@1"] > 0


DRIVER = """
import json, os, sys
import torch
torch.set_num_threads(1)
import cache.sources.stream as cs, cache.sources.shard_listing as sl
from cache import CacheJob, build_cache
kw, report = json.loads(sys.argv[1]), sys.argv[2]
listed, read, real_list, real_read = [], [], sl.open_shard, cs.open_shard
sl.open_shard = lambda url: listed.append(url) or real_list(url)
cs.open_shard = lambda url: read.append(url) or real_read(url)
build_cache(CacheJob(**kw))
with open(f"{report}.{os.environ['RANK']}.json", "w") as f:
    json.dump({"listed": listed, "read": read}, f)
"""


@pytest.mark.slow
def test_two_processes_each_list_and_read_their_own_shards(shards, tiny_teachers, tmp_path, listings):
    """torchrun, 2 ranks: shard i is listed and read by rank i % 2 only, once; the file equals one process's."""
    teacher = {"oc": tiny_teachers["oc"]}
    build_cache(_job(shards, teacher, tmp_path / "local.h5"))
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    root = Path(__file__).resolve().parents[1]
    kw = {
        "data": _url(shards),
        "teachers": teacher,
        "out": str(tmp_path / "multi.h5"),
        "batch_size": 4,
        "chunk_rows": 4,
        "num_workers": 0,
        "progress": False,
    }
    env = {
        **os.environ,
        "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "OMP_NUM_THREADS": "1",
        "BIOMED_DISTILL_LISTINGS": str(listings),
    }
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--standalone",
            str(driver),
            json.dumps(kw),
            str(tmp_path / "report"),
        ],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    urls = [f"file://{shards}/{s:05d}.tar" for s in range(N_SHARDS)]
    for rank in (0, 1):
        report = json.loads((tmp_path / f"report.{rank}.json").read_text())
        assert sorted(report["listed"]) == sorted(report["read"]) == urls[rank::2]
    with h5py.File(tmp_path / "local.h5", "r") as a, h5py.File(tmp_path / "multi.h5", "r") as b:
        assert a["keys"].asstr()[:].tolist() == b["keys"].asstr()[:].tolist()
        np.testing.assert_array_equal(a["teachers/oc/done"][:], b["teachers/oc/done"][:])
        for what in ("image", "text"):  # other batch compositions: float16 rounding may differ by an ulp
            np.testing.assert_allclose(a[f"teachers/oc/{what}"][:], b[f"teachers/oc/{what}"][:], atol=1e-4)
