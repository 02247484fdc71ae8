"""GradCache (`data.micro_batch_size`) at a realistic size: step time and peak memory against the plain step and
plain gradient accumulation at the same global batch (issue 10: GradCache / plain <= 1.4, memory measured).

    python -m benchmarks.grad_cache             # defaults: width 384, 6 layers, 112 px, B=64, M=16; ~5 min, 2 cores
    python -m benchmarks.grad_cache --quick --json OUT.json   # tiny sizes, under a minute (the test); no results/
    python -m benchmarks.grad_cache --device cuda --preset biomedclip --batch-size 256 --micro-batch-size 64 \
        --mixed-precision bf16 --steps 10 --warmup-steps 3

Whole optimizer steps of the trainer's own step (`distill.training.step.Trainer`: forward, loss, backward, then
clipping as configured, AdamW, zero_grad, logit-scale clamp) on one synthetic batch of B rows (uint8 pixels;
captions of --caption-words words, WordPiece trained here, cut to the longest as data.trim_captions does).
Student, heads and DistillLoss come from the trainer's builders and a Config (contrastive: InfoNCE; hybrid:
+ feature, ICL, affinity against synthetic unit teacher features).
(a) plain: one forward of B rows, the loss, one backward (`Trainer.forward_backward`). (b) gradcache: the same
with `micro_batch_size=M` (`grad_cache_step` in chunks of M). (c) accumulation: B / M micro batches, each its own
loss (only M negatives), backward of loss / (B / M). (d) forward_nograd, not a step: the B rows in chunks of M
without graph, GradCache's extra work; (plain + d) / plain is GradCache's ratio without overhead of its own. One
untimed run of each, then interleaved repeats (a b c d, a b c d, ...; train_setup.warm_interleave), each figure
the median of --steps steps after --warmup-steps; ratios within a repeat, then median [min, max], with the load
average per repeat.
--mixed-precision bf16 autocasts the forward as Accelerate does.

Peak memory over a baseline of model, AdamW state and batch (after one warm-up step, gradients freed): on CUDA
torch.cuda.max_memory_allocated; on CPU each variant in a fresh subprocess with glibc's mmap threshold fixed at
64 KiB (MALLOC_MMAP_THRESHOLD_: freed tensors leave the RSS), the peak-RSS mark reset (`5` into
/proc/self/clear_refs), VmHWM - VmRSS. Both include the parameter gradients (the same in every variant).
Equality: float32, dropout off (eval mode): GradCache's loss terms and gradients against the plain step's.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.bench_common import Output, Spread, parse_flags, quiet_libraries, table, write_results
from benchmarks.train_setup import REPO, student_section, warm_interleave
from distill.config.train_config import Config
from distill.data.loader import TrainBatch, trim_padding
from distill.losses import DistillLoss
from distill.training.build_run import build_student_model, resolve_terms, text_pad_id
from distill.training.grad_cache import chunk_slices
from distill.training.heads import ProjectionHeads
from distill.training.optim import build_optimizer
from distill.training.step import Trainer
from distill.training.student_model import DistillModel
from student.tokenizer import train_wordpiece
from teachers.kernel.modality import Pair
from teachers.transforms import PreprocessCfg

GOAL = 1.4  # issue 10: GradCache step time / plain step time at the same global batch
VARIANTS = ("plain", "gradcache", "accumulation")
TEACHER_DIMS = (512, 768, 640, 1024)  # hybrid: synthetic teachers' embedding sizes (ViT-B/L-like)
WORDS = (
    "chest",
    "ct",
    "axial",
    "lesion",
    "nodule",
    "lobe",
    "contrast",
    "enhanced",
    "mri",
    "t2",
    "weighted",
    "hyperintense",
    "signal",
    "histology",
    "stain",
    "tumour",
    "margin",
    "cells",
    "dermoscopy",
    "pigment",
    "network",
    "ultrasound",
    "hypoechoic",
    "mass",
    "x-ray",
    "opacity",
    "consolidation",
    "effusion",
    "left",
    "right",
    "upper",
    "lower",
    "shows",
    "with",
    "of",
    "the",
    "a",
    "and",
    "in",
    "no",
    "evidence",
    "arrow",
)


@dataclass(frozen=True)
class Flags(Output):
    quick: bool = False  # tiny sizes for the test (width 64, 2 layers, 32 px, B=8, M=4); no results/
    json: str = ""  # also write the results payload here
    device: str = "cpu"  # cpu | cuda
    preset: str = "tiny"  # tiny (widened by the next four flags) | biomedclip-small | biomedclip
    width: int = 384  # tiny preset: ViT and BERT width (heads of 64),
    layers: int = 6  # layers of both towers,
    image_size: int = 112  # input side,
    patch_size: int = 16  # ViT patch (112 / 16: 49 patches + CLS)
    caption_words: int = 40  # words per synthetic caption (~1 token each; cut to the longest)
    batch_size: int = 64  # B: the global batch of every variant
    micro_batch_size: int = 16  # M: GradCache chunk and accumulation micro batch
    mode: str = "contrastive"  # contrastive (InfoNCE) | hybrid (+ feature, ICL, affinity; synthetic teachers)
    teachers: int = 2  # hybrid: synthetic teachers (dims from 512, 768, 640, 1024)
    mixed_precision: str = "no"  # no | bf16 | fp16 (CUDA): autocast around the model's forward
    steps: int = 1  # timed optimizer steps per measurement (their median)
    warmup_steps: int = 0  # untimed steps before each measurement (one untimed run of each comes first)
    repeats: int = 7  # interleaved repeats: short ones, so load swings hit every variant alike
    memory: bool = True  # also measure peak memory per variant
    threads: int = 0  # torch intra-op threads (0: torch's default, OMP_NUM_THREADS)
    workdir: str | None = None  # tokenizer and student folder here (default: a temp dir, deleted)
    child: str | None = None  # internal: measure this variant's memory in this process, print it


def sized(f: Flags) -> Flags:
    """--quick: seconds on 2 cores."""
    if not f.quick:
        return f
    return dataclasses.replace(
        f,
        preset="tiny",
        width=64,
        layers=2,
        image_size=32,
        patch_size=8,
        caption_words=12,
        batch_size=8,
        micro_batch_size=4,
        steps=1,
        warmup_steps=0,
        repeats=2,
    )


# -- set-up: the trainer's builders ---------------------------------------------------------------------------
@dataclass
class Setup:
    """Model, loss, optimizer, the trainer's step over them (`distill.training.step.Trainer`: plain and with
    GradCache chunks) and one synthetic batch on the device."""

    model: DistillModel
    loss: DistillLoss
    optimizer: torch.optim.Optimizer
    batch: TrainBatch  # pixels, tokens, caption ids (all different: InfoNCE's diagonal positives), features
    plain: Trainer  # one forward of the whole batch
    chunked: Trainer  # micro_batch_size=M (data.micro_batch_size: GradCache)
    device: torch.device
    info: dict = field(default_factory=dict)

    @property
    def images(self) -> torch.Tensor:
        return self.batch.images

    @property
    def tokens(self) -> torch.Tensor:
        return self.batch.tokens


def make_config(f: Flags, tokenizer: Path):
    s = student_section(
        SimpleNamespace(
            student_preset=f.preset, student_width=f.width, student_layers=f.layers, image_size=f.image_size
        ),
        tokenizer,
    )
    if f.preset == "tiny":  # real captions need more than the tiny preset's 32-token context
        s["overrides"]["vision_cfg"]["patch_size"] = f.patch_size
        s["overrides"]["context_length"] = ctx = max(32, f.caption_words + 8)
        s["overrides"]["text_config"]["max_position_embeddings"] = max(64, ctx)
    terms: list[dict[str, Any]] = [{"kind": "infonce"}]
    if f.mode == "hybrid":
        terms += [{"kind": "feature", "kwargs": {"metric": "cosine"}}, {"kind": "icl"}, {"kind": "affinity"}]
    return Config.from_dict(
        {
            "mode": f.mode,
            "student": s,
            "loss": {"terms": terms},
            "data": {
                "corpus": "synthetic.csv",
                "features": "synthetic.h5",
                "batch_size": f.batch_size,
                "micro_batch_size": f.micro_batch_size,
            },
        }
    )


def build(f: Flags, work: Path) -> Setup:
    g = torch.Generator().manual_seed(0)
    pick = lambda n: torch.randint(len(WORDS), (n,), generator=g).tolist()  # noqa: E731
    captions = [" ".join(WORDS[j] for j in pick(f.caption_words)) for _ in range(f.batch_size)]
    if not (work / "tokenizer" / "tokenizer.json").is_file():
        train_wordpiece(captions, work / "tokenizer", vocab_size=1000)
    cfg = make_config(f, work / "tokenizer")
    torch.manual_seed(0)
    bundle = build_student_model(cfg.student, work / "student", cfg.student.tokenizer_dir)
    names = [f"t{i}" for i in range(f.teachers)] if f.mode == "hybrid" else []
    dims = dict(zip(names, TEACHER_DIMS))
    loss = DistillLoss(resolve_terms(cfg.terms, {t: 1.0 for t in names}), teacher_names=names)
    reads = loss.head_modalities()
    heads = ProjectionHeads(bundle.embed_dim, {t: dims[t] for t in names if t in reads}) if reads else None
    pp = PreprocessCfg.from_open_clip(bundle.preprocess_cfg)
    model = DistillModel(bundle.model, heads, pixel_mean=pp.mean, pixel_std=pp.std)
    model.freeze_unreached(loss.uses_logit_scale, reads, loss.student_modalities())
    device = torch.device(f.device)
    model.to(device).train()
    tokens = trim_padding(bundle.tokenizer(captions), text_pad_id(bundle.model)).to(device)
    side, ids = pp.image_size, torch.arange(f.batch_size, device=device)
    images = torch.randint(0, 256, (f.batch_size, 3, *side), dtype=torch.uint8, generator=g).to(device)
    unit = lambda d: torch.nn.functional.normalize(torch.randn(len(ids), d, generator=g), -1).to(device)  # noqa: E731
    batch = TrainBatch(
        images,
        tokens,
        rows=ids,
        views=torch.full_like(ids, -1),
        teacher_feats={t: Pair(unit(d), unit(d)) for t, d in dims.items()},
        caption_ids=ids,
    )
    info = {
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "image_px": list(side),
        "text_tokens": int(tokens.shape[1]),
        "loss": str(loss),
        "preset": f.preset,
    }
    optimizer = build_optimizer(model, cfg.optim, device=device)
    step_of = lambda micro: Trainer(  # noqa: E731  (what Trainer.from_run takes from the config)
        model,
        loss,
        optimizer,
        teacher_attrs={t: {"logit_scale": 100.0} for t in names},
        seed=cfg.train.seed,
        micro_batch_size=micro,
        max_grad_norm=cfg.optim.max_grad_norm,
        logit_scale_max=cfg.optim.logit_scale_max,
    )
    return Setup(model, loss, optimizer, batch, step_of(None), step_of(f.micro_batch_size), device, info)


# -- the variants ---------------------------------------------------------------------------------------------
def rows_of(batch: TrainBatch, rows: slice) -> TrainBatch:
    """The micro batch of `rows` (pixels, tokens, caption ids and teacher features), as accumulation feeds it."""
    if batch.caption_ids is None:
        raise TypeError("the benchmark's batch has caption ids (InfoNCE's positives): got None")
    return TrainBatch(
        batch.images[rows],
        batch.tokens[rows],
        rows=batch.rows[rows],
        views=batch.views[rows],
        teacher_feats={k: Pair(p.image[rows], p.text[rows]) for k, p in batch.teacher_feats.items()},
        caption_ids=batch.caption_ids[rows],
    )


def forward_backward(s: Setup, variant: str, micro: int) -> dict:
    """One step's forward and backward by `variant`, through the trainer's step; returns the loss terms."""
    gen = s.plain.generator(step=0)
    if variant == "plain":
        return s.plain.forward_backward(s.batch, gen)
    if variant == "gradcache":
        assert s.chunked.micro_batch_size == micro
        return s.chunked.forward_backward(s.batch, gen)
    parts = chunk_slices(s.images.shape[0], micro)
    t = s.plain
    if variant == "accumulation":  # each micro batch its own loss (M negatives), gradients summed / (B / M)
        for rows in parts:
            sub = rows_of(s.batch, rows)
            losses = t.loss_of(t.forward(sub), sub, t.teacher_batch(sub), gen)
            t.backward(losses["loss"] / len(parts))
        return losses
    if variant == "forward_nograd":
        with torch.no_grad():
            for rows in parts:
                t.forward(rows_of(s.batch, rows))
        return {}
    raise ValueError(f"unknown variant {variant!r}")


def step(s: Setup, variant: str, micro: int) -> None:
    """A whole optimizer step (forward_nograd: only its forward): the trainer's forward and backward, then its
    optimizer step (clipping as configured, AdamW, zero_grad, logit-scale clamp)."""
    s.optimizer.zero_grad(set_to_none=True)
    forward_backward(s, variant, micro)
    if variant != "forward_nograd":
        s.plain.optimizer_step(sync=True)
    if s.device.type == "cuda":
        torch.cuda.synchronize(s.device)


def timer(s: Setup, f: Flags, variant: str) -> Callable[[], float]:
    def run() -> float:
        times = []
        for i in range(f.warmup_steps + f.steps):
            t0 = time.perf_counter()
            step(s, variant, f.micro_batch_size)
            if i >= f.warmup_steps:
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    return run


def equality(s: Setup, micro: int) -> dict:
    """GradCache against the plain step in float32 without dropout: max |diff| of the loss terms and gradients."""
    s.model.eval()
    grads = {}
    for variant in ("plain", "gradcache"):
        s.optimizer.zero_grad(set_to_none=True)
        losses = forward_backward(s, variant, micro)
        grads[variant] = (
            {k: float(v.detach()) for k, v in losses.items()},
            {n: p.grad.detach().clone() for n, p in s.model.named_parameters() if p.grad is not None},
        )
    s.optimizer.zero_grad(set_to_none=True)
    s.model.train()
    (lp, gp), (lc, gc_) = grads["plain"], grads["gradcache"]
    assert gp.keys() == gc_.keys(), gp.keys() ^ gc_.keys()
    abs_diff = {n: float((gp[n] - gc_[n]).abs().max()) for n in gp}
    top = max(float(g.abs().max()) for g in gp.values())
    # relative to the tensor's largest gradient, floored at 1e-3 x the largest of all (a key bias's is ~0 in theory)
    rel = {n: d / max(float(gp[n].abs().max()), 1e-3 * top) for n, d in abs_diff.items()}
    worst = max(rel, key=rel.__getitem__)
    return {
        "loss_abs_diff": max(abs(lp[k] - lc[k]) for k in lp),
        "losses_plain": lp,
        "losses_gradcache": lc,
        "grad_max_abs_diff": max(abs_diff.values()),
        "grad_max_rel_diff": rel[worst],
        "grad_max_rel_diff_param": worst,
        "grad_max_abs": top,
        "params_compared": len(gp),
    }


def forward_gflop_per_sample(s: Setup) -> float:
    rows = slice(0, min(4, s.images.shape[0]))
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        s.model(s.images[rows], s.tokens[rows])
    return fc.get_total_flops() / (rows.stop * 1e9)


# -- memory -----------------------------------------------------------------------------------------------------
def _proc_status() -> dict[str, int]:
    """VmRSS and VmHWM of this process in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            key, kb = line.split(":")
            out[key] = int(kb.split()[0]) * 1024
    return out


