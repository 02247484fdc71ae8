"""What distillation from cached teachers costs per training step, and how our trainer compares with open_clip's.

    python benchmarks/train_overhead.py              # defaults sized for a few minutes on 2 cores
    python benchmarks/train_overhead.py --steps 60 --batch-size 64 --student-width 256

Same student (the `tiny` preset widened: --student-width, --student-layers, --image-size), same synthetic JPEG
corpus, batch size and number of steps everywhere; step times are medians over the steps after --warmup-steps
(start-up, first batches and epoch boundaries excluded), measured side by side in one run:

1. `hybrid` with 3 cached teachers over `contrastive` (both `python -m distill.train`, step times from each
   run's log.jsonl). Goal <= 1.05.
2. The same distillation with the 3 teachers run online at every step (their encode_image/encode_text inside the
   step, as open_clip's --distill-model does, feeding the same DistillLoss) over the cached features, both in
   one plain loop here over the trainer's own model, loss and data. Goal: cached faster by the teachers' share.
3. Our `contrastive` samples/s over `python -m open_clip_train.main` on the same model config (our RUN/student
   folder as `--model local-dir:...`), CSV data, batch size, steps, fp32, same DataLoader workers. Goal >= 1.0.
"""
from __future__ import annotations

import json
import os
import re
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
from bench_common import parse_flags, quiet_libraries, table, write_results  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
GOAL_HYBRID = 1.05
GOAL_OPEN_CLIP = 1.0


@dataclass(frozen=True)
class Flags:
    images: int = 256                 # synthetic JPEG pairs in the corpus
    image_px: int = 128               # their side
    batch_size: int = 32              # per step, everywhere
    steps: int = 30                   # optimizer steps per run
    warmup_steps: int = 8             # steps excluded from the medians
    workers: int = 1                  # DataLoader workers, ours and open_clip_train's
    student_preset: str = "tiny"      # tiny (widened by the next three flags) | biomedclip-small | biomedclip
    mixed_precision: str = "no"       # no | bf16 | fp16 (bf16 on a GPU for the biomedclip presets)
    student_width: int = 128          # tiny preset widened: ViT and BERT width,
    student_layers: int = 4           # layers of both towers,
    image_size: int = 64              # input resolution (patch 8)
    teacher_width: int = 128          # the 3 tiny teachers (2 open_clip, 1 HF CLIP)
    teacher_layers: int = 4
    teacher_image_size: int = 64
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


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


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

    def online_feats(batch) -> dict:
        texts = [captions[int(r)] for r in batch.rows]
        out = {}
        for name, t in models.items():
            size = tuple(t.describe()["image_size"])
            x = F.interpolate(batch.images, size=size, mode="bilinear", align_corners=False)
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

    cached = loop(run.loader, lambda b: b.teacher_feats)
    online = loop(plain, online_feats)
    teacher_only = []  # the teachers' own share, timed alone on the same batches
    for i, batch in enumerate(plain):
        batch = batch.to(device)
        t0 = time.perf_counter()
        online_feats(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        teacher_only.append(time.perf_counter() - t0)
        if i + 1 >= min(f.steps, 12):
            break
    return {"cached_step_s": steady(cached, f.warmup_steps), "online_step_s": steady(online, f.warmup_steps),
            "teachers_only_s": statistics.median(teacher_only[2:] or teacher_only)}


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


# -- 3. open_clip_train on the same model --------------------------------------------------------------------
def open_clip_model_dir(student_dir: Path, out: Path) -> Path:
    """Our student's folder (open_clip_config.json, BERT config.json, tokenizer) plus freshly initialised weights.

    Stock open_clip asks transformers for the BERT tower's pretrained weights unless the folder holds CLIP
    weights (open_clip_model.safetensors), so we write the same architecture's initial weights there."""
    from safetensors.torch import save_file

    from student.build import instantiate

    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(student_dir, out, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    cfg_path = out / "open_clip_config.json"
    cfg = json.loads(cfg_path.read_text())
    text = cfg["model_cfg"]["text_cfg"]
    for key in ("hf_model_name", "hf_tokenizer_name"):
        if key in text:
            text[key] = str(out.resolve())
    cfg_path.write_text(json.dumps(cfg, indent=2))
    model = instantiate(cfg["model_cfg"], cfg.get("preprocess_cfg"))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "open_clip_model.safetensors"))
    return out


