"""What distillation from cached teachers costs per training step, and how our trainer compares with open_clip's.

    python -m benchmarks.train_overhead              # defaults sized for a few minutes on 2 cores
    python -m benchmarks.train_overhead --steps 60 --batch-size 64 --student-width 256

Same student (the `tiny` preset widened: --student-width, --student-layers, --image-size), same synthetic JPEG
corpus, batch size and number of steps everywhere; step times are medians over the steps after --warmup-steps
(start-up, first batches and epoch boundaries excluded). Every comparison is interleaved (A B A B ..., --repeats
times, bench_common.interleave): each ratio is taken within a repeat, then reported as median [min, max] with the
1-minute load average before each repeat, so load drifting on a shared machine does not masquerade as a ratio.

1. `hybrid` with 9 cached teachers (--cached-teachers; embedding sizes 512 to 1152 as BiomedCLIP, PLIP,
   UniMed-CLIP, MedSigLIP ...: train_setup.py) over `contrastive` (both `python -m distill.train`, step times from
   each run's log.jsonl), for two loss recipes: `hybrid` (configs/tiny-hybrid.yaml: InfoNCE + affinity) and
   `hybrid_ficl` (InfoNCE + feature + ICL). Goal <= 1.05. Every variant runs once untimed first, with the feature
   files read into the page cache (train_setup.warm_interleave), so no repeat pays a cold start.
2. The same distillation (3 cached teachers, InfoNCE + affinity) with the 3 teachers (each 4-10x the student's
   forward FLOPs at the defaults, fed their own input size; the output states the counted ratio) run online at
   every step (their encode_image/encode_text inside the step, as open_clip's --distill-model does, feeding the
   same DistillLoss) over the cached features, both in one plain loop here over the trainer's own model, loss and
   data. Goal: cached faster by the teachers' share.
3. Our `contrastive` samples/s over `python -m open_clip_train.main` on the same model config (our RUN/student-config
   folder as `--model local-dir:...`; open_clip_baseline.py), CSV data, batch, steps, fp32, workers. Goal >= 1.1.
"""

from __future__ import annotations

import dataclasses
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from distill.data.loader import Collate
    from distill.data.samplers import EpochSampler

from benchmarks.bench_common import (
    Output,
    interleave,
    make_jpeg_corpus,
    parse_flags,
    quiet_libraries,
    table,
    write_results,
)
from benchmarks.open_clip_baseline import missing_bench_modules, run_open_clip
from benchmarks.train_setup import (
    HYBRID_TERMS,
    build_caches,
    cached_dims,
    make_teachers,
    met,
    run_ours,
    same_batch,
    steady,
    warm_interleave,
    write_config,
    yaml_get,
)

# Imports of torch and of the project's modules (which load torch) sit in the functions that use them, so that
# --help and a flag error answer at once, without loading torch.

GOAL_HYBRID = 1.05
GOAL_OPEN_CLIP = 1.1  # issue 10: ours / open_clip_train samples/s


@dataclass(frozen=True)
class Flags(Output):
    images: int = 256  # synthetic JPEG pairs in the corpus
    image_px: int = 128  # their side
    batch_size: int = 32  # per step, everywhere
    steps: int = 24  # optimizer steps per run
    warmup_steps: int = 6  # steps excluded from the medians
    workers: int = 1  # DataLoader workers, ours and open_clip_train's
    student_preset: str = "tiny"  # tiny (widened by the next three flags) | biomedclip-small | biomedclip
    mixed_precision: str = "no"  # no | bf16 | fp16 (bf16 on a GPU for the biomedclip presets)
    student_width: int = 128  # tiny preset widened: ViT and BERT width,
    student_layers: int = 4  # layers of both towers,
    image_size: int = 64  # input resolution (patch 8)
    teacher_width: int = 192  # the 3 teachers (2 open_clip, 1 HF CLIP): each 4-10x the student's FLOPs,
    teacher_layers: int = 6  # as ViT-B/L teachers are to a small student,
    teacher_image_size: int = 96  # fed their own input size (the output states the FLOP ratio)
    cached_teachers: int = 9  # teachers in comparison 1's cache (tiny, embedding sizes 512 to 1152)
    repeats: int = 7  # interleaved repeats (A B A B ...) of comparisons 1 and 3, after a warm-up
    repeats_online: int = 3  # interleaved repeats of comparison 2 (an online run is ~6x slower)
    skip_open_clip: bool = False  # skip comparison 3
    profile: bool = True  # also time the phases of a step (data, forward, loss, backward, optimizer)
    # and the hybrids' own compute on one batch (same-batch A/B)
    workdir: str | None = None  # keep corpus, teachers, cache and runs here (default: temp dir, deleted)


