"""Issue 20, item 2: label-free routing, `loss.routing.auto`: clusters of the cache's rows, each routed to the
teachers that know it, computed once (saved in the run folder), equal on every process, resumed exactly.

The known answer comes from test_teacher_report's two-halves cache: teacher `a` knows the first half of the rows,
`b` the second, and the halves are apart in the embeddings, so two clusters are the halves and each goes to its
teacher."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_grad_cache import _assert_equal
from test_teacher_report import HALF, N, cache  # noqa: F401  (fixture)
from test_train_distributed import _launch
from train_fixtures import (  # noqa: F401  (fixtures)
    load_weights,
    read_log,
    tiny_cache,
    tiny_config,
    tiny_tokenizer,
    train_killed_after,
)

import cache.store.writer as W
import distill.train as train_mod
import distill.training.routing as routing_mod
from benchmarks.bench_common import synthetic_teacher_meta
from cache.sources.corpus import open_corpus
from distill.config.routing import RoutingCfg
from distill.config.train_config import Config, ConfigError, DataCfg
from distill.data.cache_join import join_cache
from distill.data.loader import DataError
from distill.training.build_run import build_run
from distill.training.routing import AUTO_FILE, build_routing, loss_domains


def _auto(path, data, out, **auto):
    corpus = open_corpus(str(data))
    join = join_cache(corpus, path, None, use_views=False)
    cfg = RoutingCfg(auto={"clusters": 2, "margin": 0.1, "pool": 16, "seed": 3, **auto})
    return build_routing(cfg, corpus, join, ["a", "b"], str(path), None, out)


def test_two_clusters_are_the_halves_each_routed_to_the_teacher_that_knows_it(cache, tmp_path):  # noqa: F811
    path, data = cache
    rr = _auto(path, data, tmp_path)
    halves = np.arange(N) < HALF
    assert np.array_equal(rr.routing.mask, np.stack([halves, ~halves], axis=1))  # corpus row i = cache row i
    assert rr.routing.rows_per_teacher == {"a": HALF, "b": HALF} and rr.routing.unrouted_rows == 0
    first = rr.cluster_of_row[0]
    assert np.array_equal(rr.cluster_of_row, np.where(halves, first, 1 - first))
    record = rr.record()
    clusters = {c["name"]: c for c in record["auto"]["clusters"]}
    assert {n: c["teachers"] for n, c in clusters.items()} == {
        "chest xray lung": ["a"],
        "skin lesion dermoscopy": ["b"],
    }
    assert clusters["chest xray lung"]["rows"] == HALF and clusters["chest xray lung"]["skill"]["a"] > 0.9
    assert record["config"]["auto"]["clusters"] == 2 and record["auto"]["clustered"] == "joint embeddings of a, b"
    json.dumps(record)  # run_meta.json takes it as is
    # scope: domain terms see the clusters as domains
    assert loss_domains(DataCfg(corpus=str(data)), True, None, None, rr) is rr.cluster_of_row


def test_the_saved_clusters_are_reused_and_other_settings_recompute(cache, tmp_path, monkeypatch):  # noqa: F811
    path, data = cache
    first = _auto(path, data, tmp_path)
    assert (tmp_path / AUTO_FILE).is_file()

    def boom(*a, **k):
        raise AssertionError("recomputed")

    real = routing_mod._compute
    monkeypatch.setattr(routing_mod, "_compute", boom)
    again = _auto(path, data, tmp_path)  # a resumed run: read back, not recomputed
    assert np.array_equal(again.routing.mask, first.routing.mask)
    assert np.array_equal(again.cluster_of_row, first.cluster_of_row)
    assert again.record()["auto"]["clusters"] == first.record()["auto"]["clusters"]
    with pytest.raises(AssertionError, match="recomputed"):
        _auto(path, data, tmp_path, margin=0.2)  # other settings: never the stale file
    monkeypatch.setattr(routing_mod, "_compute", real)
    (tmp_path / AUTO_FILE).write_bytes(b"not safetensors")  # damaged: recomputed, with a warning
    assert np.array_equal(_auto(path, data, tmp_path).routing.mask, first.routing.mask)


def test_bad_auto_routing_is_one_line_naming_the_key(cache, tmp_path, caplog):  # noqa: F811
    path, data = cache
    with pytest.raises(DataError, match=rf"loss\.routing\.auto\.clusters=600 is more than the {N} rows that train"):
        _auto(path, data, tmp_path, clusters=600)
    with pytest.raises(DataError, match=r"loss\.routing\.auto\.teacher='c' is not one of the loss's teachers \(a, b\)"):
        _auto(path, data, tmp_path, teacher="c")
    # one cluster holding both halves: a and b each know half, so one is a little behind; margin 0 leaves it out,
    # with a warning, and it distils no row
    with caplog.at_level(logging.WARNING, logger="distill.training.routing"):
        rr = _auto(path, data, tmp_path, clusters=1, margin=0.0)
    left = [t for t, n in rr.routing.rows_per_teacher.items() if n == 0]
    assert len(left) == 1 and sorted(rr.routing.rows_per_teacher.values()) == [0, N]
    assert f"loss.routing.auto: '{left[0]}' is within 0 of the best on none of the 1 clusters" in caplog.text


@pytest.mark.parametrize(
    ("routing", "needle"),
    [
        ({"column": "domain", "auto": {"clusters": 2}}, "loss.routing takes column or auto, not both"),
        ({}, "loss.routing needs column (a corpus column) or auto"),
        ({"auto": {"clusters": 2}, "teachers": {"x": ["a"]}}, "remove loss.routing.teachers, default and weights"),
        ({"auto": {"clusters": 0}}, "loss.routing.auto.clusters must be at least 1, got 0"),
        ({"auto": {"clusters": 2, "on": "pixels"}}, "loss.routing.auto.on 'pixels' is unknown; use one of joint"),
        ({"auto": {"clusters": 2, "margin": -1}}, "loss.routing.auto.margin must be a finite number >= 0"),
        ({"auto": {"clusters": 2, "pool": 1}}, "loss.routing.auto.pool must be at least 2"),
    ],
)
def test_config_refuses_bad_routing_in_one_line(routing, needle):
    with pytest.raises(ConfigError) as e:
        Config.from_dict({"loss": {"routing": routing}}, static=True)
    assert needle in str(e.value) and "\n" not in str(e.value).strip()


# -- a tiny run: recorded, resumed exactly, two processes equal one ------------------------------------------------
@pytest.fixture(scope="module")
def skilled_cache(tiny_corpus, tmp_path_factory):
    """The tiny corpus's 32 rows cached for two synthetic teachers with skill (the tiny models have none: their
    embeddings are nearly constant), through the writer and a fold: `a` knows rows 0-15, `b` rows 16-31, and the
    halves are apart in `a`'s embeddings, so clusters follow the halves and each routes to one teacher."""
    corpus = open_corpus(str(tiny_corpus))
    n, d = len(corpus), 16
    out = str(tmp_path_factory.mktemp("skilled") / "features.h5")
    W.create_file(out, list(corpus.keys), fingerprint=corpus.fingerprint(), source=str(tiny_corpus))
    rng = np.random.default_rng(0)
    first = np.arange(n) < n // 2
    offset = np.where(first[:, None], 4 * np.eye(d)[0], 4 * np.eye(d)[1])
    z = rng.standard_normal((n, d))
    noise = rng.standard_normal((n, d))
    feats = {
        "a": (z + offset + 0.1 * noise, np.where(first[:, None], z + offset, noise)),
        "b": (np.where(first[:, None], noise, z), np.where(first[:, None], rng.standard_normal((n, d)), z)),
    }
    for name, (image, text) in feats.items():
        W.write_meta(out, name, synthetic_teacher_meta(name, d, 16, fingerprint=corpus.fingerprint()))
        unit = [x / np.linalg.norm(x, axis=1, keepdims=True) for x in (image, text)]
        W.write_part(out, name, np.arange(n), *unit)
    W.fold(out)
    return out


