"""What distillation from cached teachers costs per training step, and how our trainer compares with open_clip's.

    python benchmarks/train_overhead.py              # defaults sized for a few minutes on 2 cores
    python benchmarks/train_overhead.py --steps 60 --batch-size 64 --student-width 256

Same student (the `tiny` preset widened: --student-width, --student-layers, --image-size), same synthetic JPEG
corpus, batch size and number of steps everywhere; step times are medians over the steps after --warmup-steps
(start-up, first batches and epoch boundaries excluded). Every comparison is interleaved (A B A B ..., --repeats
times, bench_common.interleave): each ratio is taken within a repeat, then reported as median [min, max] with the
1-minute load average before each repeat, so load drifting on a shared machine does not masquerade as a ratio.

1. `hybrid` with 3 cached teachers over `contrastive` (both `python -m distill.train`, step times from each
   run's log.jsonl). Goal <= 1.05.
2. The same distillation with the 3 teachers (each 4-10x the student's forward FLOPs at the defaults, fed their
   own input size; the output states the counted ratio) run online at every step (their encode_image/encode_text inside the
   step, as open_clip's --distill-model does, feeding the same DistillLoss) over the cached features, both in
   one plain loop here over the trainer's own model, loss and data. Goal: cached faster by the teachers' share.
3. Our `contrastive` samples/s over `python -m open_clip_train.main` on the same model config (our RUN/student
   folder as `--model local-dir:...`; open_clip_baseline.py), CSV data, batch, steps, fp32, workers. Goal >= 1.1.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # tiny_models: the test helpers' tiny teachers
from bench_common import interleave, make_jpeg_corpus, parse_flags, quiet_libraries, table, write_results  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
GOAL_HYBRID = 1.05
GOAL_OPEN_CLIP = 1.1                  # issue 10: ours / open_clip_train samples/s


@dataclass(frozen=True)
class Flags:
    images: int = 256                 # synthetic JPEG pairs in the corpus
    image_px: int = 128               # their side
    batch_size: int = 32              # per step, everywhere
    steps: int = 24                   # optimizer steps per run
    warmup_steps: int = 6             # steps excluded from the medians
    workers: int = 1                  # DataLoader workers, ours and open_clip_train's
    student_preset: str = "tiny"      # tiny (widened by the next three flags) | biomedclip-small | biomedclip
    mixed_precision: str = "no"       # no | bf16 | fp16 (bf16 on a GPU for the biomedclip presets)
    student_width: int = 128          # tiny preset widened: ViT and BERT width,
    student_layers: int = 4           # layers of both towers,
    image_size: int = 64              # input resolution (patch 8)
    teacher_width: int = 192          # the 3 teachers (2 open_clip, 1 HF CLIP): each 4-10x the student's FLOPs,
    teacher_layers: int = 6           # as ViT-B/L teachers are to a small student,
    teacher_image_size: int = 96      # fed their own input size (the output states the FLOP ratio)
    repeats: int = 3                  # interleaved repeats (A B A B ...): ratios per repeat, median and range
    skip_open_clip: bool = False      # skip comparison 3
    profile: bool = True              # also time the phases of a step (data, forward, loss, backward, optimizer)
    workdir: str | None = None        # keep corpus, teachers, cache and runs here (default: temp dir, deleted)


# -- set-up -------------------------------------------------------------------------------------------------
def make_teachers(root: Path, f: Flags) -> dict[str, str]:
    from tiny_models import make_tiny_hf_clip, make_tiny_open_clip

    w, l, s = f.teacher_width, f.teacher_layers, f.teacher_image_size
    return {"oc": f"local-dir:{make_tiny_open_clip(root / 'oc', embed_dim=128, width=w, layers=l, image_size=s)}",
            "hf": f"hf-clip:{make_tiny_hf_clip(root / 'hf', projection_dim=96, hidden=w, layers=l, image_size=s)}",
            "oc2": f"local-dir:{make_tiny_open_clip(root / 'oc2', embed_dim=64, width=w, layers=l, image_size=s, seed=1)}"}


def student_section(f: Flags, tokenizer_dir: Path) -> dict:
    if f.student_preset != "tiny":  # the preset as published (224px, its own widths); our corpus's WordPiece
        return {"preset": f.student_preset, "tokenizer_dir": str(tokenizer_dir), "vocab_size": 1000}
    heads = max(1, f.student_width // 64)
    return {"preset": "tiny", "tokenizer_dir": str(tokenizer_dir), "vocab_size": 1000, "image_size": f.image_size,
            "overrides": {"embed_dim": f.student_width,
                          "vision_cfg": {"width": f.student_width, "layers": f.student_layers, "head_width": 64},
                          "text_config": {"hidden_size": f.student_width, "num_hidden_layers": f.student_layers,
                                          "num_attention_heads": heads, "intermediate_size": 4 * f.student_width,
                                          "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}}}


def write_config(work: Path, f: Flags, mode: str, corpus: Path, features: Path | None) -> Path:
    import yaml

    base = yaml.safe_load((REPO / "configs" / f"tiny-{'contrastive' if mode == 'contrastive' else 'hybrid'}.yaml")
                          .read_text())
    base["student"] = student_section(f, work / "tokenizer")
    base["data"].update({"corpus": str(corpus), "batch_size": f.batch_size, "num_workers": f.workers})
    if features is not None:
        base["data"]["features"] = str(features)
    base["train"].update({"output_dir": str(work / f"run-{mode}"), "max_steps": f.steps, "checkpoint_every": 0,
                          "keep_last": 1, "resume": "none", "log_every": 1, "tensorboard": False,
                          "mixed_precision": f.mixed_precision})
    path = work / f"config-{mode}.yaml"
    path.write_text(yaml.safe_dump(base, sort_keys=False))
    return path


def steady(values: list[float], warmup: int) -> float:
    """Median after the warm-up steps (robust to epoch boundaries and a noisy shared machine)."""
    rest = values[warmup:] or values
    return statistics.median(rest)


# -- 1. our trainer, hybrid vs contrastive ----------------------------------------------------------------------
def run_ours(config: Path, f: Flags) -> dict:
    out = Path(_yaml_get(config, "train", "output_dir"))
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "distill.train", "--config", str(config)], cwd=REPO, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env())
    wall = time.perf_counter() - t0
    rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines() if x.strip()]
    step_s = [f.batch_size / r["samples_per_s"] for r in rows]
    return {"wall_s": wall, "step_s": steady(step_s, f.warmup_steps), "steps": len(rows),
            "final_loss": rows[-1]["loss"], "student_dir": str(out / "student")}


def _yaml_get(path: Path, *keys):
    import yaml

    d = yaml.safe_load(path.read_text())
    for k in keys:
        d = d[k]
    return d


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}


# -- 2. online teachers vs cached features, same loop ----------------------------------------------------------
def online_vs_cached(config: Path, teachers: dict[str, str], f: Flags) -> dict:
    """One plain loop over the trainer's own model, loss and data; the teacher features come either from the
    batch (cache) or from running the three teachers on the batch (online)."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from distill.build_run import build_run
    from distill.config import Config
    from distill.data import Collate
    from distill.losses import TeacherBatch
    from distill.optim import build_optimizer
    from distill.train import make_accelerator
    from teachers import load_teacher
    from teachers.modality import Pair

    cfg = Config.from_yaml(config, [f"train.output_dir={Path(_yaml_get(config, 'train', 'output_dir'))}-loop"])
    run = build_run(cfg, make_accelerator(cfg))
    scales = {t: float(a["logit_scale"]) for t, a in run.plan.teacher_attrs.items()}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(f.mixed_precision)
    run.model.to(device)
    models = {name: load_teacher(spec, str(device)) for name, spec in teachers.items()}
    captions = run.corpus.captions
    plain = DataLoader(run.loader.dataset, batch_size=f.batch_size, drop_last=True, sampler=run.loader.sampler,
                       collate_fn=Collate(run.loader.collate_fn.tokenizer), num_workers=f.workers)

    def online_feats(batch, only: set[str] | None = None) -> dict:
        texts = [captions[int(r)] for r in batch.rows]
        out = {}
        for name, t in models.items():
            if only is not None and name not in only:
                continue
            d = t.describe()  # the loader's uint8 pixels at the teacher's own size and normalisation
            x = F.interpolate(batch.images.float().div(255), size=tuple(d["image_size"]), mode="bilinear",
                              align_corners=False)
            x = (x - x.new_tensor(d["mean"]).view(-1, 1, 1)) / x.new_tensor(d["std"]).view(-1, 1, 1)
            out[name] = Pair(t.encode_image(x), t.encode_text(t.tokenize(texts)))
        return out

    def loop(loader, feats_of) -> list[float]:
        model = run.model
        model.train()
        opt = build_optimizer(model, cfg.optim)
        times, step = [], 0
        while step < f.steps:
            loader.sampler.set_epoch(step)
            t0 = time.perf_counter()
            for batch in loader:
                batch = batch.to(device)
                with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                    out = model(batch.images, batch.tokens)
                    losses = run.loss(out, TeacherBatch(feats_of(batch), scales),
                                      torch.Generator().manual_seed(step))
                losses["loss"].backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
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
    runs = interleave({"cached": lambda: steady(loop(run.loader, lambda b: b.teacher_feats), f.warmup_steps),
                       "online": lambda: steady(loop(plain, online_feats), f.warmup_steps),
                       "teachers_only": teachers_only}, f.repeats, "online vs cached")
    return {"interleaved": runs, "flops": flops}