# -- 2. online teachers vs cached features, same loop ----------------------------------------------------------
def online_vs_cached(config: Path, teachers: dict[str, str], f: Flags) -> dict:
    """One plain loop over the trainer's own model, loss and data; the teacher features come either from the
    batch (cache) or from running the three teachers on the batch (online)."""
    import torch  # noqa: PLC0415 (lazy: torch after the flags)
    import torch.nn.functional as F  # noqa: PLC0415 (lazy: torch after the flags)
    from torch.utils.data import DataLoader  # noqa: PLC0415 (lazy: torch after the flags)

    from distill.config.train_config import Config  # noqa: PLC0415 (lazy: torch after the flags)
    from distill.data.loader import Collate  # noqa: PLC0415 (lazy: torch after the flags)
    from distill.train import make_accelerator  # noqa: PLC0415 (lazy: torch after the flags)
    from distill.training.build_run import build_run  # noqa: PLC0415 (lazy: torch after the flags)
    from distill.training.optim import build_optimizer  # noqa: PLC0415 (lazy: torch after the flags)
    from distill.training.step import Trainer  # noqa: PLC0415 (lazy: torch after the flags)
    from teachers import load_teacher  # noqa: PLC0415 (lazy: torch after the flags)
    from teachers.kernel.modality import Pair  # noqa: PLC0415 (lazy: torch after the flags)

    cfg = Config.from_yaml(config, [f"train.output_dir={Path(yaml_get(config, 'train', 'output_dir'))}-loop"])
    run = build_run(cfg, make_accelerator(cfg))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(f.mixed_precision)
    run.model.to(device)
    models = {name: load_teacher(spec, str(device)) for name, spec in teachers.items()}
    captions = run.corpus.captions
    plain = DataLoader(
        run.loader.dataset,
        batch_size=f.batch_size,
        drop_last=True,
        sampler=run.loader.sampler,
        collate_fn=Collate(cast("Collate", run.loader.collate_fn).tokenizer),
        num_workers=f.workers,
    )

    def online_feats(batch, only: set[str] | None = None) -> dict:
        texts = [captions[int(r)] for r in batch.rows]
        out = {}
        for name, t in models.items():
            if only is not None and name not in only:
                continue
            d = t.describe()  # the loader's uint8 pixels at the teacher's own size and normalisation
            x = F.interpolate(
                batch.images.float().div(255), size=tuple(d["image_size"]), mode="bilinear", align_corners=False
            )
            x = (x - x.new_tensor(d["mean"]).view(-1, 1, 1)) / x.new_tensor(d["std"]).view(-1, 1, 1)
            out[name] = Pair(t.encode_image(x), t.encode_text(t.tokenize(texts)))
        return out

    def loop(loader, feats_of) -> list[float]:
        run.model.train()
        trainer = Trainer.from_run(run, build_optimizer(run.model, cfg.optim), cfg)  # the trainer's own step
        times, step = [], 0
        while step < f.steps:
            loader.sampler.set_epoch(step)
            t0 = time.perf_counter()
            for batch in loader:
                batch = batch.to(device)
                with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                    batch.teacher_feats = feats_of(batch)  # online: the teachers run here, inside the step
                    trainer.step(batch, step)
                if device.type == "cuda":
                    torch.cuda.synchronize()  # step time, not launch time
                now = time.perf_counter()
                times.append(now - t0)
                t0, step = now, step + 1
                if step >= f.steps:
                    break
        return times

    def teachers_only() -> float:  # the teachers' own share, timed alone on the same batches
        times = []
        for i, batch in enumerate(plain):
            batch = batch.to(device)
            t0 = time.perf_counter()
            with torch.no_grad():
                online_feats(batch)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            if i + 1 >= min(f.steps, 8):
                break
        return statistics.median(times[2:] or times)

    flops = flop_ratios(run.model, models, next(iter(plain)).to(device), online_feats)
    runs = interleave(
        {
            "cached": lambda: steady(loop(run.loader, lambda b: b.teacher_feats), f.warmup_steps),
            "online": lambda: steady(loop(plain, online_feats), f.warmup_steps),
            "teachers_only": teachers_only,
        },
        f.repeats_online,
        "online vs cached",
    )
    return {"interleaved": runs, "flops": flops}