def _cfg(corpus, cache_path, out, tokenizer, **kw):  # noqa: F811
    kw = {
        "train__max_steps": 7,
        "train__checkpoint_every": 5,
        "train__tensorboard": "false",
        "loss__terms": "[{kind: infonce}, {kind: affinity, weight: 3, kwargs: {scope: domain}}]",
        "loss__routing": "{auto: {clusters: 2, margin: 1.0, pool: 8}}",
        **kw,
    }
    return tiny_config(corpus, out, cache_path, tokenizer=tokenizer, **kw)


def test_a_tiny_run_records_its_clusters_and_a_killed_run_resumes_equal(
    tiny_corpus,
    tiny_cache,  # noqa: F811
    tiny_tokenizer,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    straight = tmp_path / "straight"
    train_mod.train(_cfg(tiny_corpus, tiny_cache, straight, tiny_tokenizer))
    meta = json.loads((straight / "run_meta.json").read_text())
    auto = meta["routing"]["auto"]
    assert [c["rows"] for c in auto["clusters"]] and sum(c["rows"] for c in auto["clusters"]) == 32
    assert all(c["teachers"] == ["oc", "hf"] or c["teachers"] == ["hf", "oc"] for c in auto["clusters"])  # margin 1
    assert meta["routing"]["rows_per_teacher"] == {"oc": 32, "hf": 32} and (straight / AUTO_FILE).is_file()

    resumed = tmp_path / "resumed"
    train_killed_after(monkeypatch, _cfg(tiny_corpus, tiny_cache, resumed, tiny_tokenizer), 5)
    monkeypatch.setattr(routing_mod, "_compute", lambda *a: pytest.fail("a resumed run recomputed its clusters"))
    train_mod.train(_cfg(tiny_corpus, tiny_cache, resumed, tiny_tokenizer))
    # bit-equal: the same float32 operations in the same order, and the same clusters read back from the file
    assert [r["loss"] for r in read_log(resumed)] == [r["loss"] for r in read_log(straight)]
    a, b = load_weights(straight / "checkpoint-7"), load_weights(resumed / "checkpoint-7")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_domain_scope_terms_read_the_clusters(tiny_corpus, tiny_cache, tiny_tokenizer, tmp_path):  # noqa: F811
    cfg = _cfg(tiny_corpus, tiny_cache, tmp_path / "run", tiny_tokenizer, train__max_steps=1)
    run = build_run(cfg, train_mod.make_accelerator(cfg))
    batch = next(iter(run.loader))
    saved = load_file(tmp_path / "run" / AUTO_FILE)
    assert torch.equal(saved["cache_rows"], torch.from_numpy(run.join.cache_rows))
    cluster_of_corpus_row = dict(zip(run.join.corpus_rows.tolist(), saved["cluster"].tolist()))
    assert batch.domains.tolist() == [cluster_of_corpus_row[r] for r in batch.rows.tolist()]


@pytest.mark.slow
def test_two_processes_route_like_one(tiny_corpus, skilled_cache, tiny_tokenizer, tmp_path):
    """Two processes (gloo on CPU) with 4 rows each: the main process's clusters reach both, so the run routes,
    scopes and trains as one process with 8 does (weights within the float32 bound of test_train_distributed)."""
    runs = {}
    for name, nproc, per_device in [("one", 1, 8), ("two", 2, 4)]:
        cfg = _cfg(
            tiny_corpus,
            skilled_cache,
            tmp_path / name,
            tiny_tokenizer,
            train__max_steps=3,
            train__checkpoint_every=0,
            data__batch_size=per_device,
            loss__routing="{auto: {clusters: 2, margin: 0.1, pool: 8}}",
        )
        _launch(cfg, tmp_path, name, nproc)
        runs[name] = tmp_path / name
    one, two = (json.loads((runs[n] / "run_meta.json").read_text())["routing"] for n in ("one", "two"))
    assert one == two and sorted(c["teachers"] for c in one["auto"]["clusters"]) == [["a"], ["b"]]
    a, b = load_weights(runs["one"] / "checkpoint-3"), load_weights(runs["two"] / "checkpoint-3")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=2e-5), (k, (a[k] - b[k]).abs().max().item())