def measure_memory(s: Setup, f: Flags, variant: str) -> dict:
    """Peak bytes above the baseline (model, AdamW state, batch) during one step of `variant`."""
    step(s, variant, f.micro_batch_size)  # warm-up: AdamW state, one-time allocations
    s.optimizer.zero_grad(set_to_none=True)
    gc.collect()
    if s.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(s.device)
        base = torch.cuda.memory_allocated(s.device)
        step(s, variant, f.micro_batch_size)
        peak, how = torch.cuda.max_memory_allocated(s.device), "torch.cuda.max_memory_allocated"
    else:
        base = _proc_status()["VmRSS"]
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            how = "VmHWM after reset (clear_refs 5) - VmRSS"
        except OSError:
            how = "VmHWM (not resettable here: includes set-up peaks) - VmRSS"
        step(s, variant, f.micro_batch_size)
        peak = _proc_status()["VmHWM"]
    return {"peak_over_baseline_mib": (peak - base) / 2**20, "baseline_mib": base / 2**20, "method": how}


def _argv(f: Flags) -> list[str]:
    """`f` as flags for a child process."""
    text = lambda v: "none" if v is None else str(v).lower() if isinstance(v, bool) else str(v)  # noqa: E731
    return [f"--{k.replace('_', '-')}={text(v)}" for k, v in dataclasses.asdict(f).items()]


