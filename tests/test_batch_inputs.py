"""A loss term that needs a new per-row batch input, added from outside the project (this module only): the term
lists the input by name, the data side registers its producer, and `distill train` carries it from the collate to
the term (device copy, merged batches, GradCache included). Also the public step (`distill.training.step`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor
from train_fixtures import read_log, tiny_config  # noqa: F401

from distill.data.inputs import (
    BATCH_INPUTS,
    BatchRows,
    InputSetup,
    Producer,
    concat_inputs,
    move_inputs,
    register_batch_input,
    select_inputs,
)
from distill.data.loader import TrainBatch
from distill.losses import LOSSES, LossTerm, StepContext, register_loss
from distill.train import train
from teachers.kernel.modality import Modality

SEEN: list[tuple[np.ndarray, np.ndarray]] = []  # (target the term saw, corpus rows of the batch), per call


class ParityTarget:
    """The toy input's producer: 0.4 for even corpus rows, 0.6 for odd ones, and the rows (so the test can check
    which rows the term saw). A class instance: picklable into DataLoader workers."""

    def __call__(self, rows: BatchRows) -> dict[str, Tensor]:
        target = np.where(rows.corpus_rows % 2 == 0, 0.4, 0.6).astype(np.float32)
        return {"target": torch.from_numpy(target), "rows": torch.from_numpy(rows.corpus_rows)}


def parity_target(setup: InputSetup) -> Producer:
    assert setup.corpus is not None and setup.cfg.mode == "contrastive"
    return ParityTarget()


class ParityTerm(LossTerm):
    """Regress the first image-embedding component to the row's parity target."""

    uses_teachers = False
    uses_logit_scale = False
    batch_inputs = ("toy_parity",)

    def per_sample(self, ctx: StepContext, teacher: str | None = None) -> Tensor:
        got = ctx.batch_input("toy_parity")
        SEEN.append((got["target"].cpu().numpy(), got["rows"].cpu().numpy()))
        return (ctx.student_feats(Modality.IMAGE)[:, 0] - got["target"]) ** 2


@pytest.fixture
def toy_term():
    """Register the toy term and its input for one test, then forget them."""
    register_batch_input(parity_target, key="toy_parity")
    register_loss(ParityTerm, key="toy_parity")
    SEEN.clear()
    try:
        yield
    finally:
        BATCH_INPUTS._items.pop("toy_parity", None)
        LOSSES._items.pop("toy_parity", None)


@pytest.mark.parametrize("micro", [None, 4])
def test_a_new_term_with_a_new_batch_input_trains(toy_term, micro, tiny_corpus, tmp_path):
    steps = 20
    extra = {"data__micro_batch_size": micro, "train__grad_accum": 2} if micro else {}
    cfg = tiny_config(
        tiny_corpus,
        tmp_path / "run",
        mode="contrastive",
        train__max_steps=steps,
        train__checkpoint_every=0,
        loss__terms="[{kind: infonce}, {kind: toy_parity, weight: 5.0}]",
        **extra,
    )
    train(cfg)
    rows = read_log(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    first, last = np.mean([r["toy_parity"] for r in rows[:3]]), np.mean([r["toy_parity"] for r in rows[-3:]])
    assert last < 0.5 * first, (first, last)
    assert SEEN  # the term saw each batch's own rows' values, with the merged batch's size under accumulation
    for target, corpus_rows in SEEN:
        assert len(corpus_rows) == (16 if micro else 8)
        np.testing.assert_array_equal(target, np.where(corpus_rows % 2 == 0, 0.4, 0.6).astype(np.float32))


def test_an_unregistered_input_is_named(toy_term, tiny_corpus, tmp_path):
    BATCH_INPUTS._items.pop("toy_parity")
    cfg = tiny_config(
        tiny_corpus,
        tmp_path / "run",
        mode="contrastive",
        train__max_steps=1,
        loss__terms="[{kind: infonce}, {kind: toy_parity}]",
    )
    with pytest.raises(KeyError, match="toy_parity.*read the batch input 'toy_parity'"):
        train(cfg)


def test_inputs_move_merge_and_slice_generically():
    a = {"x": torch.arange(4), "by": {"t": torch.ones(4, 2)}}
    b = {"x": torch.arange(4, 6), "by": {"t": torch.zeros(2, 2)}}
    merged = concat_inputs([a, b])
    assert merged["x"].tolist() == list(range(6)) and merged["by"]["t"].shape == (6, 2)
    part = select_inputs(merged, slice(3, 5))
    assert part["x"].tolist() == [3, 4] and part["by"]["t"][:, 0].tolist() == [1.0, 0.0]
    moved = TrainBatch(
        torch.zeros(6, 3, 2, 2, dtype=torch.uint8),
        torch.zeros(6, 4, dtype=torch.long),
        torch.arange(6),
        torch.full((6,), -1),
        inputs=merged,
    ).to("cpu")
    assert moved.inputs["x"].tolist() == list(range(6)) and move_inputs({}, "cpu") == {}