def flop_ratios(student, models: dict, batch, online_feats) -> dict:
    """Forward FLOPs per sample (torch.utils.flop_counter) of the student and of each teacher at its own input
    size, and teacher / student: the figure that says whether these teachers are as heavy as real ones."""
    import torch  # noqa: PLC0415 (lazy: torch after the flags)
    from torch.utils.flop_counter import FlopCounterMode  # noqa: PLC0415 (lazy: torch after the flags)

    def count(fn) -> float:
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            fn()
        return fc.get_total_flops() / len(batch.rows)

    out: dict[str, Any] = {"student": count(lambda: student(batch.images, batch.tokens))}
    everything = count(lambda: online_feats(batch))
    for name in models:
        out[name] = count(lambda name=name: online_feats(batch, {name}))  # called in this iteration
    out["ratios"] = {n: out[n] / out["student"] for n in models}
    out["all_teachers_over_student"] = everything / out["student"]
    return out


# -- where the time of a step goes: the trainer's step, phase by phase -----------------------------------------
PHASES = ("data", "forward", "loss", "backward", "optimizer")


def profile_phases(config: Path, f: Flags) -> dict:
    """Median seconds per phase of a step, as `distill.train` runs it (same model, loss, data, optimizer; no
    Accelerate wrapper), with the data loaded in this process (num_workers=0) so that its cost shows; "read" is
    the part of "data" spent in the feature reader."""
    from distill.config.train_config import Config  # noqa: PLC0415 (lazy: torch after the flags)
    from distill.train import make_accelerator  # noqa: PLC0415 (lazy: torch after the flags)
    from distill.training.build_run import build_run  # noqa: PLC0415 (lazy: torch after the flags)
    from distill.training.optim import build_optimizer  # noqa: PLC0415 (lazy: torch after the flags)
    from distill.training.step import Trainer  # noqa: PLC0415 (lazy: torch after the flags)

    out_dir = Path(yaml_get(config, "train", "output_dir"))
    cfg = Config.from_yaml(config, [f"train.output_dir={out_dir}-profile", "data.num_workers=0"])
    run = build_run(cfg, make_accelerator(cfg))
    model, collate = run.model, cast("Collate", run.loader.collate_fn)
    model.train()
    opt = build_optimizer(model, cfg.optim)
    trainer = Trainer.from_run(run, opt, cfg)  # step() is these phases in this order
    read_s = []
    if collate.features:
        reader_read = collate.reader.read

        def timed_read(*a, **k):
            t0 = time.perf_counter()
            got = reader_read(*a, **k)
            read_s.append(time.perf_counter() - t0)
            return got

        collate.reader.read = timed_read
    times: dict[str, list[float]] = {p: [] for p in PHASES}
    epoch, it = 0, iter(run.loader)
    for step in range(f.steps):
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            epoch += 1
            cast("EpochSampler", run.loader.sampler).set_epoch(epoch)
            it = iter(run.loader)
            batch = next(it)
        t1 = time.perf_counter()
        out = trainer.forward(batch)
        t2 = time.perf_counter()
        losses = trainer.loss_of(out, batch, trainer.teacher_batch(batch), trainer.generator(step))
        t3 = time.perf_counter()
        trainer.backward(losses["loss"])
        t4 = time.perf_counter()
        trainer.optimizer_step(sync=True)  # clipping as configured, AdamW, zero_grad, logit-scale clamp
        t5 = time.perf_counter()
        for p, dt in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
            times[p].append(dt)
    res: dict[str, Any] = {p: steady(v, f.warmup_steps) for p, v in times.items()}
    res["read"] = steady(read_s, f.warmup_steps) if read_s else 0.0
    res["step"] = steady([sum(x) for x in zip(*times.values())], f.warmup_steps)
    trainable = [(n, p.numel()) for n, p in model.named_parameters() if p.requires_grad]
    res["params"] = sum(k for _, k in trainable)  # what the optimizer updates: student and projection heads
    res["head_params"] = sum(k for n, k in trainable if n.startswith("heads."))
    if batch.teacher_feats:
        res["same_batch"] = same_batch(trainer, batch, 2 * f.steps)
    return res


# -- main -----------------------------------------------------------------------------------------------------
def ours_step_s(config: Path, f: Flags) -> float:
    """Median step seconds of our trainer's run on `config`."""
    return run_ours(config, f)["step_s"]


