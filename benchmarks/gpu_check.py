"""One check for a lent GPU: the `biomedclip` student preset trained in bf16 on synthetic data, printing samples/s,
MFU and peak memory, with and without gradient caching (`data.micro_batch_size`) and `train.compile`, and with the
JPEGs decoded on the GPU (`data.decode: device`, variant `devdecode`).

    bash benchmarks/gpu_check.sh              # on the GPU, under 8 minutes (it calls this script)
    python -m benchmarks.gpu_check --smoke    # on a CPU: the tiny preset, a few steps (tests/test_gpu_check.py)

Why the real trainer: MFU is about what users get, so every variant is a `distill.train` run (its data loader,
loss and optimizer) in its own process (a fresh CUDA context, so peak memory is the variant's own), on a synthetic
corpus whose captions fill the whole context (256 tokens), with a tokenizer trained here: no downloads. FLOPs per
sample come from the model itself (torch.utils.flop_counter over one forward + backward at full context), not
from a formula; the issue's arithmetic says ~243 GFLOP for ViT-B/16 + PubMedBERT-256. A config key the trainer does
not know yet (one that `distill train --help` does not list) makes its variants print `status=skipped`.
Each variant prints one line: `gpu_check variant=NAME status=ok samples_per_s=... mfu=... peak_mem_gib=...`.
"""

from __future__ import annotations

import csv
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import yaml
from PIL import Image

from benchmarks.bench_common import parse_flags, quiet_libraries

# Imports of torch and of the project's modules (which load torch) sit in the functions that use them, so that
# --help and a flag error answer at once, without loading torch.

REPO = Path(__file__).resolve().parent.parent
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0}  # dense, from the data sheets


@dataclass(frozen=True)
class Flags:
    smoke: bool = False  # CPU check: tiny preset, batch 8, 3 steps (overrides the sizes below)
    preset: str = "biomedclip"  # student preset
    batch_size: int = 256  # per step (the contrastive batch)
    micro_batch_size: int = 64  # gradient-caching chunk for the data.micro_batch_size variants
    steps: int = 30  # optimizer steps per variant
    warmup_steps: int = 10  # steps left out of the samples/s median (start-up, compilation)
    images: int = 1024  # synthetic images (the loader cycles over them)
    image_px: int = 224  # their side
    workers: int = 8  # DataLoader workers
    mixed_precision: str = "bf16"  # no | bf16 | fp16
    peak_tflops: float = 0.0  # the accelerator's dense peak for MFU; 0: from the GPU's name, else n/a
    variants: tuple[str, ...] = ("plain", "gradcache", "compile", "compile+gradcache", "devdecode")
    variant_timeout: int = 150  # seconds per variant before it is reported as status=timeout
    budget_s: int = 440  # whole check: later variants get what is left (gpu_check.sh: under 8 min)
    json_out: str | None = None  # also write every figure here
    workdir: str | None = None  # keep corpus and runs here (default: a temp dir)
    child: str | None = None  # internal: train this config in this process, print its peak memory


def sized(f: Flags) -> Flags:
    """--smoke: what runs on 2 CPU cores in seconds."""
    if not f.smoke:
        return f
    return replace(
        f,
        preset="tiny",
        batch_size=8,
        micro_batch_size=4,
        steps=3,
        warmup_steps=1,
        images=16,
        image_px=32,
        workers=0,
        mixed_precision="no",
        variant_timeout=120,
        variants=f.variants if f.variants != Flags.variants else ("plain", "gradcache", "devdecode"),
    )


def make_data(work: Path, f: Flags) -> tuple[Path, Path]:
    """Synthetic corpus with captions long enough to fill a 256-token context, and a WordPiece trained on it."""
    from cache.sources.synthetic import make_synthetic_corpus  # noqa: PLC0415 (lazy: torch after the flags)
    from student.tokenizer import train_wordpiece  # noqa: PLC0415 (lazy: torch after the flags)

    path = make_synthetic_corpus(work / "corpus", n=f.images, image_size=f.image_px)
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for i, r in enumerate(rows):  # ~300 words: the text tower runs at full context, as the FLOP count assumes
        r["caption"] = " ".join([r["caption"], rows[(i + 1) % len(rows)]["caption"]] * 40)[:2400]
        r["image"] = _as_jpeg(path.parent / r["image"])  # JPEGs, as real corpora are (and data.decode=device reads)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    tok = work / "tokenizer"
    if not (tok / "tokenizer.json").is_file():
        train_wordpiece([r["caption"] for r in rows], tok, vocab_size=30522)
    return path, tok


