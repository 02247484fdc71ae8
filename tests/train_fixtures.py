"""Shared pieces of the training tests: a feature cache of the tiny corpus and a tiny-config builder."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NO_DROPOUT = {"text_config": {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}}


@pytest.fixture(scope="session")
def tiny_cache(tiny_corpus, tiny_teachers, tmp_path_factory) -> Path:
    """Both tiny teachers over the 32-row corpus, with 2 stored views per image."""
    from cache.build import CacheJob, build_cache

    out = tmp_path_factory.mktemp("cache") / "features.h5"
    build_cache(CacheJob(data=str(tiny_corpus), teachers=tiny_teachers, out=str(out), batch_size=16, num_workers=0,
                         device="cpu", views=2, progress=False))
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_corpus, tmp_path_factory) -> Path:
    """One WordPiece folder shared by the runs that are compared (built once per session)."""
    from cache.corpus import open_corpus
    from student.tokenizer import train_wordpiece

    return train_wordpiece(open_corpus(tiny_corpus).captions, tmp_path_factory.mktemp("tok") / "wp", vocab_size=1000)


def tiny_config(corpus, out_dir, features=None, mode="hybrid", tokenizer=None, **sections):
    """configs/tiny-hybrid.yaml with this corpus/cache/output and `section.key=value` overrides from kwargs."""
    from distill.config import Config

    overrides = [f"data.corpus={corpus}", f"train.output_dir={out_dir}", f"mode={mode}",
                 f"data.features={features if features else 'null'}",
                 f"student.tokenizer_dir={tokenizer if tokenizer else 'null'}"]
    if mode != "hybrid":
        overrides.append("loss.terms=[]")  # the mode's default terms
    else:  # every kind of term and head (the shipped config's recipe, InfoNCE + affinity, has no heads)
        overrides.append("loss.terms=[{kind: infonce}, {kind: feature, kwargs: {metric: cosine}}, {kind: icl}]")
    overrides += [f"{k.replace('__', '.')}={v}" for k, v in sections.items()]
    return Config.from_yaml(ROOT / "configs" / "tiny-hybrid.yaml", overrides)


def read_log(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "log.jsonl").read_text().splitlines()]


def load_weights(ckpt_dir) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(ckpt_dir) / "model.safetensors"))


def nan_loss_at_call(n: int, keys=("infonce", "loss")):
    """A replacement for distill.build_run.build_run whose loss turns the `keys` terms (None: all) NaN on its n-th
    call."""
    import distill.build_run as build_run_mod

    real_build = build_run_mod.build_run

    def build(cfg, accelerator):
        built = real_build(cfg, accelerator)
        calls, forward = [], built.loss.forward

        def nan_forward(*args, **kwargs):
            calls.append(1)
            out = forward(*args, **kwargs)
            return ({k: v * float("nan") if keys is None or k in keys else v for k, v in out.items()}
                    if len(calls) == n else out)

        built.loss.forward = nan_forward
        return built

    return build