def memory_per_variant(s: Setup, f: Flags, work: Path) -> dict:
    if s.device.type == "cuda":
        return {v: measure_memory(s, f, v) for v in VARIANTS}
    out = {}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    for v in VARIANTS:
        child = dataclasses.replace(f, quick=False, workdir=str(work), child=v, json="")
        res = subprocess.run(
            [sys.executable, "-m", "benchmarks.grad_cache", *_argv(child)],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=900,
        )
        line = [x for x in res.stdout.splitlines() if x.startswith("grad_cache_memory ")]
        if res.returncode or not line:
            raise RuntimeError(f"memory child {v} failed: {res.stderr[-2000:]}")
        out[v] = json.loads(line[-1].split(" ", 1)[1])
        print(f"memory {v}: {out[v]['peak_over_baseline_mib']:.1f} MiB over the baseline", flush=True)
    return out


# -- main -------------------------------------------------------------------------------------------------------
def report(f: Flags, r: dict) -> str:
    st, ra, mem, eq = r["step_s"], r["ratios"], r.get("memory") or {}, r["equality"]
    sp = lambda k: Spread(**ra[k]).text(2)  # noqa: E731
    rows = [
        [
            v,
            st[v]["median"],
            f"{st['plain']['median'] / st[v]['median']:.2f}",
            f"{mem[v]['peak_over_baseline_mib']:.0f}" if v in mem else "-",
            f.micro_batch_size if v == "accumulation" else f.batch_size,
        ]
        for v in VARIANTS
    ]
    md = table(
        rows, ["variant", "step s (median)", "plain / variant speed", "peak MiB over baseline", "negatives per row"]
    )
    i = r["model"]
    md += "\n\n" + table(
        [
            [
                "GradCache / plain, step time",
                sp("gradcache_over_plain"),
                f"<= {GOAL}",
                "yes" if ra["gradcache_over_plain"]["median"] <= GOAL else "no",
            ],
            ["GradCache / accumulation, step time", sp("gradcache_over_accumulation"), "", ""],
            [
                "(plain + forward without graph) / plain: GradCache with no overhead",
                sp("ideal_over_plain"),
                "4/3 by FLOPs",
                "",
            ],
        ],
        ["ratio", "median [min, max] over repeats", "goal", "met"],
    )
    md += (
        f"\n\nStudent: {i['preset']}"
        + (f" widened to {f.width} ({f.layers} layers, patch {f.patch_size})" if f.preset == "tiny" else "")
        + f", {i['image_px'][0]} px, {i['text_tokens']} text tokens, {i['params_m']:.1f}M parameters, "
        f"{i['forward_gflop_per_sample']:.2f} GFLOP forward per sample; loss `{i['loss']}`; B={f.batch_size}, "
        f"M={f.micro_batch_size}, device {f.device}, mixed precision {f.mixed_precision}, torch threads "
        f"{r['torch_threads']}; one untimed run of each, then {f.repeats} interleaved repeats of {f.steps} "
        f"step(s) after {f.warmup_steps}; 1-minute load average before each repeat and after: "
        f"{', '.join(map(str, r['load_avg']))}.\n"
        f"Equality (float32, eval mode): loss |diff| {eq['loss_abs_diff']:.2e}, gradient max |diff| "
        f"{eq['grad_max_abs_diff']:.2e} (largest gradient {eq['grad_max_abs']:.2e}; max relative "
        f"{eq['grad_max_rel_diff']:.2e}, {eq['grad_max_rel_diff_param']}) over {eq['params_compared']} tensors.\n"
    )
    if mem:
        md += (
            f"Memory: {next(iter(mem.values()))['method']}; baseline (model, AdamW state, batch) "
            f"{mem['plain']['baseline_mib']:.0f} MiB.\n"
        )
    return md


