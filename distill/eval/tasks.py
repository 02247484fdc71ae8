"""Task definitions: a small YAML file per task, validated into frozen dataclasses.

A task names a dataset (CSV, MedMNIST .npz or a folder per class), its class names and prompt templates, and
what to measure (`kind`: zeroshot | retrieval | linear_probe | finetune). Unknown keys are errors naming the file
and the known keys (configs never silently ignore a typo). Built-in tasks live in `distill/tasks/*.yaml`; their
dataset paths are relative to the data root (`$BIOMED_DISTILL_DATA`, default `../shared/data` beside the
current directory); a user's task file resolves relative paths against its own folder.

Example::

    name: pneumoniamnist-zeroshot
    kind: zeroshot
    dataset: {path: medmnist/pneumoniamnist.npz, max_samples: 512}
    classes: [normal lungs, pneumonia]
    templates: ["a chest x-ray showing {}.", "a chest radiograph with {}."]
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

KINDS = ("zeroshot", "retrieval", "linear_probe", "finetune")
FORMATS = ("auto", "csv", "npz", "folder")
SPLIT_ROLES = ("train", "val", "test")
DATA_ENV = "BIOMED_DISTILL_DATA"


class TaskError(ValueError):
    """A task file or its dataset is invalid; the message names the file and what to fix."""


@dataclass(frozen=True)
class DatasetCfg:
    """Where the samples are and how to read them."""

    path: str                                   # CSV, .npz or folder; relative to the data root / task file
    format: str = "auto"                        # csv | npz | folder; auto = from the suffix
    image_column: str = "image"                 # CSV: image path relative to the CSV's folder
    label_column: str = "label"                 # CSV: class index, class name or label value ("A|B" multi-label)
    label_columns: tuple[str, ...] = ()         # CSV multi-hot columns (one per class, 0/1) instead of label_column
    label_separator: str = "|"                  # CSV multi-label separator inside label_column
    caption_column: str = "caption"             # CSV: text for retrieval
    split_column: str | None = None             # CSV: column whose value names each row's split
    splits: dict = field(default_factory=lambda: {r: r for r in SPLIT_ROLES})  # role -> name in the source
    split_fractions: tuple[float, ...] = ()     # (train, val, test) seeded random split of a source without splits
    max_samples: int | None = None              # per split: a seeded random subset (keeps CI fast)
    seed: int = 0                               # for split_fractions and max_samples

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"dataset.format {self.format!r} is not one of {', '.join(FORMATS)}")
        unknown = set(self.splits) - set(SPLIT_ROLES)
        if unknown:
            raise ValueError(f"dataset.splits: unknown role(s) {sorted(unknown)}; roles are {', '.join(SPLIT_ROLES)}")
        if self.split_fractions:
            if len(self.split_fractions) != 3 or any(f < 0 for f in self.split_fractions) or not (
                    0.999 < sum(self.split_fractions) < 1.001):
                raise ValueError(f"dataset.split_fractions {list(self.split_fractions)} must be three "
                                 "non-negative fractions (train, val, test) summing to 1")
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError(f"dataset.max_samples must be >= 1, got {self.max_samples}")


@dataclass(frozen=True)
class ProbeCfg:
    """Linear probe: multinomial logistic regression on frozen image features."""

    shots: tuple[int, ...] = (1, 2, 4, 8, 16)   # few-shot settings (k training images per class), seeded
    full: bool = True                           # also train on the whole train split
    l2_grid: tuple[float, ...] = (1e-6, 1e-4, 1e-3, 1e-2, 1e-1)  # L2 strengths; the best on val is kept
    max_iter: int = 200                         # L-BFGS iterations per fit

    def __post_init__(self):
        if any(k < 1 for k in self.shots) or not self.l2_grid or any(l < 0 for l in self.l2_grid):
            raise ValueError("linear_probe: shots must be >= 1 and l2_grid a non-empty list of values >= 0")


@dataclass(frozen=True)
class FinetuneCfg:
    """Full fine-tuning of the image encoder with a linear head (the comparative BiomedCLIP study)."""

    epochs: int = 3
    batch_size: int = 32
    lr_encoder: float = 1e-5                    # differential learning rates: small for the pretrained tower
    lr_head: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 0
    amp: bool = True                            # autocast (bf16/fp16) on GPU; ignored on CPU
    flip: bool = True                           # random horizontal flips while training
    max_steps: int | None = None                # stop early (tests, smoke runs)

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1 or self.lr_encoder < 0 or self.lr_head <= 0:
            raise ValueError("finetune: epochs and batch_size must be >= 1, lr_encoder >= 0, lr_head > 0")


@dataclass(frozen=True)
class TaskCfg:
    """One evaluation task. `classes` are both the prompt names and the label order."""

    name: str
    kind: str
    dataset: DatasetCfg
    classes: tuple[str, ...] = ()               # class names in label-index order (used in prompts)
    label_values: tuple[str, ...] = ()          # raw label strings in the data, same order (default: classes)
    templates: tuple[str, ...] = ("{}",)        # prompt templates with one "{}"; the ensemble is averaged
    multilabel: bool = False
    linear_probe: ProbeCfg = field(default_factory=ProbeCfg)
    finetune: FinetuneCfg = field(default_factory=FinetuneCfg)
    description: str = ""
    source: str = "<memory>"                    # the YAML file it came from (errors name it)
    root: str = "."                             # folder relative dataset paths resolve against

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.kind != "retrieval" and len(self.classes) < 2:
            raise ValueError(f"a {self.kind} task needs 'classes' (at least two class names)")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"duplicate class names in 'classes': {list(self.classes)}")
        if self.label_values and len(self.label_values) != len(self.classes):
            raise ValueError(f"label_values has {len(self.label_values)} entries but classes has {len(self.classes)}")
        if self.dataset.label_columns and len(self.dataset.label_columns) != len(self.classes):
            raise ValueError("dataset.label_columns needs one column per class "
                             f"({len(self.dataset.label_columns)} given, {len(self.classes)} classes)")
        if self.dataset.label_columns and not self.multilabel:
            raise ValueError("dataset.label_columns (multi-hot) needs multilabel: true")
        if self.kind == "zeroshot":
            bad = [t for t in self.templates if t.count("{}") != 1]
            if not self.templates or bad:
                raise ValueError(f"templates must each contain one '{{}}' for the class name; bad: {bad}")

    @property
    def dataset_path(self) -> Path:
        p = Path(os.path.expanduser(self.dataset.path))
        return p if p.is_absolute() else Path(self.root) / p

    @property
    def label_names(self) -> tuple[str, ...]:
        return self.label_values or self.classes

    def needs_roles(self) -> tuple[str, ...]:
        return ("test",) if self.kind in ("zeroshot", "retrieval") else SPLIT_ROLES


# -- validation: dict -> dataclass, unknown keys named ---------------------------------------------------
def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Check `value` against the annotation `tp` (the few types task files use) and convert lists to tuples."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {type(value).__name__}")
        return _build(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        return _coerce(next(a for a in args if a is not type(None)), value, where)
    if origin is tuple:
        if isinstance(value, (str, int, float)):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {type(value).__name__}")
        inner = typing.get_args(tp)[0]
        return tuple(_coerce(inner, v, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {type(value).__name__}")
        return {str(k): str(v) for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ValueError(f"{where}: expected text, got {value!r}")
        return str(value)
    return value


def _build(cls, data: dict, where: str):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name not in ("source", "root")]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ValueError(f"unknown key {where + '.' if where else ''}{unknown[0]!r}; known keys: {', '.join(names)}")
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [k for k in required if k not in data]
    if missing:
        raise ValueError(f"missing required key {where + '.' if where else ''}{missing[0]!r}")
    kwargs = {k: _coerce(hints[k], v, f"{where + '.' if where else ''}{k}") for k, v in data.items()}
    return cls(**kwargs)


def task_from_dict(data: dict, source: str = "<memory>", root: str | os.PathLike = ".") -> TaskCfg:
    """Validate a task mapping; every error is a TaskError naming `source`."""
    if not isinstance(data, dict):
        raise TaskError(f"{source}: a task file must be a YAML mapping, got {type(data).__name__}")
    try:
        task = _build(TaskCfg, data, "")
    except (ValueError, TypeError) as e:
        raise TaskError(f"{source}: {e}") from None
    return dataclasses.replace(task, source=str(source), root=str(root))


# -- built-ins and lookup --------------------------------------------------------------------------------
def data_root() -> Path:
    """`$BIOMED_DISTILL_DATA`, else `../shared/data` beside the current directory."""
    env = os.environ.get(DATA_ENV)
    return Path(env).expanduser() if env else (Path.cwd().parent / "shared" / "data")


def _builtin_dir():
    return resources.files("distill") / "tasks"


def list_tasks() -> list[str]:
    """Names of the built-in tasks."""
    return sorted(p.name[:-5] for p in _builtin_dir().iterdir() if p.name.endswith(".yaml"))


def load_task(name_or_path: str, max_samples: int | None = None) -> TaskCfg:
    """A built-in task by name, or a task YAML file by path; `max_samples` caps every split."""
    p = Path(os.path.expanduser(name_or_path))
    if p.suffix in (".yaml", ".yml") or p.is_file():
        if not p.is_file():
            raise TaskError(f"task file {p} not found")
        text, source, root = p.read_text(), str(p), p.resolve().parent
    else:
        res = _builtin_dir() / f"{name_or_path}.yaml"
        if not res.is_file():
            import difflib

            close = difflib.get_close_matches(name_or_path, list_tasks(), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise TaskError(f"unknown task {name_or_path!r}{hint} (built-in: {', '.join(list_tasks())}; "
                            "or give a path to a task .yaml file)")
        text, source, root = res.read_text(), f"built-in task {name_or_path} ({res})", data_root()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise TaskError(f"{source}: not valid YAML ({e})") from None
    task = task_from_dict(data, source=source, root=root)
    if max_samples is not None:  # a cap: the smaller of the file's and the caller's
        cap = min(max_samples, task.dataset.max_samples or max_samples)
        task = dataclasses.replace(task, dataset=dataclasses.replace(task.dataset, max_samples=cap))
    return task
