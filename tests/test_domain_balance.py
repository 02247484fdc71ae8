"""Domain-balanced sampling (data.domain_balance, data.domain_column): domain d drawn with probability
proportional to n_d^alpha, the same items for every sampler, process count and resumed run, and the rows seen per
domain in log.jsonl."""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.data_loader import BatchSamplerShard
from test_train_distributed import _launch
from torch.utils.data import BatchSampler
from train_fixtures import load_weights, read_log, tiny_cache, tiny_config, tiny_tokenizer  # noqa: F401  (fixtures)

import distill.train as train_mod
from cache.sources.corpus import open_corpus
from distill.config.train_config import Config, ConfigError, DataCfg
from distill.config.usage import config_help
from distill.data.domains import build_balance, domain_ids, load_domains
from distill.data.loader import DataError
from distill.data.samplers import Dealing, DomainBalance, EpochSampler

SIZES = (1600, 300, 100)  # a skewed corpus: the last domain is 5% of the rows (breast in issue 17: 4.7%)
B = 64


def _ids(sizes=SIZES, seed=0) -> np.ndarray:
    """Domain ids of a corpus with `sizes` rows per domain, rows in a shuffled order (as a built corpus is)."""
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(len(sizes)), sizes))


def _sampler(ids, alpha, seed=0, **kw) -> EpochSampler:
    balance = None if alpha is None else DomainBalance(ids, alpha)
    gb = kw.pop("global_batch", B)
    return EpochSampler(len(ids), seed, lambda e: gb, balance=balance, **kw)


def test_quotas_by_hand():
    """100 rows as 90 / 9 / 1: alpha 0 -> 33.3 each, largest remainder with ties to the lower id -> 34, 33, 33;
    alpha 0.5 -> sqrt weights 9.487, 3, 1 (sum 13.487) -> 70.34, 22.24, 7.41 -> floors 70, 22, 7 and the one left
    goes to the largest remainder (.41) -> 70, 22, 8; alpha 1 -> the sizes."""
    ids = _ids((90, 9, 1))
    assert DomainBalance(ids, 0.0).quotas().tolist() == [34, 33, 33]
    assert DomainBalance(ids, 0.5).quotas().tolist() == [70, 22, 8]
    assert DomainBalance(ids, 1.0).quotas().tolist() == [90, 9, 1]
    assert DomainBalance(ids, 0.5).probabilities() == pytest.approx(
        [9.48683 / 13.48683, 3 / 13.48683, 1 / 13.48683], rel=1e-5
    )


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_batch_domain_counts_within_a_binomial_bound(alpha):
    """In the first m = 15 batches (960 draws) of an epoch, domain d's count c_d is hypergeometric around
    m B p_d (a shuffle of the epoch's fixed quotas), whose variance is at most the binomial m B p_d (1 - p_d):
    |c_d - m B p_d| <= 4 sd + 1 (1: quota rounding) fails with probability < 1e-4 per (seed, domain) under the
    normal approximation. alpha 1 runs the plain sampler (no balance): today's proportional order."""
    ids = _ids()
    n = np.array(SIZES, dtype=float)
    p = n**alpha / (n**alpha).sum()
    m = 15 * B
    for seed in range(5):
        s = _sampler(ids, None if alpha == 1.0 else alpha, seed=seed)
        order = np.array([i for _, i in s])
        assert len(order) == len(ids) // B * B  # an epoch is still as many draws as rows, cut to whole batches
        c = np.bincount(ids[order[:m]], minlength=3)
        sd = np.sqrt(m * p * (1 - p))
        assert np.all(np.abs(c - m * p) <= 4 * sd + 1), (seed, c.tolist(), (m * p).round(1).tolist())
    if alpha == 0.0:  # the bound tells balance from proportional draws: 320 expected vs 48 for the 5% domain
        assert abs(m / 3 - m * 0.05) > 4 * np.sqrt(m * (1 / 3) * (2 / 3)) + 1


