"""Training configuration: frozen dataclasses built from YAML plus `section.key=value` overrides.

Why so strict: a typo in a long-running job's config (`optim.warmpu=500`) must fail at once, naming the key and
suggesting the close match, never be ignored (nanoGPT's configurator rule, without its `exec`). Values derived at
run time (teachers found in the cache, accumulation per epoch) live in `train.RunPlan`, never written back here.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, Union, get_args, get_origin, get_type_hints

import yaml

MODES = ("contrastive", "distill", "hybrid")
PRECISIONS = ("no", "bf16", "fp16")
SAMPLERS = ("auto", "block_shuffle", "random")
SCHEDULES = ("cosine", "constant")


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key and what to do."""


# -- sections -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StudentCfg:
    preset: str = "tiny"  # student preset (biomedclip, biomedclip-small, tiny) or a model spec
    tokenizer_dir: str | None = None  # WordPiece folder; None: the preset's own, else one trained on the corpus
    vocab_size: int = 30522  # size of the WordPiece vocabulary trained on the corpus when one is needed
    freeze_vision_blocks: int = 0  # freeze patch embedding + the first N ViT blocks
    lock_text_layers: int = 0  # freeze embeddings + the first N BERT layers
    patch_dropout: float = 0.0  # drop this fraction of image patches while training (FLIP-style speed-up)
    grad_checkpointing: bool = False  # trade compute for memory in both towers
    image_size: int | None = None  # override the preset's image size
    overrides: dict[str, Any] = field(default_factory=dict)  # extra keyword overrides for build_student

    def __post_init__(self):
        _check(self.freeze_vision_blocks >= 0, "student.freeze_vision_blocks must be >= 0")
        _check(self.lock_text_layers >= 0, "student.lock_text_layers must be >= 0")
        _check(0.0 <= self.patch_dropout < 1.0, "student.patch_dropout must be in [0, 1)")
        _check(self.vocab_size > 0, "student.vocab_size must be > 0")
        _check(self.image_size is None or self.image_size > 0, "student.image_size must be > 0")


