"""The same-views baseline: mode=contrastive with data.features trains on the cache's stored views (issue 17).

Why it matters: the distilled student sees the cache's stored views, so a baseline on its own crops would put
part of student - baseline down to augmentation. These tests pin that the replaying baseline sees exactly the
pixels a hybrid run with the same seed sees, batch for batch, that it never reads a teacher feature, that plain
contrastive runs are untouched, and that a cache without views is refused in one line.
"""

from __future__ import annotations

import json

import pytest
import torch
from train_fixtures import read_log, tiny_cache, tiny_config, tiny_tokenizer  # noqa: F401  (fixtures)

import cache.store.reader as h5_reader
from cache.build.run import CacheJob, build_cache
from cache.sources.synthetic import make_synthetic_corpus
from distill.config.train_config import ConfigError
from distill.data.loader import DataError, make_uint8_view_transform, random_crop_params, sample_generator
from distill.train import make_accelerator, train
from distill.training.build_run import build_run, replays_views

EPOCHS = (0, 1)  # 32 rows, batch 8: 4 batches per epoch; two epochs, so the per-epoch view draw is compared too


def _batches(cfg):
    """(run, every batch of EPOCHS) of the run `cfg` builds, read through its own loader and sampler."""
    run = build_run(cfg, make_accelerator(cfg))
    got = []
    for e in EPOCHS:
        run.loader.sampler.set_epoch(e)
        got += list(run.loader)
    return run, got


@pytest.fixture
def counted_reads(monkeypatch):
    """Counts FeatureReader.read / read_tokens calls (teacher features and patch tokens)."""
    calls = {"read": 0, "read_tokens": 0}
    for name in calls:
        real = getattr(h5_reader.FeatureReader, name)

        def wrapped(self, *a, _real=real, _name=name, **k):
            calls[_name] += 1
            return _real(self, *a, **k)

        monkeypatch.setattr(h5_reader.FeatureReader, name, wrapped)
    return calls


@pytest.mark.parametrize("sampler", ["auto", "random"])
def test_replay_shows_the_hybrid_runs_pixels_and_reads_no_features(
    sampler, tiny_corpus, tiny_cache, tiny_tokenizer, tmp_path, counted_reads
):
    hybrid_cfg = tiny_config(tiny_corpus, tmp_path / "h", tiny_cache, tokenizer=tiny_tokenizer, data__sampler=sampler)
    base_cfg = tiny_config(
        tiny_corpus, tmp_path / "c", tiny_cache, mode="contrastive", tokenizer=tiny_tokenizer, data__sampler=sampler
    )
    assert replays_views(base_cfg) and not replays_views(hybrid_cfg)
    _, hybrid = _batches(hybrid_cfg)
    assert counted_reads["read"] == len(hybrid) == 2 * 4  # the check below can fail: hybrid reads every batch
    counted_reads["read"] = 0
    run, base = _batches(base_cfg)
    assert counted_reads == {"read": 0, "read_tokens": 0}  # not one teacher feature read

    assert len(base) == len(hybrid)
    for b, h in zip(base, hybrid):
        assert torch.equal(b.rows, h.rows) and torch.equal(b.views, h.views)
        assert torch.equal(b.images, h.images)  # the same pixels, batch for batch
        assert b.teacher_feats == {} and h.teacher_feats  # the baseline carries no teacher feature
    views = torch.cat([b.views for b in base])
    assert set(views.tolist()) == {0, 1}  # stored views (never -1: own crop), both of the cache's 2 used
    # one image by hand: the stored view of its cache row, cropped and resized as the teachers' view was
    ds = run.loader.dataset
    row, k = int(base[0].rows[0]), int(base[0].views[0])
    params = h5_reader.FeatureReader(str(tiny_cache)).view_params([run.join.cache_rows[row]])[0, k].tolist()
    want = make_uint8_view_transform(ds.preprocess)(ds.corpus.load_image(row), params)
    assert torch.equal(base[0].images[0], want)
    assert [t.kind for t in run.terms] == ["infonce"] and run.plan.teachers == {} and run.plan.stored_views
    assert (run.loader.sampler.block_ids is not None) == (sampler == "auto")  # auto: the hybrid run's order


