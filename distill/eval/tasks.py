"""Task definitions: a small YAML file per task, validated into frozen pydantic models.

A task names a dataset (CSV, MedMNIST .npz or a folder per class), its class names and prompt templates, and
what to measure (`kind`: a registered task kind, see `kinds.py`). The models share the training config's base
(`teachers/kernel/config_model.py`): the whole file is validated when it is loaded, and an error is one line naming
the file and the key, with a did-you-mean for an unknown key (configs never silently ignore a typo). Task files may be
loose where YAML makes strictness a trap: a number where text is expected (`label_values: [0, 1]`), one value
where a list is expected (`templates: "a photo of {}."`), a numeric string for a float (`lr_head: 1e-3`).
Built-in tasks live in `distill/tasks/*.yaml`; their dataset paths are relative to the data root
(`$BIOMED_DISTILL_DATA`, default `../shared/data` beside the current directory); a user's task file resolves
relative paths against its own folder.

Example::

    name: pneumoniamnist-zeroshot
    kind: zeroshot
    dataset: {path: medmnist/pneumoniamnist.npz, max_samples: 512}
    classes: [normal lungs, pneumonia]
    templates: ["a chest x-ray showing {}.", "a chest radiograph with {}."]
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, cast

import yaml
from pydantic import BeforeValidator, Field, PrivateAttr, Strict, ValidationError, field_validator, model_validator

from cache.sources.corpus import DATA_FORMATS  # importing it registers the built-in formats
from cache.sources.shard_io import is_stream_spec
from distill.config.eval_job import TaskError, find_task, list_tasks  # noqa: F401  (re-exported)
from distill.eval.kinds import EVALUATORS, SPLIT_ROLES, TaskKind
from teachers.kernel.bounded_yaml import load_yaml
from teachers.kernel.config_model import Bool, ConfigError, Float, Int, Section, config_error, unknown_name

DATA_ENV = "BIOMED_DISTILL_DATA"


# -- the looser field types of task files ----------------------------------------------------------------
def _number_as_text(v: Any) -> Any:
    return str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v


def _one_as_list(v: Any) -> Any:
    return [v] if isinstance(v, (str, int, float)) else v


Text = Annotated[str, Strict(), BeforeValidator(_number_as_text)]  # YAML reads `label_values: [0, 1]` as ints
Texts = Annotated[tuple[Text, ...], BeforeValidator(_one_as_list)]
Ints = Annotated[tuple[Int, ...], BeforeValidator(_one_as_list)]
Floats = Annotated[tuple[Float, ...], BeforeValidator(_one_as_list)]


def _must(ok: bool, msg: str) -> None:
    if not ok:
        raise ValueError(msg)


class DatasetCfg(Section):
    """Where the samples are and how to read them."""

    where = "dataset"
    path: Text = Field(
        description="CSV, .npz or folder; relative to the data root / task file; or WebDataset "
        "shards (.tar, a brace pattern, or a URL / pipe: command, read as a stream)"
    )
    format: Text = Field(
        "auto", description="csv | tsv | npz | folder | webdataset | any registered format; auto = from the path"
    )
    image_column: Text = Field("image", description="CSV: image path relative to the CSV's folder")
    label_column: Text = Field("label", description="CSV: class index, class name or label value ('A|B' multi-label)")
    label_columns: Texts = Field((), description="CSV multi-hot columns (one per class, 0/1) instead of label_column")
    label_separator: Text = Field("|", description="CSV multi-label separator inside label_column")
    caption_column: Text = Field("caption", description="CSV: text for retrieval")
    split_column: Text | None = Field(None, description="CSV: column whose value names each row's split")
    splits: dict[Text, Text] = Field(
        default_factory=lambda: {r: r for r in SPLIT_ROLES},
        description="role (train, val, test) -> its name in the source",
    )
    split_fractions: Floats = Field((), description="(train, val, test) seeded random split of a source without splits")
    max_samples: Int | None = Field(None, description="per split: a seeded random subset (keeps CI fast)")
    seed: Int = Field(0, description="for split_fractions and max_samples")

    @field_validator("format")
    @classmethod
    def _format(cls, v: str) -> str:
        known = ["auto", *DATA_FORMATS.list()]  # every registered format (cache.sources.formats), plug-ins too
        _must(v == "auto" or v in DATA_FORMATS, f"must be one of {', '.join(known)}, got {v!r}")
        return v

    @field_validator("splits")
    @classmethod
    def _splits(cls, v: dict) -> dict:
        unknown = set(v) - set(SPLIT_ROLES)
        _must(not unknown, f"unknown role(s) {sorted(unknown)}; roles are {', '.join(SPLIT_ROLES)}")
        return v

    @field_validator("split_fractions")
    @classmethod
    def _fractions(cls, v: tuple) -> tuple:
        _must(
            not v or (len(v) == 3 and all(f >= 0 for f in v) and 0.999 < sum(v) < 1.001),
            f"must be three non-negative fractions (train, val, test) summing to 1, got {list(v)}",
        )
        return v

    @field_validator("max_samples")
    @classmethod
    def _max_samples(cls, v: int | None) -> int | None:
        _must(v is None or v >= 1, f"must be >= 1, got {v}")
        return v


class ProbeCfg(Section):
    """Linear probe: multinomial logistic regression on frozen image features."""

    where = "linear_probe"
    shots: Ints = Field((1, 2, 4, 8, 16), description="few-shot settings (k training images per class), seeded")
    full: Bool = Field(True, description="also train on the whole train split")
    l2_grid: Floats = Field((1e-6, 1e-4, 1e-3, 1e-2, 1e-1), description="L2 strengths; the best on val is kept")
    max_iter: Int = Field(200, description="L-BFGS iterations per fit")

    @field_validator("shots")
    @classmethod
    def _shots(cls, v: tuple) -> tuple:
        _must(all(k >= 1 for k in v), f"must each be >= 1, got {list(v)}")
        return v

    @field_validator("l2_grid")
    @classmethod
    def _l2_grid(cls, v: tuple) -> tuple:
        _must(bool(v) and all(x >= 0 for x in v), f"must be a non-empty list of values >= 0, got {list(v)}")
        return v


class FinetuneCfg(Section):
    """Full fine-tuning of the image encoder with a linear head (the comparative BiomedCLIP study)."""

    where = "finetune"
    epochs: Int = Field(3, description=">= 1")
    batch_size: Int = Field(32, description=">= 1")
    lr_encoder: Float = Field(1e-5, description="differential learning rates: small for the pretrained tower")
    lr_head: Float = Field(1e-3, description="> 0")
    weight_decay: Float = 0.01
    warmup_steps: Int = 0
    amp: Bool = Field(True, description="autocast (bf16/fp16) on GPU; ignored on CPU")
    flip: Bool = Field(True, description="random horizontal flips while training")
    max_steps: Int | None = Field(None, description="stop early (tests, smoke runs)")

    @model_validator(mode="after")
    def _valid(self) -> FinetuneCfg:
        _must(self.epochs >= 1, f"finetune.epochs must be >= 1, got {self.epochs}")
        _must(self.batch_size >= 1, f"finetune.batch_size must be >= 1, got {self.batch_size}")
        _must(self.lr_encoder >= 0, f"finetune.lr_encoder must be >= 0, got {self.lr_encoder}")
        _must(self.lr_head > 0, f"finetune.lr_head must be > 0, got {self.lr_head}")
        return self


class TaskCfg(Section):
    """One evaluation task. `classes` are both the prompt names and the label order.

    `source` (the file it came from, named by errors) and `root` (the folder relative dataset paths resolve
    against) are set by the loader, never by the file: see `located`.
    """

    name: Text
    kind: Text = Field(description="a registered task kind: zeroshot | retrieval | linear_probe | finetune")
    dataset: DatasetCfg
    classes: Texts = Field((), description="class names in label-index order (used in prompts)")
    label_values: Texts = Field((), description="raw label strings in the data, same order (default: classes)")
    templates: Texts = Field(("{}",), description="prompt templates with one '{}'; the ensemble is averaged")
    multilabel: Bool = False
    linear_probe: ProbeCfg = Field(default_factory=ProbeCfg)
    finetune: FinetuneCfg = Field(default_factory=FinetuneCfg)
    description: Text = ""
    _source: str = PrivateAttr("<memory>")
    _root: str = PrivateAttr(".")

    @field_validator("kind")
    @classmethod
    def _kind(cls, v: str) -> str:
        try:
            EVALUATORS.get(v)
        except KeyError as e:
            raise unknown_name(e.args[0]) from None
        return v

    @field_validator("classes")
    @classmethod
    def _classes(cls, v: tuple) -> tuple:
        _must(len(set(v)) == len(v), f"duplicate class names {[c for i, c in enumerate(v) if c in v[:i]]}")
        return v

    @model_validator(mode="after")
    def _valid(self) -> TaskCfg:
        spec, n = self.spec, len(self.classes)
        _must(not spec.needs_classes or n >= 2, f"a {self.kind} task needs 'classes' (at least two class names)")
        _must(
            not self.label_values or len(self.label_values) == n,
            f"label_values has {len(self.label_values)} entries but classes has {n}",
        )
        cols = self.dataset.label_columns
        _must(
            not cols or len(cols) == n,
            f"dataset.label_columns needs one column per class ({len(cols)} given, {n} classes)",
        )
        _must(not cols or self.multilabel, "dataset.label_columns (multi-hot) needs multilabel: true")
        if spec.uses_templates:
            bad = [t for t in self.templates if t.count("{}") != 1]
            _must(
                bool(self.templates) and not bad,
                f"templates must each contain one '{{}}' for the class name; bad: {bad}",
            )
        return self

    def located(self, source: str | os.PathLike, root: str | os.PathLike) -> TaskCfg:
        """A copy that names `source` in errors and resolves relative dataset paths against `root`."""
        task = self.model_copy()
        task._source, task._root = str(source), str(root)
        return task

    @property
    def source(self) -> str:
        return self._source

    @property
    def root(self) -> str:
        return self._root

    @property
    def spec(self) -> TaskKind:
        """The registered kind: its evaluator and what it needs."""
        return EVALUATORS.get(self.kind)

    @property
    def dataset_path(self) -> Path | str:
        """The dataset's file or folder; shard URLs and pipe: commands as written (a Path would mangle them)."""
        if is_stream_spec(self.dataset.path):
            return self.dataset.path
        p = Path(os.path.expanduser(self.dataset.path))
        return p if p.is_absolute() else Path(self.root) / p

    @property
    def label_names(self) -> tuple[str, ...]:
        return self.label_values or self.classes

    def needs_roles(self) -> tuple[str, ...]:
        return self.spec.roles


