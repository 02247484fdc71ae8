"""Set-up and helpers for train_overhead.py: teachers, the feature caches, run configs, one trainer run, warmed
interleaving, the same-batch A/B of the hybrid's own compute, goal verdicts.

Why a second cache of 9 teachers: comparison 1 asks what distilling from as many teachers as a real recipe uses
(BiomedCLIP, PLIP, PubMedCLIP, UniMed-CLIP, MedSigLIP ...) costs per step over plain CLIP training. What the
trainer pays per teacher depends on the embedding size, not on how heavy the teacher was when it was cached, so
those teachers are tiny open_clip models (one layer, 32 px) with realistic embedding sizes, cached by
`distill cache`'s own `build_cache`: the trainer joins that file like any other cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from benchmarks.bench_common import Interleaved, interleave, load_into_page_cache

# Imports of torch and of the project's modules (which load torch) sit in the functions that use them, so that
# --help and a flag error answer at once, without loading torch.

REPO = Path(__file__).resolve().parent.parent
# embedding sizes of the 9 cached teachers (cycled for more): BiomedCLIP 512, PLIP 512, PubMedCLIP / QuiltNet
# ViT-B 512-768, UniMed-CLIP 768, MedSigLIP 1152 ...
CACHED_DIMS = (512, 512, 768, 768, 512, 1152, 512, 768, 512)
# the hybrid loss terms compared (each with every cached teacher, equal weights)
HYBRID_TERMS = {
    "hybrid": None,  # configs/tiny-hybrid.yaml as shipped: InfoNCE + 3 x affinity
    "hybrid_ficl": [
        {"kind": "infonce", "weight": 1.0},  # the previous default: InfoNCE + feature + ICL
        {"kind": "feature", "weight": 1.0, "kwargs": {"metric": "cosine"}},
        {"kind": "icl", "weight": 1.0},
    ],
}


def make_teachers(root: Path, f) -> dict[str, str]:
    """The 3 teachers of comparison 2 (run online there), of realistic size relative to the student."""
    from distill.tiny_models import make_tiny_hf_clip, make_tiny_open_clip  # noqa: PLC0415 (lazy: torch after the flags)

    w, n, s = f.teacher_width, f.teacher_layers, f.teacher_image_size
    return {
        "oc": f"local-dir:{make_tiny_open_clip(root / 'oc', embed_dim=128, width=w, layers=n, image_size=s)}",
        "hf": f"hf-clip:{make_tiny_hf_clip(root / 'hf', projection_dim=96, hidden=w, layers=n, image_size=s)}",
        "oc2": f"local-dir:{make_tiny_open_clip(root / 'oc2', embed_dim=64, width=w, layers=n, image_size=s, seed=1)}",
    }


def cached_dims(n: int) -> list[int]:
    return [CACHED_DIMS[i % len(CACHED_DIMS)] for i in range(n)]


def build_caches(work: Path, corpus: Path, teachers: dict[str, str], n_cached: int) -> tuple[Path, Path]:
    """(the 3 real teachers' cache for comparison 2, the n_cached teachers' cache for comparison 1); each built
    once per workdir (the second one's name carries its embedding sizes)."""
    from cache import CacheJob, build_cache  # noqa: PLC0415 (lazy: torch after the flags)
    from distill.tiny_models import make_tiny_open_clip  # noqa: PLC0415 (lazy: torch after the flags)

    def build(out: Path, specs: dict[str, str]) -> Path:
        if not out.exists():
            build_cache(
                CacheJob(
                    data=str(corpus),
                    teachers=specs,
                    out=str(out),
                    batch_size=64,
                    num_workers=0,
                    device="auto",
                    progress=False,
                )
            )
        return out

    dims = cached_dims(n_cached)
    tag = hashlib.blake2b(json.dumps(dims).encode(), digest_size=4).hexdigest()
    many = {}
    for i, d in enumerate(dims):
        folder = work / "cached-teachers" / f"t{i + 1}_{d}"
        if not (folder / "open_clip_config.json").is_file():
            make_tiny_open_clip(folder, embed_dim=d, width=32, layers=1, image_size=32, seed=i)
        many[f"t{i + 1}_{d}"] = f"local-dir:{folder}"
    return build(work / "features.h5", teachers), build(work / f"features-{n_cached}t-{tag}.h5", many)


def student_section(f, tokenizer_dir: Path) -> dict:
    if f.student_preset != "tiny":  # the preset as published (224px, its own widths); our corpus's WordPiece
        return {"preset": f.student_preset, "tokenizer_dir": str(tokenizer_dir), "vocab_size": 1000}
    heads = max(1, f.student_width // 64)
    return {
        "preset": "tiny",
        "tokenizer_dir": str(tokenizer_dir),
        "vocab_size": 1000,
        "image_size": f.image_size,
        "overrides": {
            "embed_dim": f.student_width,
            "vision_cfg": {"width": f.student_width, "layers": f.student_layers, "head_width": 64},
            "text_config": {
                "hidden_size": f.student_width,
                "num_hidden_layers": f.student_layers,
                "num_attention_heads": heads,
                "intermediate_size": 4 * f.student_width,
                "hidden_dropout_prob": 0.0,
                "attention_probs_dropout_prob": 0.0,
            },
        },
    }


def write_config(
    work: Path,
    f,
    mode: str,
    corpus: Path,
    features: Path | None,
    name: str | None = None,
    terms: list[dict] | None = None,
) -> Path:
    """WORK/config-NAME.yaml from configs/tiny-{contrastive,hybrid}.yaml; `terms` replaces the loss terms."""
    name = name or mode
    base = yaml.safe_load(
        (REPO / "configs" / f"tiny-{'contrastive' if mode == 'contrastive' else 'hybrid'}.yaml").read_text()
    )
    base["student"] = student_section(f, work / "tokenizer")
    base["data"].update({"corpus": str(corpus), "batch_size": f.batch_size, "num_workers": f.workers})
    if features is not None:
        base["data"]["features"] = str(features)
    if terms is not None:
        base["loss"]["terms"] = terms
    base["train"].update(
        {
            "output_dir": str(work / f"run-{name}"),
            "max_steps": f.steps,
            "checkpoint_every": 0,
            "keep_last": 1,
            "resume": "none",
            "log_every": 1,
            "tensorboard": False,
            "mixed_precision": f.mixed_precision,
        }
    )
    path = work / f"config-{name}.yaml"
    path.write_text(yaml.safe_dump(base, sort_keys=False))
    return path


def steady(values: list[float], warmup: int) -> float:
    """Median after the warm-up steps (robust to epoch boundaries and a noisy shared machine)."""
    rest = values[warmup:] or values
    return statistics.median(rest)


def run_ours(config: Path, f) -> dict:
    """One `python -m distill.train` run; step seconds from its log.jsonl."""
    out = Path(yaml_get(config, "train", "output_dir"))
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "distill.train", "--config", str(config)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env(),
    )
    if done.returncode:
        raise SystemExit(f"distill.train --config {config} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    wall = time.perf_counter() - t0
    rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines() if x.strip()]
    step_s = [f.batch_size / r["samples_per_s"] for r in rows]
    return {
        "wall_s": wall,
        "step_s": steady(step_s, f.warmup_steps),
        "steps": len(rows),
        "final_loss": rows[-1]["loss"],
        "student_dir": str(out / "student-config"),
    }


def yaml_get(path: Path, *keys) -> Any:
    d = yaml.safe_load(path.read_text())
    for k in keys:
        d = d[k]
    return d


def env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def warm_interleave(
    variants: dict[str, Callable[[], float]], repeats: int, label: str, warm_files: tuple[Path, ...] = ()
) -> Interleaved:
    """`interleave` after one untimed run of every variant, in the same order, with `warm_files` read into the
    page cache first: the first timed repeat then finds the corpus, the feature files and the imported modules
    warm, as every later one does, on both sides of each ratio."""
    for p in warm_files:
        load_into_page_cache(p)
    for name, fn in variants.items():
        t0 = time.perf_counter()
        fn()
        print(f"{label} warm-up: {name} ({time.perf_counter() - t0:.0f}s, untimed)", flush=True)
    return interleave(variants, repeats, label)


def same_batch(trainer, batch, pairs: int) -> dict:
    """The hybrid's own compute: whole trainer steps (`Trainer.step`: forward, loss, backward, optimizer) of this
    run's hybrid model and loss, alternating with plain InfoNCE steps of the same model without its heads (the same
    optimizer), on ONE batch. No data, sampler or load drift between the two sides, so a few percent can be resolved
    that the trainer-level ratio (noise floor: its A/A row) cannot. Returns seconds (medians) and per-pair ratios:
    median and quartiles."""
    from distill.losses import DistillLoss  # noqa: PLC0415 (lazy: torch after the flags)
    from distill.losses.spec import LossTermCfg  # noqa: PLC0415 (lazy: torch after the flags)
    from distill.training.step import Trainer  # noqa: PLC0415 (lazy: torch after the flags)

    model, heads = trainer.model, trainer.model.heads
    infonce = Trainer(
        model,
        DistillLoss([LossTermCfg(kind="infonce", weight=1.0)], []),
        trainer.optimizer,
        seed=trainer.seed,
        max_grad_norm=trainer.max_grad_norm,
        logit_scale_max=trainer.logit_scale_max,
    )
    contrastive = dataclasses.replace(batch, teacher_feats={})  # InfoNCE reads no teacher

    def step(hybrid: bool) -> float:
        model.heads = heads if hybrid else None
        t0 = time.perf_counter()
        if hybrid:
            trainer.step(batch, step=0)
        else:
            infonce.step(contrastive, step=0)
        return time.perf_counter() - t0

    times = [(step(False), step(True)) for _ in range(pairs + 3)][3:]
    model.heads = heads
    q1, q2, q3 = statistics.quantiles([h / c for c, h in times], n=4)
    return {
        "contrastive_s": statistics.median(c for c, _ in times),
        "hybrid_s": statistics.median(h for _, h in times),
        "ratio_median": q2,
        "ratio_q1": q1,
        "ratio_q3": q3,
        "pairs": pairs,
    }


def met(r, goal: float, below: bool) -> str:
    """yes / no by the median, and whether the whole [min, max] range is on the goal's side."""
    ok = (lambda x: x <= goal) if below else (lambda x: x >= goal)
    if ok(r.lo) and ok(r.hi):
        return "yes (every repeat)"
    return "yes (median)" if ok(r.median) else "no"