def run_open_clip(student_dir: Path, corpus: Path, work: Path, f: Flags) -> dict:
    """`python -m open_clip_train.main` on our student's open_clip config; samples/s per step from its log."""
    import csv

    rows = list(csv.DictReader(open(corpus, newline="")))
    abs_csv = work / "corpus_abs.csv"  # open_clip's CsvDataset opens paths as written (relative to its cwd)
    with open(abs_csv, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["image", "caption"])
        w.writeheader()
        w.writerows({"image": str((corpus.parent / r["image"]).resolve()), "caption": r["caption"]} for r in rows)
    model_dir = open_clip_model_dir(student_dir, work / "open_clip_model")
    per_epoch = len(rows) // f.batch_size
    epochs = -(-f.steps // per_epoch)
    logs = work / "open_clip_logs"
    shutil.rmtree(logs, ignore_errors=True)
    cmd = [sys.executable, "-m", "open_clip_train.main", "--model", f"local-dir:{model_dir}",
           "--train-data", str(abs_csv), "--dataset-type", "csv", "--csv-separator", ",",
           "--csv-img-key", "image", "--csv-caption-key", "caption", "--batch-size", str(f.batch_size),
           "--epochs", str(epochs), "--workers", str(f.workers), "--precision",
           {"no": "fp32", "bf16": "amp_bf16", "fp16": "amp"}[f.mixed_precision],
           "--device", "cuda" if _cuda() else "cpu",
           "--lr", "2e-3", "--wd", "0.2", "--warmup", "5", "--log-every-n-steps", "1", "--save-frequency", "0",
           "--logs", str(logs), "--name", "bench", "--seed", "0", "--report-to", ""]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=work, capture_output=True, text=True, env=_env())
    wall = time.perf_counter() - t0
    text = p.stdout + p.stderr
    if p.returncode != 0:
        raise RuntimeError(f"open_clip_train failed ({p.returncode}):\n{text[-3000:]}")
    sps = [float(m) for m in re.findall(r"Batch \(t\): [0-9.]+, ([0-9.e+]+)/s,", text)][: f.steps]
    if not sps:
        raise RuntimeError(f"no 'Train Epoch' lines in open_clip_train's output:\n{text[-3000:]}")
    step_s = [f.batch_size / s for s in sps]
    return {"wall_s": wall, "step_s": steady(step_s, f.warmup_steps), "steps": len(sps), "command": " ".join(cmd)}


# -- main -----------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    import torch

    from cache import CacheJob, build_cache
    from cache_overhead import make_jpeg_corpus

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
        print("1/3 our trainer: contrastive, hybrid", flush=True)
        contrastive = run_ours(cfg_c, f)
        hybrid = run_ours(cfg_h, f)
        phases = None
        if f.profile:
            print("1b/3 phases of a step: contrastive, hybrid", flush=True)
            phases = {"contrastive": profile_phases(cfg_c, f), "hybrid": profile_phases(cfg_h, f)}
        print("2/3 online vs cached teachers", flush=True)
        ovc = online_vs_cached(cfg_h, teachers, f)
        oc = None
        if not f.skip_open_clip:
            print("3/3 open_clip_train", flush=True)
            oc = run_open_clip(Path(contrastive["student_dir"]), corpus, work, f)
    finally:
        if owned:
            shutil.rmtree(work, ignore_errors=True)

    bs = f.batch_size
    r1 = hybrid["step_s"] / contrastive["step_s"]
    r2 = ovc["online_step_s"] / ovc["cached_step_s"]
    share = ovc["teachers_only_s"] / ovc["online_step_s"]
    rows = [["1. hybrid (3 cached teachers) / contrastive, step time", hybrid["step_s"], contrastive["step_s"], r1,
             f"<= {GOAL_HYBRID}", "yes" if r1 <= GOAL_HYBRID else "no"],
            ["2. online teachers / cached teachers, step time", ovc["online_step_s"], ovc["cached_step_s"], r2,
             f">= 1 / (1 - {share:.2f}) = {1 / (1 - share):.2f}" if share < 1 else "n/a (noisy: share >= 1)",
             ("yes" if r2 >= 0.95 / (1 - share) else "no") if share < 1 else "n/a"]]
    results = {"contrastive": contrastive, "hybrid": hybrid, "online_vs_cached": ovc, "open_clip_train": oc,
               "ratios": {"hybrid_over_contrastive": r1, "online_over_cached": r2, "teachers_share_online": share},
               "torch_threads": torch.get_num_threads()}
    if oc is not None:
        r3 = (bs / contrastive["step_s"]) / (bs / oc["step_s"])
        results["ratios"]["ours_over_open_clip_samples_per_s"] = r3
        rows.append(["3. ours contrastive / open_clip_train, samples/s", bs / contrastive["step_s"],
                     bs / oc["step_s"], r3, f">= {GOAL_OPEN_CLIP}", "yes" if r3 >= GOAL_OPEN_CLIP else "no"])
    md = table(rows, ["comparison", "A", "B", "A / B", "goal", "met"])
    if phases is not None:
        results["phases"] = phases
        prow = [[p, 1e3 * phases["contrastive"][p], 1e3 * phases["hybrid"][p],
                 1e3 * (phases["hybrid"][p] - phases["contrastive"][p])] for p in (*PHASES, "step")]
        prow.insert(1, ["  of which feature read", 0.0, 1e3 * phases["hybrid"]["read"], 1e3 * phases["hybrid"]["read"]])
        md += ("\n\nPhases of a step (ms, medians, data loaded in-process: num_workers=0):\n\n"
               + table(prow, ["phase", "contrastive", "hybrid", "hybrid - contrastive"]) + "\n")
    student = (f"tiny preset widened to {f.student_width} (both towers, {f.student_layers} layers, {f.image_size}px)"
               if f.student_preset == "tiny" else f"preset {f.student_preset}")
    md = (f"Student: {student}, mixed precision {f.mixed_precision}; batch {bs}, {f.steps} steps, medians after {f.warmup_steps}; {f.images} JPEG pairs; "
          f"DataLoader workers {f.workers}; teachers oc, hf, oc2 (width {f.teacher_width}, {f.teacher_layers} "
          f"layers, {f.teacher_image_size}px); step times in seconds, samples/s in row 3. Online-teacher forward "
          f"alone: {ovc['teachers_only_s']:.3f}s/step ({share:.0%} of an online step).\n\n{md}\n")
    print("\n" + md)
    j, m = write_results("train_overhead", f, results, md)
    print(f"results: {j} and {m}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