def test_replay_trains_without_reading_a_feature_and_records_it(
    tiny_corpus, tiny_cache, tiny_tokenizer, tmp_path, monkeypatch
):
    def refuse(*a, **k):
        raise AssertionError("the same-views baseline read a teacher feature")

    for name in ("read", "read_tokens", "stats"):
        monkeypatch.setattr(h5_reader.FeatureReader, name, refuse)
    out = tmp_path / "run"
    cfg = tiny_config(
        tiny_corpus,
        out,
        tiny_cache,
        mode="contrastive",
        tokenizer=tiny_tokenizer,
        train__max_steps=2,
        train__checkpoint_every=0,
    )
    assert train(cfg)["step"] == 2
    assert all(set(r) & {"feature", "icl", "affinity"} == set() and "infonce" in r for r in read_log(out))
    meta = json.loads((out / "run_meta.json").read_text())
    assert meta["mode"] == "contrastive" and meta["teachers"] == {} and meta["stored_views"] is True
    assert meta["augmentation"] == (
        f"stored views of {tiny_cache}: 2 per image (seed 0): scale 0.5-1, "
        f"ratio 0.75-1.33333, no flips, no colour jitter"
    )


def test_plain_contrastive_is_unchanged(tiny_corpus, tiny_cache, tiny_tokenizer, tmp_path, counted_reads):
    plain_cfg = tiny_config(tiny_corpus, tmp_path / "p", None, mode="contrastive", tokenizer=tiny_tokenizer)
    off_cfg = tiny_config(
        tiny_corpus, tmp_path / "o", tiny_cache, mode="contrastive", tokenizer=tiny_tokenizer, data__use_views="false"
    )
    assert not replays_views(plain_cfg) and not replays_views(off_cfg)
    plain_run, plain = _batches(plain_cfg)
    off_run, off = _batches(off_cfg)
    assert plain_run.join is None and off_run.join is None  # the cache is not even opened with use_views=false
    assert counted_reads == {"read": 0, "read_tokens": 0}
    assert plain_run.loader.sampler.block_ids is None  # auto without a cache: random, as before
    for a, b in zip(plain, off, strict=True):
        assert torch.equal(a.rows, b.rows) and torch.equal(a.images, b.images)
        assert (a.views == -1).all() and (b.views == -1).all()
    # the first image by hand: the student's own crop, drawn from the sample's (seed, epoch, index) generator
    ds, row = plain_run.loader.dataset, int(plain[0].rows[0])
    img = ds.corpus.load_image(row)
    params = random_crop_params(sample_generator(0, 0, row), img.width, img.height, (0.9, 1.0), False)
    assert torch.equal(plain[0].images[0], make_uint8_view_transform(ds.preprocess)(img, params))
    assert not plain_run.plan.stored_views and not off_run.plan.stored_views
    assert plain_run.plan.augmentation == "own crops: scale 0.9-1, ratio 0.75-1.33333, no flips, no colour jitter"
    assert [t.kind for t in off_run.terms] == ["infonce"]


def test_refusals(tiny_corpus, tiny_teachers, tiny_cache, tiny_tokenizer, tmp_path):
    no_views = tmp_path / "no-views.h5"  # one teacher, no --views
    build_cache(
        CacheJob(
            data=str(tiny_corpus),
            teachers={"oc": tiny_teachers["oc"]},
            out=str(no_views),
            batch_size=16,
            num_workers=0,
            device="cpu",
            progress=False,
        )
    )
    cfg = tiny_config(tiny_corpus, tmp_path / "a", no_views, mode="contrastive", tokenizer=tiny_tokenizer)
    with pytest.raises(
        DataError,
        match=r"^mode=contrastive with data\.features=\S+no-views\.h5 and "
        r"data\.use_views=true .* stores none .* set data\.use_views=false",
    ):
        build_run(cfg, make_accelerator(cfg))
    ok = tiny_config(
        tiny_corpus, tmp_path / "b", no_views, mode="contrastive", tokenizer=tiny_tokenizer, data__use_views="false"
    )
    assert build_run(ok, make_accelerator(ok)).join is None  # the way out the message names works

    # crops set against the stored views: refused as for a hybrid run (the harness's 0.8-1 baseline crops)
    cfg = tiny_config(
        tiny_corpus,
        tmp_path / "c",
        tiny_cache,
        mode="contrastive",
        tokenizer=tiny_tokenizer,
        data__crop_scale="[0.8, 1.0]",
    )
    with pytest.raises(ConfigError, match=r"data\.crop_scale=\[0\.8, 1\] contradicts the cache's stored views"):
        build_run(cfg, make_accelerator(cfg))

    # the cache's fingerprint check against the corpus still applies
    other = make_synthetic_corpus(tmp_path / "other", n=32, image_size=48, seed=1)
    cfg = tiny_config(other, tmp_path / "d", tiny_cache, mode="contrastive", tokenizer=tiny_tokenizer)
    with pytest.raises(DataError, match="was built from another corpus"):
        build_run(cfg, make_accelerator(cfg))