def flop_ratios(student, models: dict, batch, online_feats) -> dict:
    """Forward FLOPs per sample (torch.utils.flop_counter) of the student and of each teacher at its own input
    size, and teacher / student: the figure that says whether these teachers are as heavy as real ones."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    def count(fn) -> float:
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            fn()
        return fc.get_total_flops() / len(batch.rows)

    out = {"student": count(lambda: student(batch.images, batch.tokens))}
    everything = count(lambda: online_feats(batch))
    for name in models:
        out[name] = count(lambda: online_feats(batch, {name}))
    out["ratios"] = {n: out[n] / out["student"] for n in models}
    out["all_teachers_over_student"] = everything / out["student"]
    return out


# -- where the time of a step goes: the trainer's step, phase by phase -----------------------------------------
PHASES = ("data", "forward", "loss", "backward", "optimizer")


def profile_phases(config: Path, f: Flags) -> dict:
    """Median seconds per phase of a step, as `distill.train` runs it (same model, loss, data, optimizer; no
    Accelerate wrapper), with the data loaded in this process (num_workers=0) so that its cost shows; "read" is
    the part of "data" spent in the feature reader."""
    import torch

    from distill.build_run import build_run
    from distill.config import Config
    from distill.losses import TeacherBatch
    from distill.optim import build_optimizer
    from distill.train import make_accelerator

    out_dir = Path(_yaml_get(config, "train", "output_dir"))
    cfg = Config.from_yaml(config, [f"train.output_dir={out_dir}-profile", "data.num_workers=0"])
    run = build_run(cfg, make_accelerator(cfg))
    scales = {t: float(a["logit_scale"]) for t, a in run.plan.teacher_attrs.items()}
    model, collate = run.model, run.loader.collate_fn
    model.train()
    opt = build_optimizer(model, cfg.optim)
    read_s = []
    if collate.features:
        reader_read = collate.reader.read

        def timed_read(*a, **k):
            t0 = time.perf_counter()
            got = reader_read(*a, **k)
            read_s.append(time.perf_counter() - t0)
            return got

        collate.reader.read = timed_read
    times = {p: [] for p in PHASES}
    epoch, it = 0, iter(run.loader)
    for step in range(f.steps):
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            epoch += 1
            run.loader.sampler.set_epoch(epoch)
            it = iter(run.loader)
            batch = next(it)
        t1 = time.perf_counter()
        out = model(batch.images, batch.tokens)
        t2 = time.perf_counter()
        teachers = TeacherBatch(batch.teacher_feats, scales) if batch.teacher_feats else None
        losses = run.loss(out, teachers, torch.Generator().manual_seed(step))
        t3 = time.perf_counter()
        losses["loss"].backward()
        t4 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.clamp_logit_scale(cfg.optim.logit_scale_max)
        t5 = time.perf_counter()
        for p, dt in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
            times[p].append(dt)
    res = {p: steady(v, f.warmup_steps) for p, v in times.items()}
    res["read"] = steady(read_s, f.warmup_steps) if read_s else 0.0
    res["step"] = steady([sum(x) for x in zip(*times.values())], f.warmup_steps)
    return res


# -- main -----------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    import torch

    from cache import CacheJob, build_cache

    from open_clip_baseline import run_open_clip

    f = parse_flags(Flags, argv, __doc__)
    quiet_libraries()
    owned = f.workdir is None
    work = Path(tempfile.mkdtemp(prefix="bench-train-")) if owned else Path(f.workdir)
    work.mkdir(parents=True, exist_ok=True)
    try:
        corpus = make_jpeg_corpus(work / "corpus", f.images, f.image_px)
        teachers = make_teachers(work / "teachers", f)
        if not (work / "tokenizer" / "tokenizer.json").is_file():  # one vocabulary for every run
            from cache.corpus import open_corpus
            from student.tokenizer import train_wordpiece

            train_wordpiece(open_corpus(str(corpus)).captions, work / "tokenizer", vocab_size=1000)
        features = work / "features.h5"
        if not features.exists():
            build_cache(CacheJob(data=str(corpus), teachers=teachers, out=str(features), batch_size=64,
                                 num_workers=0, device="auto", progress=False))
        cfg_c = write_config(work, f, "contrastive", corpus, None)
        cfg_h = write_config(work, f, "hybrid", corpus, features)
        print("1+3: our trainer (contrastive, hybrid) and open_clip_train, interleaved", flush=True)
        variants = {"contrastive": lambda: run_ours(cfg_c, f)["step_s"], "hybrid": lambda: run_ours(cfg_h, f)["step_s"]}
        if not f.skip_open_clip:  # after our contrastive run in each repeat: it reuses that run's student/ folder
            variants["open_clip"] = lambda: run_open_clip(work / "run-contrastive" / "student", corpus, work, f)["step_s"]
        trainers = interleave(variants, f.repeats, "trainers")
        phases = None
        if f.profile:
            print("1b: phases of a step: contrastive, hybrid", flush=True)
            phases = {"contrastive": profile_phases(cfg_c, f), "hybrid": profile_phases(cfg_h, f)}
        print("2: online vs cached teachers, interleaved", flush=True)
        ovc = online_vs_cached(cfg_h, teachers, f)
    finally:
        if owned:
            shutil.rmtree(work, ignore_errors=True)

    bs, runs, flops = f.batch_size, ovc["interleaved"], ovc["flops"]
    r1, r2 = trainers.ratio("hybrid", "contrastive"), runs.ratio("online", "cached")
    share = runs.ratio("teachers_only", "online")
    ideal = 1 / (1 - share.median) if share.median < 1 else float("inf")
    med = {k: trainers.stats(k).median for k in trainers.samples}
    rows = [["1. hybrid (3 cached teachers) / contrastive, step time", med["hybrid"], med["contrastive"], r1.text(),
             f"<= {GOAL_HYBRID}", "yes" if r1.median <= GOAL_HYBRID else "no"],
            ["2. online teachers / cached teachers, step time", runs.stats("online").median,
             runs.stats("cached").median, r2.text(), f">= 1 / (1 - teachers' share {share.median:.2f}) = {ideal:.2f}",
             "yes" if r2.median >= 0.95 * ideal else "no"]]
    results = {"trainers": trainers.as_dict(), "online_vs_cached": runs.as_dict(), "flops_per_sample": flops,
               "ratios": {"hybrid_over_contrastive": dataclasses.asdict(r1),
                          "online_over_cached": dataclasses.asdict(r2),
                          "teachers_share_online": dataclasses.asdict(share)},
               "torch_threads": torch.get_num_threads()}
    if "open_clip" in trainers.samples:
        r3 = trainers.ratio("open_clip", "contrastive")  # step-time ratio = our samples/s over theirs
        results["ratios"]["ours_over_open_clip_samples_per_s"] = dataclasses.asdict(r3)
        rows.append(["3. ours contrastive / open_clip_train, samples/s", bs / med["contrastive"],
                     bs / med["open_clip"], r3.text(), f">= {GOAL_OPEN_CLIP}",
                     "yes" if r3.median >= GOAL_OPEN_CLIP else "no"])
    md = table(rows, ["comparison", "A (median)", "B (median)", "A / B per repeat: median [min, max]", "goal", "met"])
    if phases is not None:
        results["phases"] = phases
        prow = [[p, 1e3 * phases["contrastive"][p], 1e3 * phases["hybrid"][p],
                 1e3 * (phases["hybrid"][p] - phases["contrastive"][p])] for p in (*PHASES, "step")]
        prow.insert(1, ["  of which feature read", 0.0, 1e3 * phases["hybrid"]["read"], 1e3 * phases["hybrid"]["read"]])
        md += ("\n\nPhases of a step (ms, medians, data loaded in-process: num_workers=0; not interleaved):\n\n"
               + table(prow, ["phase", "contrastive", "hybrid", "hybrid - contrastive"]) + "\n")
    fl = ", ".join(f"{n} {v:.1f}x" for n, v in flops["ratios"].items())
    student = (f"tiny preset widened to {f.student_width} (both towers, {f.student_layers} layers, {f.image_size}px)"
               if f.student_preset == "tiny" else f"preset {f.student_preset}")
    md = (f"Student: {student}, mixed precision {f.mixed_precision}; batch {bs}, {f.steps} steps, medians after {f.warmup_steps}; {f.images} JPEG pairs; "
          f"DataLoader workers {f.workers}; teachers oc, hf, oc2 (width {f.teacher_width}, {f.teacher_layers} "
          f"layers, {f.teacher_image_size}px, fed at that size); step times in seconds, samples/s in row 3. "
          f"Forward FLOPs per sample: student {flops['student'] / 1e6:.0f} MFLOP; teacher / student {fl}; all 3 "
          f"teachers {flops['all_teachers_over_student']:.1f}x. Online-teacher forward alone: "
          f"{runs.stats('teachers_only').median:.3f}s/step ({share.median:.0%} of an online step). "
          f"{f.repeats} interleaved repeats; 1-minute load average before each repeat and after: trainers "
          f"{', '.join(map(str, trainers.load))}; online vs cached {', '.join(map(str, runs.load))}.\n\n{md}\n")
    print("\n" + md)
    j, m = write_results("train_overhead", f, results, md)
    print(f"results: {j} and {m}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