@dataclass(frozen=True)
class DataCfg:
    corpus: str = ""  # CSV/TSV/JSONL or WebDataset corpus (DESIGN.md formats)
    features: str | None = None  # HDF5 feature cache from `distill cache` (needed by distill and hybrid)
    batch_size: int = 32  # per device; global batch = batch_size x processes x accumulation
    num_workers: int = 4  # DataLoader workers (each opens the cache lazily)
    crop_scale: tuple[float, float] = (0.9, 1.0)  # RandomResizedCrop area range (open_clip/BiomedCLIP default)
    flip: bool = False  # random horizontal flip (off: laterality matters in radiology)
    use_views: bool = True  # when the cache stores views, show the student exactly the teachers' views
    # Images over this many pixels (width x height) stop training with a message naming the row, before they are
    # decoded (a 17 KB PNG can claim 144 Mpx); 0: PIL's own limit. `distill cache --max-pixels` is the same limit.
    max_pixels: int = 64_000_000
    # Training order. block_shuffle: blocks of block_rows consecutive cache rows in random order, rows shuffled
    # within a buffer of shuffle_buffer_blocks blocks; the reader reads each block whole, once (fast at scale, see
    # benchmarks/README.md part 2). A batch then draws from those few blocks only, so shuffle the corpus once when
    # making it (or raise the buffer). random: a plain permutation (scattered reads, fine without a cache).
    # auto: block_shuffle when teacher features are read, random otherwise (contrastive).
    sampler: str = "auto"
    block_rows: int = 1024  # rows per block; a multiple of the cache's HDF5 chunk rows (`distill cache` writes 256)
    shuffle_buffer_blocks: int = 16  # blocks shuffled together (each DataLoader worker keeps this many in memory)
    # Teacher rows that are non-finite, not unit-norm or fail their checksum (a damaged cache): stop (default)
    # ends training with a message naming teacher, modality and cache rows; skip trains the row without that
    # teacher (its route entry cleared, features zeroed) and counts the skipped (teacher, row) pairs in the log.
    bad_features: str = "stop"

    def __post_init__(self):
        _check(self.batch_size > 0, "data.batch_size must be > 0")
        _check(self.num_workers >= 0, "data.num_workers must be >= 0")
        _check(self.sampler in SAMPLERS, f"data.sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        _check(self.block_rows > 0, f"data.block_rows must be > 0, got {self.block_rows}")
        _check(self.max_pixels >= 0, f"data.max_pixels must be >= 0 (0: PIL's own limit), got {self.max_pixels}")
        _check(self.shuffle_buffer_blocks > 0, f"data.shuffle_buffer_blocks must be > 0, got "
                                               f"{self.shuffle_buffer_blocks}")
        _check(self.bad_features in ("stop", "skip"), f"data.bad_features must be 'stop' or 'skip', got "
                                                      f"{self.bad_features!r}")
        lo, hi = self.crop_scale
        _check(0.0 < lo <= hi <= 1.0, f"data.crop_scale must be 0 < lo <= hi <= 1, got {self.crop_scale}")


@dataclass(frozen=True)
class LossTerm:
    """One term of the loss; becomes `distill.losses.LossTermCfg` once teachers are known."""

    kind: str  # a registered loss kind (distill.losses lists them)
    name: str | None = None  # key in logs; defaults to kind
    weight: float = 1.0
    teachers: dict[str, float] | None = None  # teacher -> weight for this term; None: loss.teachers
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra arguments of the term

    def __post_init__(self):
        _check(self.weight >= 0, f"loss term {self.label!r}: weight must be >= 0, got {self.weight}")
        for t, w in (self.teachers or {}).items():
            _check(w >= 0, f"loss term {self.label!r}: teacher {t!r} weight must be >= 0, got {w}")
        from distill.losses import LOSSES, build_term

        if self.kind in LOSSES:  # an unknown kind is reported by Config with close matches
            try:  # options are checked now, not when the run is built: e.g. kwargs.positives must be known
                build_term(self.label, self.kind, self.kwargs)
            except ValueError as e:
                raise ConfigError(f"loss.terms: {e}") from None

    @property
    def label(self) -> str:
        return self.name or self.kind


@dataclass(frozen=True)
class CombineSpec:
    mode: str = "weighted_sum"  # weighted_sum (every teacher) | random_teacher (one random teacher per sample)
    # | confidence (per sample, weight_t * p_it^(1/temperature), p_it = teacher t's own confidence in pair i)
    drop_prob: float = 0.0  # randomly drop a teacher's term with this probability
    balance: str = "none"  # none | phi_s (standardise each teacher with its cache statistics, PHI-S)
    temperature: float = 1.0  # confidence mode: > 0; lower sharpens the weights towards the most confident teacher

    def __post_init__(self):
        from distill.losses.types import BALANCE_MODES, COMBINE_MODES

        _check(self.mode in COMBINE_MODES, f"loss.combine.mode must be one of {COMBINE_MODES}, got {self.mode!r}")
        _check(self.balance in BALANCE_MODES,
               f"loss.combine.balance must be one of {BALANCE_MODES}, got {self.balance!r}")
        _check(0.0 <= self.drop_prob < 1.0, f"loss.combine.drop_prob must be in [0, 1), got {self.drop_prob}")
        _check(self.temperature > 0 and self.temperature != float("inf"),
               f"loss.combine.temperature must be a finite number > 0, got {self.temperature}")


@dataclass(frozen=True)
class RoutingCfg:
    """Per-sample teacher routing: which teachers distil which corpus rows, from a corpus column.

    With `teachers`: the column's value picks the row's teachers (`default` for values not in the map).
    Without: the cell itself lists teacher names separated by `separator` (`default` for empty cells).
    A row routed to no teacher gets only the teacher-free terms (infonce).
    """

    column: str  # a column of the CSV/TSV/JSONL corpus (any name besides image, caption, key)
    teachers: dict[str, tuple[str, ...]] | None = None  # column value -> teacher names; None: the cell lists them
    default: tuple[str, ...] = ()  # teachers of rows whose value is not in the map (or whose cell is empty)
    separator: str = "|"  # between teacher names in a cell (when `teachers` is not given)

    def __post_init__(self):
        _check(bool(self.column and self.column.strip()), "loss.routing.column must name a corpus column")
        _check(bool(self.separator), "loss.routing.separator must be a non-empty string, e.g. '|'")
        if self.teachers is not None:
            _check(bool(self.teachers), "loss.routing.teachers must map column values to teacher lists "
                                        "(or be null: the column lists teacher names itself)")
            for value, names in self.teachers.items():
                _check(all(n.strip() for n in names),
                       f"loss.routing.teachers.{value}: teacher names must be non-empty, got {list(names)}")
        _check(all(n.strip() for n in self.default),
               f"loss.routing.default: teacher names must be non-empty, got {list(self.default)}")

    def named_teachers(self) -> list[str]:
        """Every teacher the map and the default name (the cell-listed ones are only known from the corpus)."""
        out: list[str] = []
        for names in [*(self.teachers or {}).values(), self.default]:
            out += [n for n in names if n not in out]
        return out


@dataclass(frozen=True)
class LossCfg:
    terms: tuple[LossTerm, ...] = ()  # empty: the mode's default terms (train.default_terms)
    teachers: dict[str, float] | None = None  # teacher -> weight; None: every teacher in the cache, equal weights
    combine: CombineSpec = field(default_factory=CombineSpec)
    routing: RoutingCfg | None = None  # per-sample teacher routing from a corpus column; None: every row, every teacher

    def __post_init__(self):
        for t, w in (self.teachers or {}).items():
            _check(w >= 0, f"loss.teachers.{t} must be >= 0, got {w}")
        labels = [t.label for t in self.terms]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        _check(not dup, f"loss.terms: duplicate term names {dup}; give each a distinct name:")


@dataclass(frozen=True)
class OptimCfg:
    lr: float = 5e-4  # peak learning rate (BiomedCLIP)
    weight_decay: float = 0.2  # AdamW decay; never on gains, biases or the logit scale
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 2000  # linear warmup, in optimizer steps
    schedule: str = "cosine"  # cosine | constant (after warmup)
    min_lr: float = 0.0  # cosine floor
    max_grad_norm: float | None = None  # clip gradients to this norm (None: no clipping)
    logit_scale_max: float = 100.0  # clamp exp(logit_scale) at this (CLIP: 100)

    def __post_init__(self):
        _check(self.lr > 0, "optim.lr must be > 0")
        _check(0 <= self.min_lr <= self.lr, "optim.min_lr must be in [0, optim.lr]")
        _check(self.weight_decay >= 0, "optim.weight_decay must be >= 0")
        _check(self.warmup_steps >= 0, "optim.warmup_steps must be >= 0")
        _check(self.schedule in SCHEDULES, f"optim.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        _check(self.logit_scale_max > 1, "optim.logit_scale_max must be > 1")


@dataclass(frozen=True)
class TrainCfg:
    output_dir: str = "runs/default"  # checkpoints, logs, student/ and run_meta.json go here
    max_steps: int | None = None  # optimizer steps; None: train for `epochs` epochs
    epochs: int = 1
    seed: int = 0
    mixed_precision: str = "no"  # no | bf16 | fp16 (Accelerator handles the autocast and scaler)
    grad_accum: int = 1  # micro-batches per optimizer step (ignored when batch_schedule is set)
    batch_schedule: tuple[tuple[int, int], ...] = ()  # ((start_epoch, global_batch), ...): BiomedCLIP's ramp
    checkpoint_every: int = 1000  # optimizer steps between checkpoints (0: only the final one)
    keep_last: int = 3  # checkpoints kept on disk
    resume: str = "auto"  # auto (newest checkpoint in output_dir, if any) | none | PATH to a checkpoint
    log_every: int = 10  # optimizer steps between log.jsonl lines
    tensorboard: bool = True  # also log to OUTPUT_DIR/tb when tensorboard is installed
    threads: int | None = None  # torch intra-op threads per process; None: OMP_NUM_THREADS if set, else
    #                             usable cores // processes on this node (at least 1)

    def __post_init__(self):
        _check(self.max_steps is None or self.max_steps > 0, "train.max_steps must be > 0 (or null)")
        _check(self.epochs > 0, "train.epochs must be > 0")
        _check(self.mixed_precision in PRECISIONS,
               f"train.mixed_precision must be one of {PRECISIONS}, got {self.mixed_precision!r}")
        _check(self.grad_accum > 0, "train.grad_accum must be > 0")
        _check(self.checkpoint_every >= 0, "train.checkpoint_every must be >= 0")
        _check(self.keep_last > 0, "train.keep_last must be > 0")
        _check(self.log_every > 0, "train.log_every must be > 0")
        _check(self.threads is None or self.threads > 0, f"train.threads must be > 0 (or null), got {self.threads}")
        _check(bool(self.resume), "train.resume must be auto, none or a checkpoint path")
        if self.batch_schedule:
            epochs = [e for e, _ in self.batch_schedule]
            _check(epochs[0] == 0, "train.batch_schedule must start at epoch 0, e.g. [[0, 4096], [8, 65536]]")
            _check(epochs == sorted(set(epochs)), "train.batch_schedule epochs must be strictly increasing")
            _check(all(b > 0 for _, b in self.batch_schedule), "train.batch_schedule batch sizes must be > 0")


@dataclass(frozen=True)
class Config:
    mode: str = "hybrid"  # contrastive (InfoNCE only) | distill (teacher terms only) | hybrid (both)
    student: StudentCfg = field(default_factory=StudentCfg)
    data: DataCfg = field(default_factory=DataCfg)
    loss: LossCfg = field(default_factory=LossCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    train: TrainCfg = field(default_factory=TrainCfg)

    def __post_init__(self):
        _check(self.mode in MODES, f"mode must be one of {MODES}, got {self.mode!r}")
        _check(bool(self.data.corpus), "data.corpus is required: the corpus file (CSV/TSV/JSONL) or shards")
        if self.mode != "contrastive":
            _check(self.data.features is not None,
                   f"mode={self.mode} needs data.features: build a cache with `distill cache --data CORPUS "
                   f"--teacher NAME=SPEC --out FEATURES.h5` and set data.features=FEATURES.h5 "
                   f"(or use mode=contrastive, which needs no cache)")
        uses = {t.label: _uses_teachers(t.kind) for t in self.loss.terms}
        if self.mode == "contrastive":
            _check(not self.loss.teachers, "mode=contrastive uses no teachers, but loss.teachers is set; "
                                           "use mode=hybrid or remove loss.teachers")
            bad = [n for n, u in uses.items() if u]
            _check(not bad, f"mode=contrastive trains with InfoNCE only, but loss.terms has teacher terms {bad}; "
                            f"use mode=hybrid (both) or mode=distill (teacher terms only)")
            _check(self.loss.routing is None, "mode=contrastive uses no teachers, but loss.routing is set; "
                                              "use mode=hybrid or remove loss.routing")
        elif self.mode == "distill":
            bad = [n for n, u in uses.items() if not u]
            _check(not bad, f"mode=distill uses teacher terms only, but loss.terms has {bad}; "
                            f"use mode=hybrid for InfoNCE plus distillation")
        elif uses:
            _check(any(uses.values()) and not all(uses.values()),
                   f"mode=hybrid needs a teacher-free term (infonce) and at least one teacher term; loss.terms "
                   f"has {[t.kind for t in self.loss.terms]}")

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict, overrides: Sequence[str] = ()) -> "Config":
        """Build from a plain dict (as YAML gives) after applying `section.key=value` overrides."""
        d = _deepcopy_plain(d or {})
        if not isinstance(d, dict):
            raise ConfigError(f"a config must be a mapping of sections, got {type(d).__name__}")
        for item in overrides:
            _apply_override(cls, d, item)
        return _build(cls, d, "")

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: Sequence[str] = ()) -> "Config":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            d = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        try:
            return cls.from_dict(d, overrides)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    @classmethod
    def from_argv(cls, argv: Sequence[str]) -> "Config":
        """`--config PATH [section.key=value ...]` without argparse (only distill/cli.py imports it)."""
        argv, path, overrides = list(argv), None, []
        i = 0
        while i < len(argv):
            a = argv[i]
            if a == "--config" and i + 1 < len(argv):
                path, i = argv[i + 1], i + 2
                continue
            if a.startswith("--config="):
                path = a.split("=", 1)[1]
            elif a.startswith("-"):
                raise ConfigError(f"unknown option {a!r}; usage: --config CONFIG.yaml [section.key=value ...]")
            else:
                overrides.append(a)
            i += 1
        if path is None:
            raise ConfigError("missing --config CONFIG.yaml (usage: --config CONFIG.yaml [section.key=value ...])")
        return cls.from_yaml(path, overrides)

    def to_dict(self) -> dict:
        """Plain, YAML/JSON-safe dict (tuples become lists); `from_dict(to_dict())` round-trips."""
        return _plain(dataclasses.asdict(self))


# -- helpers -------------------------------------------------------------------------------------------
def _uses_teachers(kind: str) -> bool:
    """Whether a loss kind needs cached teacher features (unknown kinds fail with close matches)."""
    from distill.losses import LOSSES

    try:
        return bool(LOSSES.get(kind).uses_teachers)
    except KeyError as e:
        raise ConfigError(f"loss.terms: {e.args[0]}") from None


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _deepcopy_plain(x: Any) -> Any:
    return _plain(x)


def _tname(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _unknown_key(key: str, known: Sequence[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(known), n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return ConfigError(f"unknown key {where + key!r}{hint} (known keys here: {', '.join(known)})")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotated type `tp` and convert YAML shapes (lists -> tuples, dicts -> dataclasses)."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1 and isinstance(value, dict) and (
                dataclasses.is_dataclass(options[0]) or get_origin(options[0]) is dict):
            return _coerce(value, options[0], where)  # an optional mapping: its own message names the inner key
        for a in options:
            try:
                return _coerce(value, a, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where} must be {_tname(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, where + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 5e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin is tuple:
        if isinstance(value, (list, tuple)):
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
            if len(value) != len(args):
                raise ConfigError(f"{where} must have {len(args)} items ({_tname(tp)}), got {value!r}")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    elif origin is dict:
        if isinstance(value, dict):
            kt, vt = args
            return {_coerce(k, kt, f"{where} key"): _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    else:  # pragma: no cover - a field type this module does not handle is a bug here
        raise TypeError(f"config field {where} has unsupported type {tp}")
    raise ConfigError(f"{where} must be {_tname(tp)}, got {value!r} ({type(value).__name__})")


def _build(cls: type, d: dict, where: str):
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in d.items():
        if key not in names:
            raise _unknown_key(str(key), names, where)
        kwargs[key] = _coerce(value, hints[key], where + key)
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where.rstrip('.') or 'config'} is missing required key(s): {', '.join(missing)}")
    return cls(**kwargs)


def _field_type(cls: type, path: list[str], item: str) -> Any:
    """Type of the field at `path` (dataclass fields, then free keys below a dict field)."""
    tp: Any = cls
    for i, key in enumerate(path):
        while get_origin(tp) in (Union, types.UnionType):  # Optional[dict] / Optional[dataclass]
            tp = next(a for a in get_args(tp) if a is not type(None))
        if dataclasses.is_dataclass(tp):
            hints = get_type_hints(tp)
            if key not in hints:
                err = _unknown_key(key, list(hints), ".".join(path[:i]) + "." if i else "")
                raise ConfigError(f"override {item!r}: {err}")
            tp = hints[key]
        elif get_origin(tp) is dict:
            tp = get_args(tp)[1]
        elif tp is Any:  # free-form nested mappings (student.overrides.text_config.x)
            continue
        else:
            raise ConfigError(f"override {item!r}: {'.'.join(path[:i])} is not a section ({_tname(tp)}), "
                              f"it has no key {key!r}")
    return tp


def _apply_override(cls: type, d: dict, item: str) -> None:
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r} must look like section.key=value (e.g. train.max_steps=100)")
    path = key.split(".")
    tp = _field_type(cls, path, item)
    text_types = (str, Union[str, None])
    if tp in text_types and raw.strip().lower() not in ("null", "~", "none"):
        value: Any = raw
    else:
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {e}") from None
    try:
        _coerce(value, tp, key)  # type-check now, so the message names the override
    except ConfigError as e:
        raise ConfigError(f"override {item!r}: {e}") from None
    node = d
    for k in path[:-1]:
        if not isinstance(node.get(k), dict):
            node[k] = {}
        node = node[k]
    node[path[-1]] = value
