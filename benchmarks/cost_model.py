"""What a feature cache of a large corpus costs before it is built: disk, teacher GPU hours, nodes (docs/scale.md).

    python -m benchmarks.cost_model                         # the tables of docs/scale.md (about 2 min on 2 cores)
    python -m benchmarks.cost_model --rows 24000000 --mfu 0.3 --gpus-per-node 8 --json OUT.json

FLOPs per image and per caption are COUNTED, not quoted: each teacher architecture is built with random weights
(no download: open_clip model configs, transformers configs) and one forward is run under
`torch.utils.flop_counter` (2 FLOPs per multiply-add). GPU hours then assume a utilisation (`--mfu`, default 0.4 of
the bf16 dense peak, `--peak-tflops`, default an H200's 989): an assumption, stated in every table, to be replaced by
`gpu_check.sh`-style measurements on the user's own GPUs. Disk sizes are exact arithmetic of the cache layout
(float16 rows; views multiply the image side; token grids are G x G x the vision width). Write, merge and read
rates, when `benchmarks/results/scale_sim.json` exists, come from `benchmarks/scale_sim.py` on this machine.

The teacher set is the zoo's aliases (README) with their published architectures; edit TEACHERS or pass
`--teachers NAME,NAME` to cost another set.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.bench_common import RECORDED_DIR, Output, output_dir, parse_flags, quiet_libraries

# Imports of torch and of the project's modules (which load torch) sit in the functions that use them, so that
# --help and a flag error answer at once, without loading torch.


@dataclass(frozen=True)
class Arch:
    """A teacher: its image tower (open_clip name or SigLIP config), text tower and embedding size."""

    image: str  # open_clip model name, or "siglip-so400m-448" (MedSigLIP's SiglipVisionModel)
    text: str  # "open_clip:NAME" (that model's own text tower, 77 tokens), "bert-base-256", "siglip-so400m-64"
    embed_dim: int
    vision_width: int  # the patch tokens' width (token grids)
    note: str = ""


# Published architectures of the zoo's teachers (README aliases); UniMed-CLIP's from its release README.
TEACHERS: dict[str, Arch] = {
    "biomedclip": Arch("ViT-B-16", "bert-base-256", 512, 768, "ViT-B/16 224 + PubMedBERT, context 256"),
    "quiltnet-b16": Arch("ViT-B-16", "open_clip:ViT-B-16", 512, 768),
    "quiltnet-b32": Arch("ViT-B-32", "open_clip:ViT-B-32", 512, 768),
    "genmedclip": Arch("ViT-B-16", "open_clip:ViT-B-16", 512, 768, "architecture assumed ViT-B/16"),
    "plip": Arch("ViT-B-32", "open_clip:ViT-B-32", 512, 768),
    "pubmedclip": Arch("ViT-B-32", "open_clip:ViT-B-32", 512, 768),
    "unimed-b16": Arch("ViT-B-16", "bert-base-256", 512, 768, "BiomedBERT-base text, context 256"),
    "unimed-l14-336": Arch("ViT-L-14-336", "bert-base-256", 768, 1024, "BiomedBERT-base text, context 256"),
    "medsiglip": Arch("siglip-so400m-448", "siglip-so400m-64", 1152, 1152, "SigLIP so400m/14 at 448, 64 tokens"),
}


@dataclass(frozen=True)
class Flags(Output):
    rows: str = "2900000,15000000,24000000"  # corpus sizes: MMKD-CLIP's 2.9M, PMC-15M, BIOMEDICA's 24M
    teachers: str = ",".join(TEACHERS)  # which of TEACHERS to cost
    views: int = 10  # stored views for the "with views" column (DataCompDR stores 10-30)
    tokens: int = 4  # token grid G for the "with token grids" column
    peak_tflops: float = 989.0  # bf16 dense peak of one GPU (H200/H100 data sheet)
    mfu: float = 0.4  # ASSUMED utilisation of the teacher forward passes
    gpus_per_node: int = 8
    epochs: int = 10  # student training: passes over the corpus (the training table)
    train_mfu: float = 0.4  # ASSUMED utilisation of student training (gpu_check.sh measures it)
    hours_per_day: float = 24.0
    json: str = ""  # also write every figure here


def _count(fn) -> float:
    import torch  # noqa: PLC0415 (lazy: torch after the flags)
    from torch.utils.flop_counter import FlopCounterMode  # noqa: PLC0415 (lazy: torch after the flags)

    # nn.MultiheadAttention's inference fast path is one fused op the counter does not see (a ViT-B/16 would count
    # 22.5 GFLOP instead of 35): off, so its projections are counted as the matmuls they are
    torch.backends.mha.set_fastpath_enabled(False)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def image_flops(name: str) -> float:
    import torch  # noqa: PLC0415 (lazy: torch after the flags)

    if name == "siglip-so400m-448":
        from transformers import SiglipVisionConfig, SiglipVisionModel  # noqa: PLC0415 (lazy: torch after the flags)

        cfg = SiglipVisionConfig(
            hidden_size=1152,
            intermediate_size=4304,
            num_hidden_layers=27,
            num_attention_heads=16,
            patch_size=14,
            image_size=448,
        )
        m = SiglipVisionModel(cfg).eval()
        return _count(lambda: m(pixel_values=torch.zeros(1, 3, 448, 448)))
    import open_clip  # noqa: PLC0415 (lazy: torch after the flags)

    m = open_clip.create_model(name, pretrained=None).eval()
    size = m.visual.image_size if hasattr(m.visual, "image_size") else (224, 224)
    size = size if isinstance(size, (tuple, list)) else (size, size)
    return _count(lambda: m.encode_image(torch.zeros(1, 3, *size)))


def text_flops(name: str) -> float:
    import torch  # noqa: PLC0415 (lazy: torch after the flags)

    if name == "bert-base-256":
        from transformers import BertConfig, BertModel  # noqa: PLC0415 (lazy: torch after the flags)

        m = BertModel(BertConfig(max_position_embeddings=512), add_pooling_layer=True).eval()
        return _count(lambda: m(input_ids=torch.ones(1, 256, dtype=torch.long)))
    if name == "siglip-so400m-64":
        from transformers import SiglipTextConfig, SiglipTextModel  # noqa: PLC0415 (lazy: torch after the flags)

        m = SiglipTextModel(
            SiglipTextConfig(
                hidden_size=1152,
                intermediate_size=4304,
                num_hidden_layers=27,
                num_attention_heads=16,
                max_position_embeddings=64,
            )
        ).eval()
        return _count(lambda: m(input_ids=torch.ones(1, 64, dtype=torch.long)))
    import open_clip  # noqa: PLC0415 (lazy: torch after the flags)

    m = open_clip.create_model(name.split(":", 1)[1], pretrained=None).eval()
    return _count(lambda: m.encode_text(torch.ones(1, 77, dtype=torch.long)))


def gb(x: float) -> str:
    return f"{x / 1e12:.2f} TB" if x >= 1e12 else f"{x / 1e9:.0f} GB"


def main(argv=None) -> dict:
    f = parse_flags(Flags, argv, __doc__)
    quiet_libraries()
    import torch  # noqa: PLC0415 (lazy: torch after the flags)

    torch.set_num_threads(2)
    names = [n.strip() for n in f.teachers.split(",") if n.strip()]
    unknown = [n for n in names if n not in TEACHERS]
    if unknown:
        raise SystemExit(f"unknown teacher(s) {unknown}; known: {', '.join(TEACHERS)}")
    memo: dict[str, float] = {}
    per: dict[str, dict[str, Any]] = {}
    for n in names:
        a = TEACHERS[n]
        img = memo.setdefault(a.image, image_flops(a.image))
        txt = memo.setdefault(a.text, text_flops(a.text))
        per[n] = {
            "image_gflops": img / 1e9,
            "text_gflops": txt / 1e9,
            "embed_dim": a.embed_dim,
            "vision_width": a.vision_width,
            "note": a.note,
        }
        print(f"{n}: image {img / 1e9:.1f} GFLOP, caption {txt / 1e9:.1f} GFLOP", flush=True)
    rate = f.peak_tflops * 1e12 * f.mfu  # FLOP/s per GPU, assumed
    sizes = [int(r) for r in f.rows.split(",")]
    row_bytes = sum(2 * 2 * a["embed_dim"] for a in per.values())  # image + text, float16
    view_bytes = sum(2 * a["embed_dim"] * (f.views + 1) for a in per.values())  # K image views + 1 text
    token_bytes = sum(2 * f.tokens**2 * a["vision_width"] for a in per.values())  # one view
    flops_row = sum(a["image_gflops"] + a["text_gflops"] for a in per.values()) * 1e9
    flops_row_views = sum(a["image_gflops"] * f.views + a["text_gflops"] for a in per.values()) * 1e9
    # the student (ViT-B/16 + PubMedBERT-256, BiomedCLIP's architecture): forward + backward = 3 x forward
    student_flops = 3 * (
        memo.setdefault("ViT-B-16", image_flops("ViT-B-16"))
        + memo.setdefault("bert-base-256", text_flops("bert-base-256"))
    )
    recorded = RECORDED_DIR / "scale_sim.json"  # the committed scale_sim figures (read only)
    scale = json.loads(recorded.read_text()) if recorded.is_file() else None
    tables: list[dict[str, Any]] = []
    for n_rows in sizes:
        gpu_h = n_rows * flops_row / rate / 3600
        gpu_h_views = n_rows * flops_row_views / rate / 3600
        day = f.gpus_per_node * f.hours_per_day
        tables.append(
            {
                "rows": n_rows,
                "bytes": n_rows * row_bytes,
                "bytes_views": n_rows * view_bytes,
                "bytes_tokens": n_rows * token_bytes,
                "bytes_tokens_views": n_rows * token_bytes * f.views,
                "gpu_hours": gpu_h,
                "gpu_hours_views": gpu_h_views,
                "nodes_for_a_day": gpu_h / day,
                "nodes_for_a_day_views": gpu_h_views / day,
                "train_gpu_hours": n_rows * f.epochs * student_flops / (f.peak_tflops * 1e12 * f.train_mfu) / 3600,
                "per_teacher_gpu_hours": {
                    t: n_rows * (a["image_gflops"] + a["text_gflops"]) * 1e9 / rate / 3600 for t, a in per.items()
                },
            }
        )
    lines = [
        "| teacher | image GFLOP | caption GFLOP | embed dim | vision width | GPU h per 1M pairs |",
        "|---|---|---|---|---|---|",
    ]
    for t, c in per.items():
        h = 1e6 * (c["image_gflops"] + c["text_gflops"]) * 1e9 / rate / 3600
        lines.append(
            f"| {t} | {c['image_gflops']:.1f} | {c['text_gflops']:.1f} | {c['embed_dim']} | "
            f"{c['vision_width']} | {h:.2f} |"
        )
    lines += [
        "",
        f"| pairs | cache | + {f.views} views | + tokens G={f.tokens} | tokens with views | GPU h | "
        f"GPU h with views | {f.gpus_per_node}-GPU nodes for a day | with views |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in tables:
        lines.append(
            f"| {r['rows'] / 1e6:g}M | {gb(r['bytes'])} | {gb(r['bytes_views'])} | {gb(r['bytes_tokens'])} "
            f"| {gb(r['bytes_tokens_views'])} | {r['gpu_hours']:.0f} | {r['gpu_hours_views']:.0f} | "
            f"{r['nodes_for_a_day']:.2f} | {r['nodes_for_a_day_views']:.2f} |"
        )
    lines += [
        "",
        f"| pairs | student training, {f.epochs} epochs: GPU h | {f.gpus_per_node}-GPU nodes for a day |",
        "|---|---|---|",
    ]
    for r in tables:
        lines.append(
            f"| {r['rows'] / 1e6:g}M | {r['train_gpu_hours']:.0f} | "
            f"{r['train_gpu_hours'] / (f.gpus_per_node * f.hours_per_day):.2f} |"
        )
    md = "\n".join(lines) + (
        f"\n\nAssumed: {f.mfu:.0%} of {f.peak_tflops:g} TFLOP/s per GPU for the teacher "
        f"forwards and {f.train_mfu:.0%} for training (FLOPs counted by "
        f"torch.utils.flop_counter; the student {student_flops / 1e9:.0f} GFLOP per trained "
        f"pair); {len(per)} teachers; bytes per pair {row_bytes:,} (float16, image + text).\n"
    )
    print(md)
    out = {
        "flags": f.__dict__,
        "teachers": per,
        "student_train_gflops": student_flops / 1e9,
        "row_bytes": row_bytes,
        "tables": tables,
        "scale_sim": scale,
        "markdown": md,
    }
    folder = output_dir(f)
    folder.mkdir(parents=True, exist_ok=True)
    for path in (folder / "cost_model.json", *([Path(f.json)] if f.json else [])):
        path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"results: {folder / 'cost_model.json'}")
    return out


if __name__ == "__main__":
    main()