def main(argv=None) -> int:
    f = parse_flags(Flags, argv, __doc__)

    missing = [] if f.skip_open_clip else missing_bench_modules()
    if missing:  # before minutes of set-up, not as open_clip_train's traceback at comparison 3
        print(
            f"train_overhead.py: error: comparison 3 runs open_clip_train, which needs {', '.join(missing)} (not "
            "installed): pip install -e '.[bench]' (or pass --skip-open-clip)",
            file=sys.stderr,
        )
        return 2
    import torch  # noqa: PLC0415 (lazy: torch after the flags)

    quiet_libraries()
    owned = f.workdir is None
    work = Path(tempfile.mkdtemp(prefix="bench-train-")) if f.workdir is None else Path(f.workdir)
    work.mkdir(parents=True, exist_ok=True)
    hybrids = list(HYBRID_TERMS)
    try:
        corpus = make_jpeg_corpus(work / "corpus", f.images, f.image_px)
        teachers = make_teachers(work / "teachers", f)
        if not (work / "tokenizer" / "tokenizer.json").is_file():  # one vocabulary for every run
            from cache.sources.corpus import open_corpus  # noqa: PLC0415 (lazy: torch after the flags)
            from student.tokenizer import train_wordpiece  # noqa: PLC0415 (lazy: torch after the flags)

            train_wordpiece(open_corpus(str(corpus)).captions, work / "tokenizer", vocab_size=1000)
        features, features_many = build_caches(work, corpus, teachers, f.cached_teachers)
        cfgs = {"contrastive": write_config(work, f, "contrastive", corpus, None)}
        cfgs.update({h: write_config(work, f, "hybrid", corpus, features_many, h, HYBRID_TERMS[h]) for h in hybrids})
        cfg_h3 = write_config(work, f, "hybrid", corpus, features, "hybrid-3t")
        print(f"1+3: our trainer (contrastive, {', '.join(hybrids)}) and open_clip_train, interleaved", flush=True)
        variants: dict[str, Callable[[], float]] = {k: partial(ours_step_s, c, f) for k, c in cfgs.items()}
        again = write_config(work, f, "contrastive", corpus, None, "contrastive-again")  # A/A: the noise floor
        variants["contrastive_again"] = lambda: run_ours(again, f)["step_s"]
        if not f.skip_open_clip:  # after our contrastive run in each repeat: it reuses that run's student config
            model_dir = work / "run-contrastive" / "student-config"
            variants["open_clip"] = lambda: run_open_clip(model_dir, corpus, work, f)["step_s"]
        trainers = warm_interleave(variants, f.repeats, "trainers", (features_many, features))
        phases = None
        if f.profile:
            print(f"1b: phases of a step: {', '.join(cfgs)}", flush=True)
            phases = {k: profile_phases(c, f) for k, c in cfgs.items()}
        print("2: online vs cached teachers, interleaved", flush=True)
        ovc = online_vs_cached(cfg_h3, teachers, f)
    finally:
        if owned:
            shutil.rmtree(work, ignore_errors=True)

    bs, runs, flops, n = f.batch_size, ovc["interleaved"], ovc["flops"], f.cached_teachers
    r1 = {h: trainers.ratio(h, "contrastive") for h in hybrids}
    r2 = runs.ratio("online", "cached")
    share = runs.ratio("teachers_only", "online")
    ideal = 1 / (1 - share.median) if share.median < 1 else float("inf")
    med = {k: trainers.stats(k).median for k in trainers.samples}
    recipe = {"hybrid": "InfoNCE + affinity", "hybrid_ficl": "InfoNCE + feature + ICL"}
    rows = [
        [
            f"1. {h} ({n} cached teachers, {recipe.get(h, h)}) / contrastive, step time",
            med[h],
            med["contrastive"],
            r1[h].text(),
            f"<= {GOAL_HYBRID}",
            met(r1[h], GOAL_HYBRID, below=True),
        ]
        for h in hybrids
    ]
    aa = trainers.ratio("contrastive_again", "contrastive")
    rows.append(
        [
            "1. A/A control: contrastive run again / contrastive, step time",
            med["contrastive_again"],
            med["contrastive"],
            aa.text(),
            "1 (the noise floor of row 1)",
            "-",
        ]
    )
    rows.append(
        [
            "2. online teachers / cached teachers (3, InfoNCE + affinity), step time",
            runs.stats("online").median,
            runs.stats("cached").median,
            r2.text(),
            f">= 1 / (1 - teachers' share {share.median:.2f}) = {ideal:.2f}",
            "yes" if r2.median >= 0.95 * ideal else "no",
        ]
    )
    results = {
        "trainers": trainers.as_dict(),
        "online_vs_cached": runs.as_dict(),
        "flops_per_sample": flops,
        "cached_teachers": dict(zip([f"t{i + 1}" for i in range(n)], cached_dims(n))),
        "ratios": {
            **{f"{h}_over_contrastive": dataclasses.asdict(r) for h, r in r1.items()},
            "contrastive_again_over_contrastive": dataclasses.asdict(aa),
            "online_over_cached": dataclasses.asdict(r2),
            "teachers_share_online": dataclasses.asdict(share),
        },
        "torch_threads": torch.get_num_threads(),
    }
    if "open_clip" in trainers.samples:
        r3 = trainers.ratio("open_clip", "contrastive")  # step-time ratio = our samples/s over theirs
        results["ratios"]["ours_over_open_clip_samples_per_s"] = dataclasses.asdict(r3)
        rows.append(
            [
                "3. ours contrastive / open_clip_train, samples/s",
                bs / med["contrastive"],
                bs / med["open_clip"],
                r3.text(),
                f">= {GOAL_OPEN_CLIP}",
                met(r3, GOAL_OPEN_CLIP, below=False),
            ]
        )
    md = table(rows, ["comparison", "A (median)", "B (median)", "A / B per repeat: median [min, max]", "goal", "met"])
    if phases is not None:
        results["phases"] = phases
        base = phases["contrastive"]
        prow = [
            [p, *(1e3 * phases[k][p] for k in phases), *(1e3 * (phases[h][p] - base[p]) for h in hybrids)]
            for p in (*PHASES, "step")
        ]
        prow.insert(
            1,
            [
                "  of which feature read",
                *(1e3 * phases[k]["read"] for k in phases),
                *(1e3 * phases[h]["read"] for h in hybrids),
            ],
        )
        heads = "; ".join(
            f"{k}: {phases[k]['params'] / 1e6:.2f}M trainable parameters, of which projection heads "
            f"{phases[k]['head_params'] / 1e6:.2f}M"
            for k in phases
        )
        md += (
            "\n\nPhases of a step (ms, medians, data loaded in-process: num_workers=0; not interleaved; "
            f"{heads}):\n\n" + table(prow, ["phase", *phases, *(f"{h} - contrastive" for h in hybrids)]) + "\n"
        )
        sb = [
            [
                h,
                1e3 * phases[h]["same_batch"]["contrastive_s"],
                1e3 * phases[h]["same_batch"]["hybrid_s"],
                "{ratio_median:.3f} [{ratio_q1:.3f}, {ratio_q3:.3f}]".format(**phases[h]["same_batch"]),
                "yes" if phases[h]["same_batch"]["ratio_median"] <= GOAL_HYBRID else "no",
            ]
            for h in hybrids
        ]
        md += (
            f"\nThe hybrid's own compute, same model and batch ({phases[hybrids[0]]['same_batch']['pairs']} "
            "alternating pairs of whole steps, data excluded; InfoNCE side without the heads):\n\n"
            + table(
                sb,
                [
                    "loss",
                    "InfoNCE step ms",
                    "hybrid step ms",
                    "ratio per pair: median [quartiles]",
                    f"<= {GOAL_HYBRID}",
                ],
            )
            + "\n"
        )
    fl = ", ".join(f"{k} {v:.1f}x" for k, v in flops["ratios"].items())
    student = (
        f"tiny preset widened to {f.student_width} (both towers, {f.student_layers} layers, {f.image_size}px)"
        if f.student_preset == "tiny"
        else f"preset {f.student_preset}"
    )
    md = (
        f"Student: {student}, mixed precision {f.mixed_precision}; batch {bs}, {f.steps} steps, medians after "
        f"{f.warmup_steps}; {f.images} JPEG pairs; DataLoader workers {f.workers}. Comparison 1: {n} cached "
        f"teachers of embedding sizes {', '.join(map(str, cached_dims(n)))}. Comparison 2: teachers oc, hf, oc2 "
        f"(width {f.teacher_width}, {f.teacher_layers} layers, {f.teacher_image_size}px, fed at that size); step "
        f"times in seconds, samples/s in row 3. Forward FLOPs per sample: student {flops['student'] / 1e6:.0f} "
        f"MFLOP; teacher / student {fl}; all 3 teachers {flops['all_teachers_over_student']:.1f}x. Online-teacher "
        f"forward alone: {runs.stats('teachers_only').median:.3f}s/step ({share.median:.0%} of an online step). "
        f"Comparisons 1 and 3: one untimed warm-up run of every variant (feature files pre-read), then "
        f"{f.repeats} interleaved repeats; comparison 2: {f.repeats_online}. 1-minute load average before each "
        f"repeat and after: trainers {', '.join(map(str, trainers.load))}; online vs cached "
        f"{', '.join(map(str, runs.load))}.\n\n{md}\n"
    )
    print("\n" + md)
    j, m = write_results("train_overhead", f, results, md)
    print(f"results: {j} and {m}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