def test_grad_cache_and_phi_s_with_auto_routing_equal_the_plain_step(
    tiny_corpus,
    skilled_cache,
    tiny_tokenizer,  # noqa: F811
    tmp_path,
):
    """Auto routing (each half's cluster to its teacher) under PHI-S-standardised feature targets and domain-local
    affinity: two steps of 2 accumulated batches of 8 in GradCache chunks of 3 equal two plain steps of 16 (the
    merged batch is one contrastive batch; the tolerance is test_grad_cache's)."""
    runs = {}
    for name, batch, accum, micro in [("plain16", 16, 1, "null"), ("micro", 8, 2, 3)]:
        cfg = _cfg(
            tiny_corpus,
            skilled_cache,
            tmp_path / name,
            tiny_tokenizer,
            train__max_steps=2,
            train__checkpoint_every=0,
            train__log_every=1,
            data__batch_size=batch,
            train__grad_accum=accum,
            data__micro_batch_size=micro,
            loss__terms="[{kind: infonce}, {kind: feature, kwargs: {metric: mse}}, "
            "{kind: affinity, weight: 3, kwargs: {scope: domain}}]",
            loss__combine__balance="phi_s",
            loss__routing="{auto: {clusters: 2, margin: 0.1, pool: 8}}",
        )
        runs[name] = train_mod.train(cfg)
    routed = json.loads((tmp_path / "micro" / "run_meta.json").read_text())["routing"]
    assert sorted(c["teachers"] for c in routed["auto"]["clusters"]) == [["a"], ["b"]]
    for ra, rb in zip(read_log(tmp_path / "plain16"), read_log(tmp_path / "micro"), strict=True):
        for key in ("loss", "infonce", "feature", "affinity"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5), (ra["step"], key)
    _assert_equal(load_weights(runs["plain16"]["checkpoint"]), load_weights(runs["micro"]["checkpoint"]), atol=1e-5)
