"""train.resume=none into a folder that holds an earlier run's checkpoints is refused before anything is written.

Why: a fresh run there overwrote the old log.jsonl, and pruning to keep_last by step number deleted the NEW run's
checkpoints (5 < 20), so `distill export RUN` silently exported the old run.
"""

from __future__ import annotations

import pytest
from train_fixtures import tiny_config, tiny_tokenizer  # noqa: F401  (fixture)

import distill.train as train_mod
from distill.training.checkpoint import list_checkpoints


def _cfg(corpus, out, tokenizer, steps, resume):
    return tiny_config(
        corpus,
        out,
        mode="contrastive",
        tokenizer=tokenizer,
        train__max_steps=steps,
        train__checkpoint_every=steps,
        train__keep_last=1,
        train__resume=resume,
    )


def test_resume_none_refuses_a_folder_with_checkpoints(tiny_corpus, tiny_tokenizer, tmp_path):
    run = tmp_path / "run"
    first = train_mod.train(_cfg(tiny_corpus, run, tiny_tokenizer, steps=3, resume="none"))  # empty folder: fine
    assert first["step"] == 3 and [d.name for d in list_checkpoints(run)] == ["checkpoint-3"]
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}

    with pytest.raises(ValueError, match=r"train.resume=none, but .*run already holds checkpoint-3"):
        train_mod.train(_cfg(tiny_corpus, run, tiny_tokenizer, steps=2, resume="none"))
    after = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after == before  # refused before build_run: log, run_meta, student/ and checkpoint untouched

    # the two ways out named in the message work: auto continues the old run, a new folder starts afresh
    again = train_mod.train(_cfg(tiny_corpus, run, tiny_tokenizer, steps=4, resume="auto"))
    assert again["step"] == 4 and [d.name for d in list_checkpoints(run)] == ["checkpoint-4"]
    fresh = train_mod.train(_cfg(tiny_corpus, tmp_path / "new", tiny_tokenizer, steps=2, resume="none"))
    assert fresh["step"] == 2


def test_rewinding_to_an_older_checkpoint_in_place_is_refused(tiny_corpus, tiny_tokenizer, tmp_path):
    """Resuming from checkpoint-2 while checkpoint-4 sits beside it would mix two trajectories in one folder."""
    run = tmp_path / "run"
    cfg = tiny_config(
        tiny_corpus,
        run,
        mode="contrastive",
        tokenizer=tiny_tokenizer,
        train__max_steps=4,
        train__checkpoint_every=2,
        train__keep_last=3,
    )
    train_mod.train(cfg)
    assert [d.name for d in list_checkpoints(run)] == ["checkpoint-2", "checkpoint-4"]
    rewind = tiny_config(
        tiny_corpus,
        run,
        mode="contrastive",
        tokenizer=tiny_tokenizer,
        train__max_steps=6,
        train__resume=str(run / "checkpoint-2"),
    )
    with pytest.raises(ValueError, match=r"also holds newer checkpoint-4"):
        train_mod.train(rewind)
    # into a new folder, the same checkpoint is a fine starting point
    other = tiny_config(
        tiny_corpus,
        tmp_path / "branch",
        mode="contrastive",
        tokenizer=tiny_tokenizer,
        train__max_steps=3,
        train__resume=str(run / "checkpoint-2"),
    )
    assert train_mod.train(other)["step"] == 3
