"""Per-sample teacher routing from a corpus column: the table column, the route mask, its errors, and a tiny run
that records the routing in run_meta.json."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from train_fixtures import read_log, tiny_cache, tiny_config, tiny_tokenizer  # noqa: F401  (fixtures)

from cache.sources.corpus import Corpus, CorpusError, open_corpus
from distill.config.train_config import RoutingCfg
from distill.data.cache_join import route_mask
from distill.data.loader import DataError
from distill.train import make_accelerator, train
from distill.training.build_run import build_run

DOMAINS = ["derm", "rad", "both", "other"]  # row i gets DOMAINS[i % 4]
LISTED = ["oc", "hf", "oc|hf", ""]


@pytest.fixture(scope="session")
def routed_corpus(tiny_corpus):
    """The tiny corpus (same keys and captions, so the same cache) with `domain` and `teachers` columns."""
    with open(tiny_corpus, newline="") as f:
        rows = list(csv.DictReader(f))
    out = tiny_corpus.parent / "corpus_routed.csv"
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[*rows[0], "domain", "teachers"])
        w.writeheader()
        w.writerows({**r, "domain": DOMAINS[i % 4], "teachers": LISTED[i % 4]} for i, r in enumerate(rows))
    return out


def test_table_corpus_exposes_extra_columns(routed_corpus, tmp_path):
    corpus = open_corpus(routed_corpus)
    assert corpus.columns == ["domain", "teachers"]
    assert corpus.column("domain")[:5] == ["derm", "rad", "both", "other", "derm"]
    assert corpus.column("teachers")[:4] == LISTED
    with pytest.raises(
        CorpusError,
        match=r"corpus_routed\.csv has no column 'site'; its other columns are "
        r"'domain', 'teachers'",
    ):
        corpus.column("site")
    (tmp_path / "c.jsonl").write_text(
        '{"image": "a.png", "caption": "x", "site": "derm"}\n'
        '{"image": "b.png", "caption": "y"}\n'
        '{"image": "c.png", "caption": "z", "site": null, "t": ["oc", "hf"]}\n'
    )
    j = open_corpus(tmp_path / "c.jsonl")
    assert j.column("site") == ["derm", "", ""] and j.column("t") == ["", "", "oc|hf"]


class _NoColumns(Corpus):
    source, keys, captions = "shards/", ["a"], ["x"]

    def load_image(self, i):  # pragma: no cover - unused
        raise NotImplementedError

    def describe(self, i):
        return f"sample {i}"


def test_route_mask_from_a_map_or_from_listed_names(routed_corpus):
    corpus = open_corpus(routed_corpus)
    cfg = RoutingCfg(column="domain", teachers={"derm": ("oc",), "rad": ("hf",), "both": ("oc", "hf")})
    r = route_mask(cfg, corpus, ["oc", "hf"], ["oc", "hf"])
    want = np.array([[1, 0], [0, 1], [1, 1], [0, 0]], dtype=bool)
    assert np.array_equal(r.mask, np.tile(want, (8, 1)))
    assert r.rows_per_teacher == {"oc": 16, "hf": 16} and r.unrouted_rows == 8
    # default for values outside the map; only used rows are counted
    r = route_mask(
        RoutingCfg(column="domain", teachers={"derm": ("oc",)}, default=("hf",)),
        corpus,
        ["oc", "hf"],
        ["oc", "hf"],
        used_rows=np.arange(6),
    )
    assert r.rows_per_teacher == {"oc": 2, "hf": 4} and r.unrouted_rows == 0
    listed = route_mask(RoutingCfg(column="teachers"), corpus, ["oc", "hf"], ["oc", "hf"])
    assert np.array_equal(listed.mask, np.tile(want, (8, 1)))
    # a teacher in the cache but not used by the loss takes no column
    only = route_mask(RoutingCfg(column="teachers"), corpus, ["hf"], ["oc", "hf"])
    assert only.mask[:4, 0].tolist() == [False, True, True, False]


def test_route_mask_errors_name_the_thing(routed_corpus):
    corpus = open_corpus(routed_corpus)
    with pytest.raises(
        DataError,
        match=r"loss\.routing\.teachers\.derm names teacher\(s\) \['derm_model'\] that "
        r"are not in the cache \(oc, hf\)",
    ):
        route_mask(RoutingCfg(column="domain", teachers={"derm": ("derm_model",)}), corpus, ["oc"], ["oc", "hf"])
    with pytest.raises(DataError, match=r"teacher 'hf' is routed to no row of .*corpus_routed\.csv"):
        route_mask(RoutingCfg(column="domain", teachers={"derm": ("oc",)}), corpus, ["oc", "hf"], ["oc", "hf"])
    with pytest.raises(DataError, match=r"loss\.routing\.column='site'.*has no column 'site'"):
        route_mask(RoutingCfg(column="site"), corpus, ["oc"], ["oc", "hf"])
    with pytest.raises(DataError, match=r"row 1 .*column 'teachers' names teacher\(s\) \['oc'\] that are not in"):
        route_mask(RoutingCfg(column="teachers"), corpus, ["hf"], ["hf"])
    with pytest.raises(DataError, match=r"shards/ \(_NoColumns\) has no extra columns.*CSV, TSV or JSONL"):
        route_mask(RoutingCfg(column="domain"), _NoColumns(), ["oc"], ["oc"])


ROUTING = "{column: domain, teachers: {derm: [oc], rad: [hf], both: [oc, hf]}}"


def test_routed_training_run_records_routing_and_refuses_an_unrouted_teacher(
    routed_corpus, tiny_cache, tiny_tokenizer, tmp_path
):
    cfg = tiny_config(
        routed_corpus,
        tmp_path / "run",
        tiny_cache,
        tokenizer=tiny_tokenizer,
        train__max_steps=2,
        train__checkpoint_every=0,
        loss__routing=ROUTING,
        loss__combine__mode="confidence",
        loss__combine__temperature=0.5,
    )
    run = build_run(cfg, make_accelerator(cfg))
    batch = next(iter(run.loader))
    names = run.loss.teacher_names  # the cache's order; the route mask's columns follow it
    assert sorted(names) == ["hf", "oc"] and batch.route.shape == (len(batch), 2)
    by_domain = {"oc": [1, 0, 1, 0], "hf": [0, 1, 1, 0]}
    want = torch.tensor([by_domain[t] for t in names], dtype=torch.bool).T[batch.rows % 4]
    assert torch.equal(batch.route, want)
    assert {t: r.tolist() for t, r in batch.route_by_teacher(names).items()} == {
        t: want[:, j].tolist() for j, t in enumerate(names)
    }
    assert batch.to("cpu").route.dtype == torch.bool

    result = train(cfg)
    assert np.isfinite(result["losses"]["loss"]) and len(read_log(tmp_path / "run")) == 2
    meta = json.loads((tmp_path / "run" / "run_meta.json").read_text())
    assert meta["routing"] == {
        "config": {
            "column": "domain",
            "auto": None,
            "teachers": {"derm": ["oc"], "rad": ["hf"], "both": ["oc", "hf"]},
            "default": [],
            "separator": "|",
            "weights": {},
        },
        "rows_per_teacher": {"oc": 16, "hf": 16},
        "unrouted_rows": 8,
    }
    assert meta["config"]["loss"]["routing"]["column"] == "domain"

    lonely = tiny_config(
        routed_corpus,
        tmp_path / "lonely",
        tiny_cache,
        tokenizer=tiny_tokenizer,
        loss__routing="{column: domain, teachers: {derm: [oc]}}",
    )
    with pytest.raises(DataError, match=r"teacher 'hf' is routed to no row of .*corpus_routed\.csv"):
        build_run(lonely, make_accelerator(lonely))
