"""Shared pieces of the training tests: a feature cache of the tiny corpus and a tiny-config builder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import distill.training.build_run as build_run_mod
from cache.build.run import CacheJob, build_cache
from cache.sources.corpus import open_corpus
from distill.config.train_config import Config
from distill.training.optim import lr_factor
from student.tokenizer import train_wordpiece

ROOT = Path(__file__).resolve().parents[1]
NO_DROPOUT = {"text_config": {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}}


@pytest.fixture(scope="session")
def tiny_cache(tiny_corpus, tiny_teachers, tmp_path_factory) -> Path:
    """Both tiny teachers over the 32-row corpus, with 2 stored views per image."""
    out = tmp_path_factory.mktemp("cache") / "features.h5"
    build_cache(
        CacheJob(
            data=str(tiny_corpus),
            teachers=tiny_teachers,
            out=str(out),
            batch_size=16,
            num_workers=0,
            device="cpu",
            views=2,
            progress=False,
        )
    )
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_corpus, tmp_path_factory) -> Path:
    """One WordPiece folder shared by the runs that are compared (built once per session)."""
    return train_wordpiece(open_corpus(tiny_corpus).captions, tmp_path_factory.mktemp("tok") / "wp", vocab_size=1000)


def tiny_config(corpus, out_dir, features=None, mode="hybrid", tokenizer=None, **sections):
    """configs/tiny-hybrid.yaml with this corpus/cache/output and `section.key=value` overrides from kwargs."""
    overrides = [
        f"data.corpus={corpus}",
        f"train.output_dir={out_dir}",
        f"mode={mode}",
        f"data.features={features if features else 'null'}",
        f"student.tokenizer_dir={tokenizer if tokenizer else 'null'}",
    ]
    if mode != "hybrid":
        overrides.append("loss.terms=[]")  # the mode's default terms
    else:  # every kind of term and head (the shipped config's recipe, InfoNCE + affinity, has no heads)
        overrides.append("loss.terms=[{kind: infonce}, {kind: feature, kwargs: {metric: cosine}}, {kind: icl}]")
    overrides += [f"{k.replace('__', '.')}={v}" for k, v in sections.items()]
    return Config.from_yaml(ROOT / "configs" / "tiny-hybrid.yaml", overrides)


# Weights of two runs after a few AdamW steps, when the runs sum in float32 in another order (1 vs 2 processes, FSDP
# shards, accumulation vs one batch, and whatever order the CPU's kernels pick: AVX2 vs AVX-512, 1 or 2 threads).
# Each gradient then differs by |dg| <= n x 2^-24 x sum|summands| <= GRAD_REL x G (n ~ 8 rows x 32 token positions,
# sum|summands| <= 30 x G with G the run's largest |gradient|). At the shipped eps = 1e-6 AdamW divides a gradient by
# its own size, so one that is pure rounding noise (an attention key bias: its true gradient is 0, softmax ignores a
# shift shared by a row) moves its weight by up to lr per step either way, and the runs could differ by 2 x sum(lr),
# as much as the weights move at all. With eps >= G AdamW's step m^/(sqrt(v^) + eps) is Lipschitz in the gradients
# with a small constant, |du| <= 2.002 max|dg| / eps (m^ is a convex combination of the g's, sqrt(v^) their weighted
# RMS, and |m^| <= 1.002 sqrt(v^) for t <= 3 with betas (0.9, 0.98)), while the largest gradients still take
# O(lr) steps; so weights differ by <= 2.002 x sum(lr) x GRAD_REL x G / eps (2.2e-6 over 3 warmup steps; H x dw
# adds a second-order amount), plus one rounding of |w| per step (rtol). Both runs use the same optimizer: equal
# updates mean equal gradients, which is what these tests compare. `max_gradient` checks G <= eps from the optimizer
# state. Measured here: 1.5e-8 (1 or 2 threads). A rank's rows or a micro-batch dropped, or gradients summed
# instead of averaged, moves weights by >= 1e-4 (summed would be nearly invisible at eps = 1e-6: AdamW's step
# ignores the gradient's scale).
GRAD_REL = 256 * 2.0**-24 * 30  # 4.6e-4


def adamw_lipschitz(grad_max: float) -> dict:
    """The config override making AdamW Lipschitz in the gradients (eps = the run's largest |gradient|)."""
    return {"optim__eps": grad_max}


def max_gradient(ckpt_dir, cfg) -> float:
    """An upper bound of every |gradient| of the run so far, from the checkpoint's AdamW state: v_t >= (1 - b2) x
    b2^(t-1) x g_i^2 for each step i <= t."""
    state = torch.load(Path(ckpt_dir) / "optimizer.bin", weights_only=True)["state"]
    b2, t = cfg.optim.betas[1], cfg.train.max_steps
    return max((s["exp_avg_sq"] / ((1 - b2) * b2 ** (t - 1))).sqrt().max().item() for s in state.values())


# The logged losses of two runs that sum in another order: a logit is s x cos, s <= 14.3 (the student's and the tiny
# teachers' 1/0.07), cos a dot of <= 64 terms of unit vectors (sum|a_k b_k| <= 1), off by <= 64 x 2^-24 = 3.8e-6 in
# any order, plus the unit embeddings' own forward rounding in another batch shape (a few ulps per block, 4 blocks:
# <= 3e-6 each side); so a logit by <= 14.3 x 1e-5 = 1.4e-4, a row's cross-entropy by twice that, and each logged
# term (>= 0.7 here) by <= 4e-4 relative. Measured here: <= 9e-8. Logging a rank's own loss instead of the mean over
# ranks is off by >= 1e-2 (a 4-row mean against an 8-row one).
LOSS_RTOL = 4e-4


def assert_same_weights(a: dict, b: dict, cfg) -> None:
    """`a` == `b` (state dicts after cfg.train.max_steps steps of a run with `adamw_lipschitz`) up to the bound
    above."""
    steps = cfg.train.max_steps
    sum_lr = sum(cfg.optim.lr * lr_factor(s, steps, cfg.optim) for s in range(steps))
    atol, rtol = 2.002 * sum_lr * GRAD_REL, steps * 2.0**-23  # x G / eps <= 1 (max_gradient checks G)
    assert a.keys() == b.keys()
    for k, v in a.items():
        diff = (v - b[k].reshape(v.shape)).abs()
        assert (diff <= atol + rtol * v.abs()).all(), (k, diff.max().item(), atol)


def read_log(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "log.jsonl").read_text().splitlines()]


