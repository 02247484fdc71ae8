"""Training options reached from the config: freezing, patch dropout, checkpointing, bf16, accumulation, the logit
scale clamp, which teachers and how they combine (PHI-S too), and that every trainable parameter gets a gradient
(what DDP without find_unused_parameters needs)."""

from __future__ import annotations

import csv
import math
import sys
import types

import numpy as np
import pytest
import torch
from open_clip.transformer import PatchDropout
from train_fixtures import (  # noqa: F401
    adamw_lipschitz,
    assert_same_weights,
    load_weights,
    max_gradient,
    read_log,
    tiny_cache,
    tiny_config,
    tiny_tokenizer,
)

from distill.data.loader import Collate, TrainBatch, caption_id
from distill.losses import TeacherBatch
from distill.train import make_accelerator, train
from distill.training.build_run import build_run
from distill.training.log import RunLogger
from distill.training.optim import param_groups
from distill.training.student_model import DistillModel


def _build(cfg):
    return build_run(cfg, make_accelerator(cfg))


def _grads_after_one_step(run):
    """Forward + backward on one batch of the run; {name: grad or None} over the trainable params."""
    batch = next(iter(run.loader))
    scales = {t: float(a["logit_scale"]) for t, a in run.plan.teacher_attrs.items()}
    out = run.model(batch.images, batch.tokens)
    teachers = TeacherBatch(batch.teacher_feats, scales) if batch.teacher_feats else None
    run.loss(out, teachers, torch.Generator().manual_seed(0))["loss"].backward()
    return {n: p.grad for n, p in run.model.named_parameters() if p.requires_grad}


def test_freezing_patch_dropout_and_checkpointing_from_the_config(tiny_corpus, tiny_cache, tiny_tokenizer, tmp_path):
    cfg = tiny_config(
        tiny_corpus,
        tmp_path / "run",
        tiny_cache,
        tokenizer=tiny_tokenizer,
        train__max_steps=2,
        train__checkpoint_every=0,
        student__freeze_vision_blocks=1,
        student__lock_text_layers=1,
        student__patch_dropout=0.5,
        student__grad_checkpointing="true",
        student__overrides__init_logit_scale=math.log(200),
    )
    run = _build(cfg)
    student = run.model.student
    frozen = {n for n, p in run.model.named_parameters() if not p.requires_grad}
    stem = {
        "visual.conv1.weight",
        "visual.class_embedding",
        "visual.positional_embedding",
        "visual.ln_pre.weight",
        "visual.ln_pre.bias",
    }
    assert {n for n in frozen if n.startswith("student.visual.")} == {f"student.{n}" for n in stem} | {
        f"student.{n}" for n, _ in student.named_parameters() if n.startswith("visual.transformer.resblocks.0.")
    }
    assert {n for n in frozen if n.startswith("student.text.")} == {
        f"student.{n}"
        for n, _ in student.named_parameters()
        if n.startswith(("text.transformer.embeddings.", "text.transformer.encoder.layer.0."))
    }
    assert not any(n.startswith(("heads.", "student.logit")) for n in frozen)
    assert isinstance(student.visual.patch_dropout, PatchDropout) and student.visual.patch_dropout.prob == 0.5
    assert student.visual.transformer.grad_checkpointing and student.text.transformer.is_activation_checkpointing
    # the optimizer sees only trainable params; gains, biases and the logit scale are not decayed
    groups = {g["name"]: g for g in param_groups(run.model, 0.2)}
    names = {id(p): n for n, p in run.model.named_parameters()}
    decayed = {names[id(p)] for p in groups["decay"]["params"]}
    kept = {names[id(p)] for p in groups["no_decay"]["params"]}
    assert not (decayed | kept) & frozen and len(decayed | kept) + len(frozen) == len(names)
    assert "student.logit_scale" in kept and all(not n.endswith(".bias") for n in decayed)
    assert all(dict(run.model.named_parameters())[n].ndim >= 2 for n in decayed)
    init = {n: p.detach().clone() for n, p in run.model.named_parameters()}

    train(cfg)  # the same seed builds the same initial weights
    after = load_weights(tmp_path / "run" / "checkpoint-2")
    for n, p in init.items():
        if n == "student.logit_scale":
            continue
        assert torch.equal(after[n], p) == (n in frozen), n
    # exp(logit_scale) started at 200: the clamp after each optimizer step holds it at 100
    assert after["student.logit_scale"].item() == pytest.approx(math.log(100))