def main(argv=None) -> dict:
    f = sized(parse_flags(Flags, argv, __doc__))
    quiet_libraries()
    if f.threads:
        torch.set_num_threads(f.threads)
    owned = f.workdir is None
    work = Path(tempfile.mkdtemp(prefix="bench-gradcache-")) if f.workdir is None else Path(f.workdir)
    work.mkdir(parents=True, exist_ok=True)
    try:
        s = build(f, work)
        if f.child:  # a fresh process for one variant's memory (CPU)
            print("grad_cache_memory " + json.dumps(measure_memory(s, f, f.child)), flush=True)
            return {}
        s.info["forward_gflop_per_sample"] = forward_gflop_per_sample(s)
        eq = equality(s, f.micro_batch_size)
        print(
            f"equality: loss {eq['loss_abs_diff']:.2e}, gradients {eq['grad_max_abs_diff']:.2e} "
            f"(relative {eq['grad_max_rel_diff']:.2e})",
            flush=True,
        )
        mem = memory_per_variant(s, f, work) if f.memory else None
        if f.mixed_precision != "no":  # as Accelerate wraps the prepared model's forward
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[f.mixed_precision]
            s.model.forward = torch.autocast(s.device.type, dtype=dtype)(s.model.forward)  # type: ignore[method-assign]  # wrapped on the instance, as Accelerate does
        runs = warm_interleave({v: timer(s, f, v) for v in (*VARIANTS, "forward_nograd")}, f.repeats, "step s")
    finally:
        if owned:
            shutil.rmtree(work, ignore_errors=True)
    ideal = Spread.of([(p + n) / p for p, n in zip(runs.samples["plain"], runs.samples["forward_nograd"])])
    results = {
        "equality": eq,
        "memory": mem,
        "model": s.info,
        "torch_threads": torch.get_num_threads(),
        "step_s": {k: dataclasses.asdict(runs.stats(k)) for k in runs.samples},
        "ratios": {
            "gradcache_over_plain": dataclasses.asdict(runs.ratio("gradcache", "plain")),
            "gradcache_over_accumulation": dataclasses.asdict(runs.ratio("gradcache", "accumulation")),
            "accumulation_over_plain": dataclasses.asdict(runs.ratio("accumulation", "plain")),
            "ideal_over_plain": dataclasses.asdict(ideal),
        },
        "interleaved": runs.as_dict(),
        "load_avg": runs.load,
        "goal_gradcache_over_plain": GOAL,
    }
    md = report(f, results)
    print("\n" + md, flush=True)
    if not f.quick:
        j, m = write_results("grad_cache", f, results, md)
        print(f"results: {j} and {m}")
    if f.json:
        Path(f.json).write_text(
            json.dumps({"flags": dataclasses.asdict(f), "results": results}, indent=2, default=str) + "\n"
        )
    return results


if __name__ == "__main__":
    main()
