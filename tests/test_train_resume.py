"""A run killed after a checkpoint and resumed with train.resume=auto ends with the same weights as one that never
stopped, across a batch-size schedule change (accumulation 1 -> 2) and with dropout on."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from train_fixtures import load_weights, read_log, tiny_cache, tiny_config, tiny_tokenizer  # noqa: F401  (fixtures)

import distill.train as train_mod
from cache.store.segments import copy_cache
from distill.training.checkpoint import list_checkpoints


class Killed(Exception):
    pass


def _cfg(corpus, cache, out, tokenizer):
    # 32 rows, 8 per micro-batch: epoch 0 = 4 steps of 8, then 16 per step (accumulation 2) = 2 steps per epoch
    return tiny_config(
        corpus,
        out,
        cache,
        tokenizer=tokenizer,
        train__max_steps=12,
        train__checkpoint_every=5,
        train__keep_last=2,
        train__batch_schedule="[[0, 8], [1, 16]]",
        student__overrides__text_config__hidden_dropout_prob=0.1,
    )


def test_resume_matches_uninterrupted(tiny_corpus, tiny_cache, tiny_tokenizer, tmp_path, monkeypatch, capsys):
    straight = tmp_path / "straight"
    train_mod.train(_cfg(tiny_corpus, tiny_cache, straight, tiny_tokenizer))

    resumed = tmp_path / "resumed"
    real_save = train_mod.save_checkpoint

    def save_then_die(accelerator, out, state, keep_last, **kw):
        path = real_save(accelerator, out, state, keep_last, **kw)
        if state.step == 5:
            raise Killed  # as if the job were killed right after checkpoint-5 (mid-epoch 1)
        return path

    monkeypatch.setattr(train_mod, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        train_mod.train(_cfg(tiny_corpus, tiny_cache, resumed, tiny_tokenizer))
    monkeypatch.setattr(train_mod, "save_checkpoint", real_save)
    assert [d.name for d in list_checkpoints(resumed)] == ["checkpoint-5"]
    at5 = load_weights(resumed / "checkpoint-5")
    capsys.readouterr()
    result = train_mod.train(_cfg(tiny_corpus, tiny_cache, resumed, tiny_tokenizer))
    assert f"Resuming from {resumed / 'checkpoint-5'} at step 5" in capsys.readouterr().out
    assert result["step"] == 12

    # bit-equal: the resumed run does the same float32 operations in the same order on the same machine and
    # threads as the uninterrupted one (weights, optimizer state and RNG restored exactly from the checkpoint), so
    # any difference is a bug (a batch seen twice or skipped, a lost optimizer moment or dropout state)
    a, b = load_weights(straight / "checkpoint-12"), load_weights(resumed / "checkpoint-12")
    assert a.keys() == b.keys() and any(k.startswith("heads.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), (k, (a[k] - b[k]).abs().max().item())
    assert not torch.allclose(at5["heads.image.oc.weight"], b["heads.image.oc.weight"])  # training went on
    # every step logged once, with the same losses as the uninterrupted run
    la, lb = read_log(straight), read_log(resumed)
    assert [r["step"] for r in lb] == list(range(1, 13))
    assert [r["loss"] for r in lb] == [r["loss"] for r in la]
    assert [r["epoch"] for r in la] == [0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    # keep_last=2 pruned the older checkpoints; the final one is always written
    assert [d.name for d in list_checkpoints(resumed)] == ["checkpoint-10", "checkpoint-12"]
    state = (resumed / "checkpoint-12" / "train_state.json").read_text()
    assert '"step": 12' in state and '"samples_seen": 160' in state  # 4 x 8 + 8 x 16


def test_resume_refuses_a_cache_whose_teacher_dimension_changed(tiny_corpus, tiny_cache, tiny_tokenizer, tmp_path):
    """Resuming against a cache where a teacher now has another dimension names it instead of a size mismatch."""
    out = tmp_path / "run"
    train_mod.train(
        tiny_config(
            tiny_corpus, out, tiny_cache, tokenizer=tiny_tokenizer, train__max_steps=2, train__checkpoint_every=2
        )
    )
    changed = tmp_path / "changed.h5"
    copy_cache(str(tiny_cache), str(changed))  # the file and its segment folder
    with h5py.File(changed, "r+") as f:  # re-cached 'hf' with a 48-dim model under the same name
        g = f["teachers/hf"]
        g.attrs["embed_dim"] = 48
        for name in ("image", "text"):
            old = g[name][...]
            del g[name]
            g.create_dataset(name, data=np.zeros((*old.shape[:-1], 48), dtype=old.dtype))
    with pytest.raises(ValueError, match=r"cannot resume .*hf: 40 -> 48"):
        train_mod.train(
            tiny_config(
                tiny_corpus, out, changed, tokenizer=tiny_tokenizer, train__max_steps=4, train__checkpoint_every=2
            )
        )
