"""Training configuration: frozen pydantic models built from YAML plus `section.key=value` overrides.

Everything is validated when the file is loaded, before any corpus or cache is opened: types, ranges, loss kinds
and options, combine modes, the mode's needs (see teachers/kernel/config_model.py for why pydantic, and the error
format).
Values derived at run time (teachers found in the cache, accumulation per epoch) live in `build_run.RunPlan`,
never written back here. The loss section's models (`LossTermCfg`, `CombineCfg`) are the loss's own.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, ValidationInfo, model_validator

from distill.config.ema import EmaCfg, TrainEvalCfg
from distill.config.file import read_config_text, split_argv
from distill.config.overrides import apply_override, plain
from distill.config.routing import RoutingCfg
from distill.config.terms import CombineCfg, LossTermCfg, static
from teachers.kernel.bounded_yaml import load_yaml
from teachers.kernel.config_model import Bool, ConfigError, Float, Int, Section, Str, check, config_error

__all__ = [
    "Config",
    "ConfigError",
    "StudentCfg",
    "DataCfg",
    "LossCfg",
    "LossTermCfg",
    "CombineCfg",
    "RoutingCfg",
    "OptimCfg",
    "TrainCfg",
    "DEFAULT_TERMS",
    "default_terms",
]

MODES = ("contrastive", "distill", "hybrid")
PRECISIONS = ("no", "bf16", "fp16")
SAMPLERS = ("auto", "block_shuffle", "block_deal", "random")
SCHEDULES = ("cosine", "constant")
FUSED = ("auto", "on", "off")

# The terms a mode trains with when loss.terms is empty (MMKD-CLIP's stage 2 minus its 50x weight).
DEFAULT_TERMS: dict[str, tuple[dict, ...]] = {
    "contrastive": ({"kind": "infonce"},),
    "distill": ({"kind": "feature", "kwargs": {"metric": "cosine"}}, {"kind": "icl"}),
    "hybrid": ({"kind": "infonce"}, {"kind": "feature", "kwargs": {"metric": "cosine"}}, {"kind": "icl"}),
}
# build_student's own arguments, which student.overrides must not repeat: the key to use instead
_STUDENT_ARGS = {
    "image_size": "student.image_size",
    "tokenizer_dir": "student.tokenizer_dir",
    "preset_or_spec": "student.preset",
    "out_dir": "train.output_dir",
}


def default_terms(mode: str) -> tuple[LossTermCfg, ...]:
    return tuple(LossTermCfg(**t) for t in DEFAULT_TERMS[mode])


class StudentCfg(Section):
    where = "student"
    preset: Str = Field("tiny", description="student preset (biomedclip, biomedclip-small, tiny) or a model spec")
    tokenizer_dir: Str | None = Field(
        None, description="WordPiece folder; null: the preset's own, else one trained on the corpus"
    )
    vocab_size: Int = Field(30522, description="WordPiece vocabulary size when one is trained on the corpus")
    freeze_vision_blocks: Int = Field(0, description="freeze patch embedding + the first N ViT blocks")
    lock_text_layers: Int = Field(0, description="freeze embeddings + the first N BERT layers")
    patch_dropout: Float = Field(0.0, description="drop this fraction of image patches while training (FLIP)")
    grad_checkpointing: Bool = Field(False, description="trade compute for memory in both towers")
    image_size: Int | None = Field(None, description="override the preset's image size")
    overrides: dict[Str, Any] = Field(
        default_factory=dict,
        description="extra keyword overrides for build_student (embed_dim, text_config, preprocess_cfg, ...)",
    )

    @model_validator(mode="after")
    def _valid(self) -> StudentCfg:
        check(self.freeze_vision_blocks >= 0, "student.freeze_vision_blocks must be >= 0")
        check(self.lock_text_layers >= 0, "student.lock_text_layers must be >= 0")
        check(0.0 <= self.patch_dropout < 1.0, "student.patch_dropout must be in [0, 1)")
        check(self.vocab_size > 0, "student.vocab_size must be > 0")
        check(self.image_size is None or self.image_size > 0, "student.image_size must be > 0")
        for k in self.overrides:
            check(
                k not in _STUDENT_ARGS, f"student.overrides.{k} is not an override; set {_STUDENT_ARGS.get(k)} instead"
            )
        return self


class DataCfg(Section):
    where = "data"
    corpus: Str = Field("", description="CSV/TSV/JSONL or WebDataset corpus (README.md, `distill cache`)")
    features: Str | None = Field(
        None,
        description="HDF5 feature cache from `distill cache` (distill, hybrid; "
        "contrastive: train on its rows and stored views, reading no teacher feature)",
    )
    batch_size: Int = Field(32, description="per device; global batch = batch_size x processes x accumulation")
    micro_batch_size: Int | None = Field(
        None,
        description="gradient caching: embed the per-device batch in chunks "
        "of this many rows, every loss term still sees the whole batch (same "
        "gradients, ~4/3 the compute); null: off",
    )
    num_workers: Int = Field(4, description="DataLoader workers (each opens the cache lazily)")
    trim_captions: Bool = Field(
        True,
        description="pad captions to the batch's longest, not the full context "
        "(HF text towers only; same embeddings, less text compute); false: full context",
    )
    crop_scale: tuple[Float, Float] = Field(
        (0.9, 1.0),
        description="RandomResizedCrop area range of the student's "
        "own crops (stored views decide instead; set against them: refused)",
    )
    flip: Bool = Field(
        False,
        description="random horizontal flip of the student's own crops (off: laterality "
        "matters in radiology; stored views decide instead)",
    )
    use_views: Bool = Field(
        True,
        description="when the cache stores views, show the student the teachers' views "
        "(mode=contrastive with data.features: the same-views baseline, the views a hybrid run "
        "with the same seed shows); false: the student's own crops (contrastive: cache unused)",
    )
    # device: the workers read JPEG bytes and headers only; the main process decodes each batch on the training
    # device (nvJPEG on CUDA) and crops and resizes there (distill/data/device_decode.py). Same crops, slightly
    # different resampling; non-JPEGs are still decoded in the workers.
    decode: Str = Field(
        "worker",
        description="where JPEGs are decoded: worker (CPU, in the DataLoader workers) | device (the training GPU)",
    )
    # Images over this many pixels stop training with a message naming the row, before they are decoded (a 17 KB
    # PNG can claim 144 Mpx); `distill cache --max-pixels` is the same limit.
    max_pixels: Int = Field(64_000_000, description="refuse images over this many pixels; 0: PIL's own limit")
    # block_shuffle: blocks of block_rows consecutive cache rows in random order, rows shuffled within a buffer of
    # shuffle_buffer_blocks blocks; each block is read whole, once (fast at scale, benchmarks/README.md part 2). A
    # batch then draws from those few blocks only, so shuffle the corpus once when making it (or raise the buffer).
    # block_deal: block_shuffle with each block dealt to one (rank, worker), so it is read once per epoch, not
    # once per (rank, worker) drawing from it; the order then depends on processes, workers and batch_size.
    sampler: Str = Field(
        "auto",
        description="auto (block_shuffle with a cache's features or views, else random) | "
        "block_shuffle | block_deal (each block read by one rank and worker: multi-GPU) | random",
    )
    block_rows: Int = Field(1024, description="rows per block; a multiple of the cache's HDF5 chunk rows")
    shuffle_buffer_blocks: Int = Field(16, description="blocks shuffled together (each worker keeps them in memory)")
    # domain-balanced draws (distill/data/samplers.py DomainBalance); an epoch stays as many draws as usable rows
    domain_balance: Float = Field(
        1.0,
        description="draw domain d with probability proportional to n_d^ALPHA, rows "
        "within a domain uniformly: 1 = proportional (the plain order), 0 = uniform over "
        "domains; needs data.domain_column",
    )
    domain_column: Str = Field(
        "domain",
        description="corpus column naming each row's domain (data.domain_balance, "
        "rows_per_domain in log.jsonl, scope: domain loss terms)",
    )
    bad_features: Str = Field(
        "stop",
        description="damaged teacher rows: stop (name them) | skip (train the row "
        "without that teacher, counted in the log)",
    )
    # streamed corpora (shard URLs, pipe:): each (rank, worker) reads whole shards in order
    # (distill/data/stream_data.py)
    stream_buffer: Int = Field(
        1000,
        description="streamed shards: shuffle buffer in rows (each worker keeps up to "
        "twice this many encoded images read ahead)",
    )
    shard_attempts: Int = Field(3, description="streamed shards: tries per shard before training stops naming it")

    @model_validator(mode="after")
    def _valid(self) -> DataCfg:
        check(self.batch_size > 0, "data.batch_size must be > 0")
        check(
            self.micro_batch_size is None or 0 < self.micro_batch_size <= self.batch_size,
            f"data.micro_batch_size must be in [1, data.batch_size={self.batch_size}] or null (off), "
            f"got {self.micro_batch_size}",
        )
        check(self.num_workers >= 0, "data.num_workers must be >= 0")
        check(self.sampler in SAMPLERS, f"data.sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        check(self.decode in ("worker", "device"), f"data.decode must be worker or device, got {self.decode!r}")
        check(self.block_rows > 0, f"data.block_rows must be > 0, got {self.block_rows}")
        check(self.max_pixels >= 0, f"data.max_pixels must be >= 0 (0: PIL's own limit), got {self.max_pixels}")
        check(
            self.shuffle_buffer_blocks > 0, f"data.shuffle_buffer_blocks must be > 0, got {self.shuffle_buffer_blocks}"
        )
        check(
            self.stream_buffer >= 1 and self.shard_attempts >= 1,
            f"data.stream_buffer and data.shard_attempts must be >= 1, got {self.stream_buffer} and "
            f"{self.shard_attempts}",
        )
        check(
            self.bad_features in ("stop", "skip"),
            f"data.bad_features must be 'stop' or 'skip', got {self.bad_features!r}",
        )
        check(
            0.0 <= self.domain_balance <= 1.0,
            f"data.domain_balance must be in [0, 1] (1: proportional, 0: uniform over domains), got "
            f"{self.domain_balance}",
        )
        check(bool(self.domain_column.strip()), "data.domain_column must name a corpus column, got an empty name")
        lo, hi = self.crop_scale
        check(0.0 < lo <= hi <= 1.0, f"data.crop_scale must be 0 < lo <= hi <= 1, got {self.crop_scale}")
        return self

    def check_views(self, views) -> None:
        """Refuse data.flip / data.crop_scale set against the stored views the student is shown (`views`: the
        cache's `cache.build.views.ViewDist`, None when no views are used), which would otherwise be silently ignored.

        Only values other than the defaults count: a default is the student's own crops, which views replace
        (and a config written back whole, as a launcher's copy is, marks every key as set, so "set" cannot be
        the test); a value that agrees with the views (crop_scale equal to their scale, flip true exactly when
        they flip) is kept."""
        if views is None:
            return
        bad, default = [], type(self).model_fields
        if self.flip != default["flip"].default and self.flip != (views.flip_p > 0):
            bad.append(f"data.flip={str(self.flip).lower()}")
        if tuple(self.crop_scale) != tuple(default["crop_scale"].default) and any(
            abs(a - b) > 1e-6 for a, b in zip(self.crop_scale, views.scale)
        ):
            bad.append(f"data.crop_scale=[{self.crop_scale[0]:g}, {self.crop_scale[1]:g}]")
        if bad:
            keys = " and ".join(k.split("=")[0] for k in bad)
            raise ConfigError(
                f"{' and '.join(bad)} contradict{'s' * (len(bad) == 1)} the cache's stored views, "
                f"which the student is shown (data.use_views=true): {views.describe()}; remove "
                f"{keys} from the config (the views decide), or set data.use_views=false to train "
                f"on the student's own crops"
            )


class LossCfg(Section):
    where = "loss"
    terms: tuple[LossTermCfg, ...] = Field((), description="empty: the mode's default terms (DEFAULT_TERMS)")
    teachers: dict[Str, Float] | None = Field(
        None, description="teacher -> weight; null: every cached teacher, equal weights"
    )
    combine: CombineCfg = Field(default_factory=CombineCfg, description="how teachers combine")
    routing: RoutingCfg | None = Field(
        None, description="per-sample teacher routing from a corpus column; null: every row, every teacher"
    )

    @model_validator(mode="after")
    def _valid(self) -> LossCfg:
        for t, w in (self.teachers or {}).items():
            check(w >= 0, f"loss.teachers.{t} must be >= 0, got {w}")
        check(
            not self.teachers or any(w > 0 for w in self.teachers.values()),
            "loss.teachers: every weight is 0; give one teacher a weight > 0",
        )
        labels = [t.label for t in self.terms]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        check(not dup, f"loss.terms: duplicate term names {dup}; give each a distinct name:")
        return self


class OptimCfg(Section):
    where = "optim"
    lr: Float = Field(5e-4, description="peak learning rate (BiomedCLIP)")
    weight_decay: Float = Field(0.2, description="AdamW decay; never on gains, biases or the logit scale")
    betas: tuple[Float, Float] = Field((0.9, 0.98), description="AdamW betas")
    eps: Float = Field(1e-6, description="AdamW epsilon")
    warmup_steps: Int = Field(2000, description="linear warmup, in optimizer steps")
    schedule: Str = Field("cosine", description="cosine | constant (after warmup)")
    min_lr: Float = Field(0.0, description="cosine floor")
    max_grad_norm: Float | None = Field(None, description="clip gradients to this norm (null: no clipping)")
    logit_scale_max: Float = Field(100.0, description="clamp exp(logit_scale) at this (CLIP: 100)")
    fused: Str = Field(
        "auto", description="fused AdamW kernel: auto (on when training on CUDA with float params) | on | off"
    )

    @model_validator(mode="after")
    def _valid(self) -> OptimCfg:
        check(self.lr > 0, "optim.lr must be > 0")
        check(0 <= self.min_lr <= self.lr, "optim.min_lr must be in [0, optim.lr]")
        check(self.weight_decay >= 0, "optim.weight_decay must be >= 0")
        check(self.warmup_steps >= 0, "optim.warmup_steps must be >= 0")
        check(self.schedule in SCHEDULES, f"optim.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        check(self.logit_scale_max > 1, "optim.logit_scale_max must be > 1")
        check(self.fused in FUSED, f"optim.fused must be one of {FUSED}, got {self.fused!r}")
        return self


class TrainCfg(Section):
    where = "train"
    output_dir: Str = Field("runs/default", description="checkpoints, logs, student/ and run_meta.json go here")
    max_steps: Int | None = Field(None, description="optimizer steps; null: train for `epochs` epochs")
    epochs: Int = Field(1, description="passes over the corpus (when max_steps is null)")
    seed: Int = Field(0, description="initialisation, data order and teacher draws")
    mixed_precision: Str = Field("no", description="no | bf16 | fp16 (Accelerator handles autocast and scaler)")
    grad_accum: Int = Field(1, description="micro-batches per optimizer step (ignored with batch_schedule)")
    batch_schedule: tuple[tuple[Int, Int], ...] = Field(
        (), description="[[start_epoch, global_batch], ...]: BiomedCLIP's ramp"
    )
    checkpoint_every: Int = Field(1000, description="optimizer steps between checkpoints (0: only the final one)")
    keep_last: Int = Field(3, description="checkpoints kept on disk")
    resume: Str = Field("auto", description="auto (newest checkpoint in output_dir) | none | PATH to a checkpoint")
    log_every: Int = Field(10, description="optimizer steps between log.jsonl lines")
    tensorboard: Bool = Field(True, description="also log to OUTPUT_DIR/tb when tensorboard is installed")
    compile: Bool = Field(
        False,
        description="torch.compile the model through Accelerate (inductor): faster steps "
        "on a GPU after a compile of a minute or more; false: eager",
    )
    threads: Int | None = Field(
        None,
        description="torch threads per process; null: OMP_NUM_THREADS, else usable cores // processes on this node",
    )
    ema: EmaCfg | None = Field(None, description="an EMA of the student's weights (null: none); see train.ema.*")
    eval: TrainEvalCfg | None = Field(None, description="distill eval tasks during training (null: none)")

    @model_validator(mode="after")
    def _valid(self) -> TrainCfg:
        check(self.max_steps is None or self.max_steps > 0, "train.max_steps must be > 0 (or null)")
        check(self.epochs > 0, "train.epochs must be > 0")
        check(
            self.mixed_precision in PRECISIONS,
            f"train.mixed_precision must be one of {PRECISIONS}, got {self.mixed_precision!r}",
        )
        check(self.grad_accum > 0, "train.grad_accum must be > 0")
        check(self.checkpoint_every >= 0, "train.checkpoint_every must be >= 0")
        check(self.keep_last > 0, "train.keep_last must be > 0")
        check(self.log_every > 0, "train.log_every must be > 0")
        check(self.threads is None or self.threads > 0, f"train.threads must be > 0 (or null), got {self.threads}")
        check(bool(self.resume), "train.resume must be auto, none or a checkpoint path")
        if self.batch_schedule:
            epochs = [e for e, _ in self.batch_schedule]
            check(epochs[0] == 0, "train.batch_schedule must start at epoch 0, e.g. [[0, 4096], [8, 65536]]")
            check(epochs == sorted(set(epochs)), "train.batch_schedule epochs must be strictly increasing")
            check(all(b > 0 for _, b in self.batch_schedule), "train.batch_schedule batch sizes must be > 0")
        return self


class Config(Section):
    mode: Str = Field("hybrid", description="contrastive (InfoNCE only) | distill (teacher terms only) | hybrid")
    student: StudentCfg = Field(default_factory=StudentCfg, description="the student model")
    data: DataCfg = Field(default_factory=DataCfg, description="corpus, cache and data loading")
    loss: LossCfg = Field(default_factory=LossCfg, description="loss terms, teachers, combination, routing")
    optim: OptimCfg = Field(default_factory=OptimCfg, description="AdamW and the learning-rate schedule")
    train: TrainCfg = Field(default_factory=TrainCfg, description="the loop: steps, checkpoints, logging")

    @model_validator(mode="after")
    def _valid(self, info: ValidationInfo) -> Config:
        check(self.mode in MODES, f"mode must be one of {MODES}, got {self.mode!r}")
        check(bool(self.data.corpus), "data.corpus is required: the corpus file (CSV/TSV/JSONL) or shards")
        if self.mode != "contrastive":
            check(
                self.data.features is not None,
                f"mode={self.mode} needs data.features: build a cache with `distill cache --data CORPUS "
                f"--teacher NAME=SPEC --out FEATURES.h5` and set data.features=FEATURES.h5 "
                f"(or use mode=contrastive, which needs no cache)",
            )
        uses = {t.label: t.static_uses_teachers if static(info) else t.uses_teachers for t in self.loss.terms}
        if None in uses.values():  # a plug-in's term, before torch is imported: checked by the full validation
            return self
        if self.mode == "contrastive":
            check(
                not self.loss.teachers,
                "mode=contrastive uses no teachers, but loss.teachers is set; use mode=hybrid or remove loss.teachers",
            )
            bad = [n for n, u in uses.items() if u]
            check(
                not bad,
                f"mode=contrastive trains with InfoNCE only, but loss.terms has teacher terms {bad}; "
                f"use mode=hybrid (both) or mode=distill (teacher terms only)",
            )
            check(
                self.loss.routing is None,
                "mode=contrastive uses no teachers, but loss.routing is set; use mode=hybrid or remove loss.routing",
            )
        elif self.mode == "distill":
            bad = [n for n, u in uses.items() if not u]
            check(
                not bad,
                f"mode=distill uses teacher terms only, but loss.terms has {bad}; "
                f"use mode=hybrid for InfoNCE plus distillation",
            )
        elif uses:
            check(
                any(uses.values()) and not all(uses.values()),
                f"mode=hybrid needs a teacher-free term (infonce) and at least one teacher term; loss.terms "
                f"has {[t.kind for t in self.loss.terms]}",
            )
        return self

    @property
    def terms(self) -> tuple[LossTermCfg, ...]:
        """loss.terms, or the mode's default terms when it is empty."""
        return self.loss.terms or default_terms(self.mode)

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: object, overrides: Sequence[str] = (), static: bool = False) -> Config:
        """Build from a plain dict (as YAML gives) after applying `section.key=value` overrides. `static`: check
        without importing torch (loss terms by kind name only; see distill.config.terms), before the full check."""
        d = plain(d or {})
        if not isinstance(d, dict):
            raise ConfigError(f"a config must be a mapping of sections, got {type(d).__name__}")
        list_defaults = {("loss", "terms"): lambda: [dict(t) for t in DEFAULT_TERMS.get(d.get("mode", "hybrid"), ())]}
        for item in overrides:
            apply_override(cls, d, item, list_defaults)
        try:
            return cls.model_validate(d, context={"static": static})
        except ValidationError as e:
            raise config_error(e, cls) from None

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: Sequence[str] = (), static: bool = False) -> Config:
        path = Path(path)
        text = read_config_text(path)  # a missing, non-regular, oversized or binary file: one line
        try:
            d = load_yaml(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        try:
            return cls.from_dict(d, overrides, static)
        except ConfigError as e:
            raise type(e)(f"{path}: {e}") from None

    @classmethod
    def from_argv(cls, argv: Sequence[str], static: bool = False) -> Config:
        """`--config PATH [section.key=value ...]` without argparse (`distill train --help` lists the keys)."""
        path, overrides = split_argv(argv)
        return cls.from_yaml(path, overrides, static)

    def to_dict(self) -> dict:
        """Plain, YAML/JSON-safe dict (tuples become lists); `from_dict(to_dict())` round-trips."""
        return plain(self.model_dump())