def load_weights(ckpt_dir) -> dict:
    return load_file(str(Path(ckpt_dir) / "model.safetensors"))


def nan_loss_at_call(n: int, keys=("infonce", "loss")):
    """A replacement for distill.training.build_run.build_run whose loss turns the `keys` terms (None: all) NaN on its
    n-th call."""
    real_build = build_run_mod.build_run

    def build(cfg, accelerator):
        built = real_build(cfg, accelerator)
        calls, forward = [], built.loss.forward

        def nan_forward(*args, **kwargs):
            calls.append(1)
            out = forward(*args, **kwargs)
            return (
                {k: v * float("nan") if keys is None or k in keys else v for k, v in out.items()}
                if len(calls) == n
                else out
            )

        built.loss.forward = nan_forward
        return built

    return build


def train_killed_after(monkeypatch, cfg, step: int) -> None:
    """Run `cfg` as if the job were killed right after writing checkpoint-`step` (the next run resumes from it)."""
    import distill.train as train_mod  # noqa: PLC0415 (lazy: the tests that kill runs import it anyway)

    real_save = train_mod.save_checkpoint

    class Killed(Exception):
        pass

    def save_then_die(accelerator, out, state, keep_last, **kw):
        path = real_save(accelerator, out, state, keep_last, **kw)
        if state.step == step:
            raise Killed
        return path

    monkeypatch.setattr(train_mod, "save_checkpoint", save_then_die)
    try:
        with pytest.raises(Killed):
            train_mod.train(cfg)
    finally:
        monkeypatch.setattr(train_mod, "save_checkpoint", real_save)