def test_bf16_autocast_runs_with_finite_losses(tiny_corpus, tiny_cache, tiny_tokenizer, tmp_path, monkeypatch):
    seen = []
    forward = DistillModel.forward

    def spy(self, images, tokens):
        out = forward(self, images, tokens)
        seen.append(self.student.visual.transformer.resblocks[0].mlp.c_fc(out.image.new_zeros(1, 64)).dtype)
        return out

    monkeypatch.setattr(DistillModel, "forward", spy)
    cfg = tiny_config(
        tiny_corpus,
        tmp_path / "bf16",
        tiny_cache,
        tokenizer=tiny_tokenizer,
        train__max_steps=2,
        train__checkpoint_every=0,
        train__mixed_precision="bf16",
    )
    result = train(cfg)
    assert seen and all(d == torch.bfloat16 for d in seen)  # the forward ran under bf16 autocast
    rows = read_log(tmp_path / "bf16")
    assert len(rows) == 2 and all(np.isfinite(r[k]) for r in rows for k in ("loss", "infonce", "feature", "icl"))
    assert np.isfinite(result["losses"]["loss"])


def test_gradient_accumulation_equals_the_whole_batch(tiny_corpus, tiny_cache, tiny_tokenizer, tmp_path):
    """2 micro-batches of 4 == one batch of 8 for a per-sample term (InfoNCE's negatives would differ)."""
    weights = {}
    for name, per_device, accum in [("whole", 8, 1), ("accum", 4, 2)]:
        cfg = tiny_config(
            tiny_corpus,
            tmp_path / name,
            tiny_cache,
            mode="distill",
            tokenizer=tiny_tokenizer,
            train__max_steps=2,
            train__checkpoint_every=0,
            train__grad_accum=accum,
            data__batch_size=per_device,
            **{"loss__terms": "[{kind: feature, kwargs: {metric: mse}}]"},
            **adamw_lipschitz(0.02),
        )  # eps >= every |gradient| (0.017): train_fixtures.GRAD_REL
        train(cfg)
        weights[name] = load_weights(tmp_path / name / "checkpoint-2")
        assert read_log(tmp_path / name)[0]["step"] == 1
    # 4 + 4 rows summed in another order than 8: within 1.1e-6 after 2 steps (measured 1.5e-8); a micro-batch
    # dropped: 1.3e-4, gradients not divided by the accumulation steps: 2e-4
    assert max_gradient(tmp_path / "whole" / "checkpoint-2", cfg) <= cfg.optim.eps
    assert_same_weights(weights["whole"], weights["accum"], cfg)
    la, lb = read_log(tmp_path / "whole"), read_log(tmp_path / "accum")
    # the logged loss, a float32 mean over 8 rows of (p - y)^2 means over D <= 40 dims, either as one mean or as two
    # 4-row means averaged: <= (8 + 40) x 2^-24 = 3e-6 relative of the non-negative summands (no cancellation);
    # the 2nd step adds sum|g| x 1.1e-6 from weights <= 1.1e-6 apart (measured: 0 in all). Logging one
    # micro-batch's loss only: off by >= 1e-2.
    assert [r["loss"] for r in la] == pytest.approx([r["loss"] for r in lb], rel=3e-6)