def flops_per_sample(f: Flags, tokenizer: Path, work: Path) -> float:
    """Training FLOPs of one sample: forward + backward of the student at full context, counted by torch."""
    import torch  # noqa: PLC0415 (lazy: torch after the flags)
    from torch.utils.flop_counter import FlopCounterMode  # noqa: PLC0415 (lazy: torch after the flags)

    from student.build import build_student  # noqa: PLC0415 (lazy: torch after the flags)

    torch.manual_seed(0)
    b = build_student(f.preset, work / "flops-student", tokenizer_dir=tokenizer)
    size = b.preprocess_cfg.get("size", f.image_px)
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    tokens = b.tokenizer(["word " * 400])
    images = torch.randn(1, 3, *size)
    b.model.train()
    with FlopCounterMode(display=False) as fc:
        out = b.model(images, tokens)
        feats = out if isinstance(out, (tuple, list)) else (out["image_features"], out["text_features"])
        (feats[0].float().sum() + feats[1].float().sum()).backward()
    return float(fc.get_total_flops())


def config_keys() -> str:
    """Every key the trainer accepts (what `distill train --help` lists), so variants for keys not landed yet are
    skipped, not failed."""
    from distill.config.train_config import Config  # noqa: PLC0415 (lazy: torch after the flags)
    from distill.config.usage import config_help  # noqa: PLC0415 (lazy: torch after the flags)

    return config_help(Config)


def _as_jpeg(png: Path) -> str:
    jpg = png.with_suffix(".jpg")
    with Image.open(png) as im:
        im.convert("RGB").save(jpg, "JPEG", quality=90)
    png.unlink()
    return str(jpg.relative_to(png.parent.parent))


def variant_overrides(name: str, f: Flags, keys: str) -> tuple[dict, str | None]:
    """(config overrides, reason to skip or None) for one variant name."""
    out: dict = {}
    for part in name.split("+"):
        if part == "gradcache":
            if not _has_key(keys, "data.micro_batch_size"):
                return {}, "data.micro_batch_size not in this trainer's config"
            out["data.micro_batch_size"] = f.micro_batch_size
        elif part == "compile":
            if not _has_key(keys, "train.compile"):
                return {}, "train.compile not in this trainer's config"
            out["train.compile"] = True
        elif part == "devdecode":
            if not _has_key(keys, "data.decode"):
                return {}, "data.decode not in this trainer's config"
            out["data.decode"] = "device"
        elif part != "plain":
            return {}, f"unknown variant {part!r} (plain, gradcache, compile, devdecode, or joined with +)"
    return out, None


def _has_key(help_text: str, key: str) -> bool:
    """Whether `key` is listed in the trainer's --help (lines `  section.key = default ...`)."""
    return any(line.strip().startswith(key + " ") for line in help_text.splitlines())


def write_config(work: Path, f: Flags, name: str, corpus: Path, tok: Path, extra: dict) -> Path:
    cfg = yaml.safe_load((REPO / "configs" / "tiny-contrastive.yaml").read_text())
    cfg["student"] = {"preset": f.preset, "tokenizer_dir": str(tok), "vocab_size": 30522}
    cfg["data"].update({"corpus": str(corpus), "batch_size": f.batch_size, "num_workers": f.workers})
    cfg["train"].update(
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
    for key, value in extra.items():
        section, k = key.split(".")
        cfg[section][k] = value
    path = work / f"config-{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_child(config: str) -> int:
    """Train one config here and print the peak memory: a fresh process per variant keeps the peaks apart."""
    import torch  # noqa: PLC0415 (lazy: torch after the flags)

    from distill.config.train_config import Config  # noqa: PLC0415 (lazy: torch after the flags)
    from distill.train import train  # noqa: PLC0415 (lazy: torch after the flags)

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    train(Config.from_yaml(config))
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"GPU_CHECK_PEAK_BYTES {peak} {'cuda' if cuda else 'cpu-maxrss'}", flush=True)
    return 0