@pytest.mark.parametrize("kind", ["random", "block_shuffle", "block_deal"])
def test_every_sampler_draws_the_same_items(kind):
    """Every sampler's uncut epoch holds exactly the quotas, and the same multiset of items (the draws depend on
    (seed, epoch) only; the block samplers only reorder them over their blocks)."""
    ids = _ids()
    kw = {} if kind == "random" else {"block_ids": np.arange(len(ids)) // 128, "buffer_blocks": 4}
    if kind == "block_deal":
        kw["dealing"] = Dealing(ranks=2, workers=2, batch_size=B // 2)
    s = _sampler(ids, 0.0, seed=3, **kw)
    s.set_epoch(1)
    order = s.order()
    assert np.bincount(ids[order], minlength=3).tolist() == DomainBalance(ids, 0.0).quotas().tolist() == [667, 667, 666]
    assert sorted(order.tolist()) == sorted(DomainBalance(ids, 0.0).draw(3, 1).tolist())


def test_rows_within_a_domain_are_uniform_and_all_seen():
    """alpha 0 over 1600 / 300 / 100 rows: quotas 667 / 667 / 666. The small domain shows each of its 100 rows 6
    or 7 times per epoch (666 = 6 x 100 + 66). The large one reads one permutation of its rows across epochs:
    draws 0-1333 (epochs 0, 1) repeat no row, epoch 2 (draws 1334-2000) crosses into the next permutation, so a
    row shows at most twice there, and all 1600 rows are seen within the 3 epochs."""
    ids = _ids()
    bal = DomainBalance(ids, 0.0)
    first = bal.draw(0, 0)
    small = np.bincount(first[ids[first] == 2], minlength=len(ids))[ids == 2]
    assert set(small.tolist()) == {6, 7} and small.sum() == 666
    seen = [bal.draw(0, e) for e in range(3)]
    big = [e[ids[e] == 0] for e in seen]
    assert [len(x) for x in big] == [667, 667, 667]
    assert len(set(np.concatenate(big[:2]).tolist())) == 2 * 667
    assert np.bincount(big[2]).max() == 2
    assert set(np.concatenate(seen)[ids[np.concatenate(seen)] == 0].tolist()) == set(np.flatnonzero(ids == 0))


def test_determinism_per_seed_and_epoch():
    ids = _ids()
    a, b, c = _sampler(ids, 0.3, seed=1), _sampler(ids, 0.3, seed=1), _sampler(ids, 0.3, seed=2)
    assert np.array_equal(a.order(), b.order())
    assert not np.array_equal(a.order(), c.order())
    b.set_epoch(1)
    assert not np.array_equal(a.order(), b.order())
    assert np.array_equal(a.epoch_items(1), b.order()[: len(b)])  # epoch_items leaves the sampler as it was
    assert a.epoch == 0


@pytest.mark.parametrize("block", [False, True])
def test_two_ranks_share_the_one_process_sequence(block):
    """Accelerate's own sharding (BatchSamplerShard: global batch g = rank 0's batch g then rank 1's) over the
    2-process loader gives back exactly the 1-process sequence: the order does not depend on the process count."""
    ids = _ids()
    kw = {"block_ids": np.arange(len(ids)) // 256, "buffer_blocks": 2} if block else {}
    one = [i for _, i in _sampler(ids, 0.0, seed=4, global_batch=B, **kw)]
    shards = [
        list(
            BatchSamplerShard(
                BatchSampler(_sampler(ids, 0.0, seed=4, global_batch=B, **kw), B // 2, True),
                num_processes=2,
                process_index=r,
            )
        )
        for r in range(2)
    ]
    assert len(shards[0]) == len(shards[1]) == len(one) // B
    merged = [i for b0, b1 in zip(*shards) for i in [*b0, *b1]]
    assert [i for _, i in merged] == one


def test_resume_continues_the_same_sequence():
    """A sampler rebuilt at (epoch 2, batch k), as a resumed run is, yields what the uninterrupted one does."""
    ids = _ids()
    run = _sampler(ids, 0.5, seed=7)
    straight = []
    for e in range(3):
        run.set_epoch(e)
        straight += [(e, i) for _, i in run]
    fresh = _sampler(ids, 0.5, seed=7)
    fresh.set_epoch(2)
    k = 5
    assert list(fresh)[k * B :] == straight[2 * len(run) + k * B :]


def test_balance_refuses_bad_arguments():
    with pytest.raises(ValueError, match="alpha must be in"):
        DomainBalance(np.zeros(4, dtype=int), 1.5)
    with pytest.raises(ValueError, match="one domain id per row"):
        EpochSampler(5, 0, lambda e: 1, balance=DomainBalance(np.zeros(4, dtype=int), 0.0))


# --- configuration and corpus checks ---------------------------------------------------------------------------


def _corpus(tmp_path: Path, domains, name="c.csv") -> Path:
    path = tmp_path / name
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption", "key", "domain"])
        for i, d in enumerate(domains):
            w.writerow([f"x{i}.png", f"caption {i}", f"k{i}", d])
    return path


def _data(**kw):
    return DataCfg(**kw)


@pytest.mark.parametrize("value", [1.5, -0.1, float("nan")])
def test_config_refuses_alpha_outside_0_1(value):
    with pytest.raises(ConfigError, match=r"data.domain_balance must be in \[0, 1\]"):
        Config.from_dict({"data": {"domain_balance": value}})


def test_config_refuses_an_empty_column_name_and_documents_both_keys():
    with pytest.raises(ConfigError, match="data.domain_column must name a corpus column"):
        Config.from_dict({"data": {"domain_column": " "}})
    text = config_help(Config)
    assert "data.domain_balance" in text and "data.domain_column" in text


def test_domain_ids_and_corpus_errors(tmp_path, caplog):
    corpus = open_corpus(_corpus(tmp_path, ["b", "a", "b", " c "]))
    ids, names = domain_ids(corpus, "domain")
    assert ids.tolist() == [1, 0, 1, 2] and names == ["a", "b", "c"]

    with pytest.raises(
        DataError,
        match=r"data.domain_balance=0.5 needs each row's domain: "
        r"data.domain_column='site': .* has no column 'site'",
    ):
        load_domains(_data(domain_balance=0.5, domain_column="site"), corpus)
    assert load_domains(_data(domain_column="site"), corpus) is None  # alpha 1: optional, no counts logged

    holes = open_corpus(_corpus(tmp_path, ["a", "", "b"], "holes.csv"))
    with pytest.raises(
        DataError,
        match=r"data.domain_column='domain': 1 row\(s\) have an empty 'domain' cell "
        r"\(first: .* row 2",
    ):
        load_domains(_data(domain_balance=0.0), holes)

    with pytest.raises(ConfigError, match="data.domain_balance=0.3 .* data.sampler=auto"):
        load_domains(_data(domain_balance=0.3), corpus, streamed=True)

    one = open_corpus(_corpus(tmp_path, ["a"] * 5, "one.csv"))
    doms = load_domains(_data(domain_balance=0.0), one)
    with caplog.at_level(logging.WARNING, logger="distill.data.domains"):
        assert build_balance(_data(domain_balance=0.0), doms, np.arange(5)) is None
    assert "data.domain_balance=0 has no effect: every training row has domain 'a'" in caplog.text
    assert build_balance(_data(domain_balance=1.0), load_domains(_data(), corpus), np.arange(4)) is None
    bal = build_balance(_data(domain_balance=0.0), load_domains(_data(), corpus), np.array([1, 0, 3]))
    assert bal.ids.tolist() == [0, 1, 2]  # per dataset item: corpus rows 1, 0, 3


# --- end to end: log.jsonl and resume ---------------------------------------------------------------------------


def _domain_corpus(tiny_corpus: Path, out: Path) -> Path:
    """The tiny corpus (same keys and captions, so its cache fits) with a skewed domain column: 24 / 6 / 2 rows."""
    with open(tiny_corpus, newline="") as f:
        rows = list(csv.DictReader(f))
    for i, r in enumerate(rows):
        r["image"] = str(tiny_corpus.parent / r["image"])
        r["domain"] = "a" if i < 24 else "b" if i < 30 else "c"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "caption", "key", "domain"])
        w.writeheader()
        w.writerows(rows)
    return out


def _cfg(corpus, cache, out, tokenizer, alpha, **kw):
    # 32 rows, 8 per step: 4 steps per epoch; data.sampler auto: block_shuffle (a cache is read)
    kw = {
        "train__max_steps": 7,
        "train__checkpoint_every": 5,
        "train__tensorboard": "false",
        "loss__terms": "[{kind: infonce}, {kind: affinity}]",
        **kw,
    }
    return tiny_config(corpus, out, cache, tokenizer=tokenizer, data__domain_balance=alpha, **kw)


def test_log_counts_rows_per_domain_and_resume_repeats_them(
    tiny_corpus, tiny_cache, tiny_tokenizer, tmp_path, monkeypatch
):
    """log.jsonl's rows_per_domain, counted from the batches: after epoch 0 (step 4, 32 draws) alpha 0 gives the
    quotas 32/3 each -> 11, 11, 10 (the 2 rows left go to the lowest ids on the tie), where alpha 1 gives the
    corpus's 24, 6, 2. A run killed after checkpoint-5 and resumed logs the same counts and losses as one that
    never stopped."""
    corpus = _domain_corpus(tiny_corpus, tmp_path / "corpus" / "corpus.csv")
    plain = tmp_path / "plain"
    train_mod.train(_cfg(corpus, tiny_cache, plain, tiny_tokenizer, 1.0, train__max_steps=4))
    assert read_log(plain)[3]["rows_per_domain"] == {"a": 24, "b": 6, "c": 2}

    straight = tmp_path / "straight"
    train_mod.train(_cfg(corpus, tiny_cache, straight, tiny_tokenizer, 0.0))
    log = read_log(straight)
    counts = [r["rows_per_domain"] for r in log]
    assert [sum(c.values()) for c in counts] == [8 * s for s in range(1, 8)]
    assert counts[3] == {"a": 11, "b": 11, "c": 10}
    assert counts[6]["c"] > 3 * 56 * 2 / 32  # over 3x its proportional share (3.5 of 56 draws)

    resumed = tmp_path / "resumed"
    real_save = train_mod.save_checkpoint

    class Killed(Exception):
        pass

    def save_then_die(accelerator, out, state, keep_last, **kw):
        path = real_save(accelerator, out, state, keep_last, **kw)
        if state.step == 5:
            raise Killed  # mid-epoch 1
        return path

    monkeypatch.setattr(train_mod, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        train_mod.train(_cfg(corpus, tiny_cache, resumed, tiny_tokenizer, 0.0))
    monkeypatch.setattr(train_mod, "save_checkpoint", real_save)
    train_mod.train(_cfg(corpus, tiny_cache, resumed, tiny_tokenizer, 0.0))
    again = read_log(resumed)
    assert [r["rows_per_domain"] for r in again] == counts
    # bit-equal: the resumed run repeats the same float32 operations in the same order on the same machine and
    # threads (weights, optimizer state, sampler and RNG restored exactly), so any difference is a bug
    assert [r["loss"] for r in again] == [r["loss"] for r in log]
    a, b = load_weights(straight / "checkpoint-7"), load_weights(resumed / "checkpoint-7")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not math.isclose(log[0]["loss"], log[-1]["loss"])


def test_grad_cache_merged_batches_count_the_same_rows(tiny_corpus, tiny_cache, tiny_tokenizer, tmp_path):
    """data.micro_batch_size with accumulation 2 (GradCache merges the step's batches into one): 16 draws per step,
    so step 2 closes epoch 0 with the same quotas 11, 11, 10 as 4 steps of 8."""
    corpus = _domain_corpus(tiny_corpus, tmp_path / "corpus" / "corpus.csv")
    out = tmp_path / "gc"
    train_mod.train(
        _cfg(
            corpus,
            tiny_cache,
            out,
            tiny_tokenizer,
            0.0,
            train__max_steps=2,
            train__grad_accum=2,
            data__micro_batch_size=4,
            train__checkpoint_every=0,
        )
    )
    counts = [r["rows_per_domain"] for r in read_log(out)]
    assert sum(counts[0].values()) == 16 and counts[1] == {"a": 11, "b": 11, "c": 10}


@pytest.mark.slow
def test_two_processes_equal_one_with_balance(tiny_corpus, tiny_cache, tiny_tokenizer, tmp_path):
    """Two processes (gloo on CPU) with 4 rows each draw the balanced rows of one process with 8: the same
    rows_per_domain in log.jsonl (summed over processes) and the same weights."""
    corpus = _domain_corpus(tiny_corpus, tmp_path / "corpus" / "corpus.csv")
    runs = {}
    for name, nproc, per_device in [("one", 1, 8), ("two", 2, 4)]:
        cfg = _cfg(
            corpus,
            tiny_cache,
            tmp_path / name,
            tiny_tokenizer,
            0.0,
            train__max_steps=4,
            train__checkpoint_every=0,
            data__batch_size=per_device,
        )
        _launch(cfg, tmp_path, name, nproc)
        runs[name] = tmp_path / name
    la, lb = read_log(runs["one"]), read_log(runs["two"])
    assert [r["rows_per_domain"] for r in lb] == [r["rows_per_domain"] for r in la]
    assert la[-1]["rows_per_domain"] == {"a": 11, "b": 11, "c": 10}
    a, b = load_weights(runs["one"] / "checkpoint-4"), load_weights(runs["two"] / "checkpoint-4")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=2e-5), (k, (a[k] - b[k]).abs().max().item())