def task_from_dict(data: Any, source: str = "<memory>", root: str | os.PathLike = ".") -> TaskCfg:
    """Validate a task mapping; every error is a one-line TaskError naming `source` and the key."""
    if not isinstance(data, dict):
        raise TaskError(f"{source}: a task file must be a YAML mapping, got {type(data).__name__}")
    try:
        task = TaskCfg.model_validate(data)
    except ValidationError as e:
        msg = str(config_error(e, TaskCfg))
        raise TaskError(f"{source}: {msg.replace('config is missing', 'the task is missing', 1)}") from None
    return task.located(source, root)


# -- built-ins and lookup --------------------------------------------------------------------------------
def data_root() -> Path:
    """`$BIOMED_DISTILL_DATA`, else `../shared/data` beside the current directory."""
    env = os.environ.get(DATA_ENV)
    return Path(env).expanduser() if env else (Path.cwd().parent / "shared" / "data")


def load_task(name_or_path: str, max_samples: int | None = None) -> TaskCfg:
    """A built-in task by name, or a task YAML file by path; `max_samples` caps every split."""
    path, builtin = find_task(name_or_path)  # TaskError: a missing file, an unknown name
    if builtin:
        text, source, root = path.read_text(), f"built-in task {name_or_path} ({path})", data_root()
    else:
        # find_task gives a filesystem Path for a task file (a Traversable only for a built-in task)
        text, source, root = path.read_text(), str(path), cast(Path, path).resolve().parent
    try:
        data = load_yaml(text)
    except yaml.YAMLError as e:
        raise TaskError(f"{source}: not valid YAML ({e})") from None
    task = task_from_dict(data, source=source, root=root)
    if max_samples is not None:  # a cap: the smaller of the file's and the caller's
        cap = min(max_samples, task.dataset.max_samples or max_samples)
        try:
            dataset = DatasetCfg(**{**dict(task.dataset), "max_samples": cap})
        except ConfigError as e:
            raise TaskError(f"{source}: {e}") from None
        task = task.model_copy(update={"dataset": dataset})
    return task