def run_variant(config: Path, f: Flags, timeout: float) -> dict:
    t0 = time.perf_counter()
    if timeout < 20:
        return {"status": "timeout", "reason": "no time left in --budget-s", "wall_s": 0.0}
    try:
        p = subprocess.run(
            [sys.executable, "-m", "benchmarks.gpu_check", "--child", str(config)],
            cwd=REPO,
            capture_output=True,
            text=True,
            env=_env(),
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "wall_s": time.perf_counter() - t0}
    if p.returncode != 0:
        tail = (p.stdout + p.stderr).strip().splitlines()[-1:] or ["?"]
        return {"status": "failed", "reason": tail[0][:200], "wall_s": time.perf_counter() - t0}
    peak = next(int(line.split()[1]) for line in p.stdout.splitlines() if line.startswith("GPU_CHECK_PEAK_BYTES"))
    log = Path(yaml.safe_load(config.read_text())["train"]["output_dir"]) / "log.jsonl"
    rates = [json.loads(x)["samples_per_s"] for x in log.read_text().splitlines() if x.strip()]
    return {
        "status": "ok",
        "samples_per_s": statistics.median(rates[f.warmup_steps :] or rates),
        "peak_mem_bytes": peak,
        "steps": len(rates),
        "wall_s": time.perf_counter() - t0,
    }


def peak_flops(f: Flags) -> tuple[float | None, str]:
    import torch  # noqa: PLC0415 (lazy: torch after the flags)

    if f.peak_tflops > 0:
        return f.peak_tflops * 1e12, f"--peak-tflops {f.peak_tflops}"
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        for key, tf in PEAK_BF16_TFLOPS.items():
            if key in name:
                return tf * 1e12, f"{name}: {tf} TFLOP/s dense bf16"
        return None, f"{name}: peak unknown, pass --peak-tflops"
    return None, "no GPU: pass --peak-tflops for an MFU"


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def main(argv=None) -> int:
    f = parse_flags(Flags, argv, __doc__)
    if f.child:
        return run_child(f.child)
    f = sized(f)
    start = time.perf_counter()
    quiet_libraries()
    import torch  # noqa: PLC0415 (lazy: torch after the flags)

    work = Path(f.workdir or tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    corpus, tok = make_data(work, f)
    fps = flops_per_sample(f, tok, work)
    peak, peak_note = peak_flops(f)
    keys = config_keys()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    print(
        f"gpu_check device={device.replace(' ', '_')} preset={f.preset} batch={f.batch_size} steps={f.steps} "
        f"precision={f.mixed_precision} flops_per_sample={fps:.3e} peak={peak_note!r}",
        flush=True,
    )
    results: dict[str, dict[str, Any]] = {}
    for name in f.variants:
        extra, skip = variant_overrides(name, f, keys)
        if skip:
            results[name] = {"status": "skipped", "reason": skip}
            print(f"gpu_check variant={name} status=skipped reason={skip!r}", flush=True)
            continue
        left = min(f.variant_timeout, f.budget_s - (time.perf_counter() - start))
        config = write_config(work, f, name.replace("+", "-"), corpus, tok, extra)
        r = results[name] = {**run_variant(config, f, left), "overrides": extra}
        if r["status"] != "ok":
            print(f"gpu_check variant={name} status={r['status']} reason={r.get('reason', '')!r}", flush=True)
            continue
        r["mfu"] = r["samples_per_s"] * fps / peak if peak else None
        mfu = "n/a" if r["mfu"] is None else f"{r['mfu']:.3f}"
        print(
            f"gpu_check variant={name} status=ok samples_per_s={r['samples_per_s']:.2f} mfu={mfu} "
            f"peak_mem_gib={r['peak_mem_bytes'] / 2**30:.2f} wall_s={r['wall_s']:.0f}",
            flush=True,
        )
    if f.json_out:
        Path(f.json_out).write_text(
            json.dumps(
                {
                    "flags": asdict(f),
                    "device": device,
                    "flops_per_sample": fps,
                    "peak_flops": peak,
                    "load_avg_1m": os.getloadavg()[0],
                    "variants": results,
                },
                indent=2,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