@pytest.mark.parametrize(
    "mode,terms,frozen",
    [
        ("hybrid", None, set()),
        ("distill", "[{kind: feature, kwargs: {modalities: [image]}}]", "text tower"),
        (
            "distill",
            "[{kind: feature, kwargs: {modalities: [image]}}, {kind: feature, name: ft, teachers: {hf: 1}}]",
            {"student.logit_scale", "heads.text.oc.weight"},
        ),
        ("distill", "[{kind: affinity}]", set()),
    ],
)
def test_every_trainable_parameter_gets_a_gradient(
    mode, terms, frozen, tiny_corpus, tiny_cache, tiny_tokenizer, tmp_path
):
    """What no term reaches is frozen, so DDP runs without find_unused_parameters in every mode."""
    extra = {"loss__terms": terms, "loss__teachers": "{oc: 1.0, hf: 1.0}"} if terms else {}
    run = _build(tiny_config(tiny_corpus, tmp_path, tiny_cache, mode=mode, tokenizer=tiny_tokenizer, **extra))
    if frozen == "text tower":  # an image-only loss reaches neither the text tower nor the text heads
        frozen = {n for n, _ in run.model.named_parameters() if n.startswith(("student.text.", "heads.text."))}
        frozen.add("student.logit_scale")
        assert len(frozen) > 10
    assert {n for n, p in run.model.named_parameters() if not p.requires_grad} == frozen
    assert (run.model.heads is None) == (terms == "[{kind: affinity}]")  # affinity reads no projection heads
    assert run.model.heads is None or sorted(run.model.heads.teachers) == ["hf", "oc"]
    grads = _grads_after_one_step(run)
    assert [n for n, g in grads.items() if g is None] == []


def test_teacher_choice_combination_and_phi_s_from_the_config(tiny_corpus, tiny_cache, tiny_tokenizer, tmp_path):
    run = _build(
        tiny_config(
            tiny_corpus,
            tmp_path,
            tiny_cache,
            tokenizer=tiny_tokenizer,
            loss__teachers="{oc: 2.0, hf: 1.0}",
            loss__combine__mode="random_teacher",
            loss__combine__drop_prob=0.25,
            loss__combine__balance="phi_s",
        )
    )
    loss = run.loss
    assert (loss.combine_cfg.mode, loss.combine_cfg.drop_prob, loss.combine_cfg.balance) == (
        "random_teacher",
        0.25,
        "phi_s",
    )
    assert loss.teacher_weights["feature"] == {"oc": 2.0, "hf": 1.0} and run.plan.teachers == {"oc": 2.0, "hf": 1.0}
    assert sorted(loss.phi_s.keys) == [("hf", "image"), ("hf", "text"), ("oc", "image"), ("oc", "text")]
    draw = loss.draw(8, torch.Generator().manual_seed(0))
    assert draw.uniforms is not None and draw.uniforms.shape == (8,)

    one = _build(
        tiny_config(tiny_corpus, tmp_path / "one", tiny_cache, tokenizer=tiny_tokenizer, loss__teachers="{hf: 1.0}")
    )  # a named subset: only that teacher, its head only
    assert one.plan.teachers == {"hf": 1.0} and one.model.heads.teachers == ["hf"] and one.loss.phi_s is None
    assert set(next(iter(one.loader)).teacher_feats) == {"hf"}
    every = _build(tiny_config(tiny_corpus, tmp_path / "all", tiny_cache, tokenizer=tiny_tokenizer))
    assert every.plan.teachers == {"oc": 1.0, "hf": 1.0}  # names none: every cached teacher, equal weights
    assert every.loss.teacher_weights == {"feature": {"oc": 1.0, "hf": 1.0}, "icl": {"oc": 1.0, "hf": 1.0}}


def test_tensorboard_gets_every_logged_value(tmp_path, monkeypatch):
    """tensorboard is not a dependency: a stand-in SummaryWriter checks the calls torch's writer would get."""
    calls = []

    class Writer:
        def __init__(self, log_dir):
            calls.append(("init", log_dir))

        def add_scalar(self, tag, value, step):
            calls.append((tag, value, step))

        def close(self):
            calls.append(("close",))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    logger = RunLogger(tmp_path, tensorboard=True)
    logger.log(3, {"loss": 1.5, "infonce": 1.0, "lr": 1e-4, "samples_per_s": 10.0})
    logger.close()
    assert calls == [
        ("init", str(tmp_path / "tb")),
        ("loss/loss", 1.5, 3),
        ("loss/infonce", 1.0, 3),
        ("lr", 1e-4, 3),
        ("samples_per_s", 10.0, 3),
        ("close",),
    ]
    assert RunLogger(tmp_path / "off", tensorboard=False)._tb is None and len(calls) == 6


# ---------------------------------------------------------------------------------------------- caption positives


def test_collate_gives_each_caption_a_stable_63_bit_id():

    # BLAKE2b of the UTF-8 string, top bit cleared: the same in every process, run and Python (no hash() salt)
    assert caption_id("a chest x-ray showing pneumonia") == 9188361894126729554
    assert caption_id("") == 7252660547403494068 and 0 <= caption_id("é") < 2**63
    caps = [
        "a chest x-ray showing pneumonia",
        "a chest x-ray showing no pneumonia",
        "a chest x-ray showing pneumonia",
        "A chest x-ray showing pneumonia",
    ]
    items = [
        {"image": torch.zeros(3, 4, 4), "caption": c, "row": i, "cache_row": i, "view": -1} for i, c in enumerate(caps)
    ]
    batch = Collate(lambda texts: torch.zeros(len(texts), 5, dtype=torch.long))(items)
    assert batch.caption_ids.dtype == torch.int64
    assert batch.caption_ids.tolist() == [caption_id(c) for c in caps]
    ids = batch.caption_ids.tolist()
    assert ids[0] == ids[2] and len(set(ids)) == 3  # exact string equality: case matters
    assert torch.equal(batch.to("cpu").caption_ids, batch.caption_ids)
    assert TrainBatch(batch.images, batch.tokens, batch.rows, batch.views).to("cpu").caption_ids is None
    # a run whose terms never read them (no `positives: caption`) does not hash captions on its hot path
    quiet = Collate(lambda texts: torch.zeros(len(texts), 5, dtype=torch.long), caption_ids=False)(items)
    assert quiet.caption_ids is None and torch.equal(quiet.tokens, batch.tokens)


@pytest.fixture(scope="module")
def templated_corpus(tiny_corpus):
    """The tiny corpus's images with captions from 2 templates over the colour only: 10 captions for 32 rows."""
    with open(tiny_corpus, newline="") as f:
        rows = list(csv.DictReader(f))
    templates = ["a {} object", "an image showing something {}"]
    out = tiny_corpus.parent / "corpus_templated.csv"
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows({**r, "caption": templates[i % 2].format(r["caption"].split()[4])} for i, r in enumerate(rows))
    return out


def test_contrastive_with_caption_positives_trains(templated_corpus, tmp_path):
    steps = 30
    out = tmp_path / "run"
    cfg = tiny_config(
        templated_corpus,
        out,
        mode="contrastive",
        train__max_steps=steps,
        train__checkpoint_every=0,
        **{"loss__terms": "[{kind: infonce, kwargs: {positives: caption}}]"},
    )
    run = _build(cfg)
    assert run.loss.uses_caption_ids
    batch = next(iter(run.loader))
    captions = [run.corpus.captions[r] for r in batch.rows.tolist()]
    assert batch.caption_ids.tolist() == [caption_id(c) for c in captions]
    assert len(set(captions)) < len(captions)  # the batch really holds duplicated captions
    result = train(cfg)
    rows = read_log(out)
    assert [r["step"] for r in rows] == list(range(1, steps + 1)) and result["step"] == steps
    first, last = np.mean([r["infonce"] for r in rows[:5]]), np.mean([r["infonce"] for r in rows[-5:]])
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert last < 0.8 * first, f"loss did not fall by 20% ({first:.3f} -> {last:.3f})"
