"""The run folder's metadata files, one schema for the writer (`distill.train`, `distill.training.checkpoint`) and the
reader (`student.export`, for the model card): `RUN/run_meta.json` and `RUN/checkpoint-STEP/train_state.json`, and
where the run's weightless student lives (`student_config_dir`).

Why here: `student` may not import `distill`, but `distill` may import `student`, so the one definition both sides
use lives below both. Unknown fields are refused (a file written by another version), missing ones take defaults.
The run_meta.json records are validated models on the kernel's base (`Record`); `TrainState` stays a plain
dataclass because the training loop updates it in place.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from pydantic import Field

from teachers.kernel.config_model import ConfigError, Section

RUN_META_FILE = "run_meta.json"
TRAIN_STATE_FILE = "train_state.json"
# The run's weightless student (open_clip config, text config, tokenizer) that `distill export` fills with a
# checkpoint's weights. Not `student/`: beside a real export named `student/` (the demo's layout) that read as a
# second, usable model.
STUDENT_CONFIG_DIR = "student-config"
OLD_STUDENT_CONFIG_DIR = "student"  # what runs made before the rename hold


def student_config_dir(run: str | Path) -> Path:
    """`RUN/student-config`, or `RUN/student` for a run made before the rename that has only that."""
    new, old = Path(run) / STUDENT_CONFIG_DIR, Path(run) / OLD_STUDENT_CONFIG_DIR
    return old if not new.exists() and (old / "open_clip_config.json").is_file() else new


def _known(cls: Any, data: Any, path: Path) -> dict[str, Any]:
    """`data` as constructor keywords of `cls` (a dataclass or a Record); ValueError naming the file on anything
    unknown."""
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    names = set(cls.model_fields) if issubclass(cls, Section) else {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(
            f"{path}: unknown field(s) {', '.join(map(repr, unknown))} for {cls.__name__}; written by "
            "another version of biomed-distill? Export it with that version"
        )
    return data


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); the file is damaged") from e


@dataclass
class TrainState:
    """Where training is: counts optimizer steps, epochs and the batches already consumed in this epoch."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch
    batches_in_epoch: int = 0  # micro-batches of this epoch already consumed (per process)
    samples_seen: int = 0  # global samples consumed by finished optimizer steps
    last_losses: dict[str, float] = field(default_factory=dict)  # mean of each loss term over the last log window
    micro_step: int = 0  # accelerate's micro-batch counter (which micro-batch syncs gradients) at the save

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, d: dict) -> None:
        known = {f.name for f in fields(self)}
        for k, v in d.items():
            if k not in known:
                raise KeyError(f"checkpoint train state has unknown field {k!r}: written by another version?")
            setattr(self, k, v)


def write_train_state(ckpt: str | Path, state: TrainState) -> Path:
    path = Path(ckpt) / TRAIN_STATE_FILE
    path.write_text(json.dumps(state.state_dict(), indent=2) + "\n")
    return path


def read_train_state(ckpt: str | Path) -> TrainState:
    """`ckpt/train_state.json`; FileNotFoundError when absent (an unfinished checkpoint), ValueError when damaged."""
    path = Path(ckpt) / TRAIN_STATE_FILE
    return TrainState(**_known(TrainState, _read_json(path), path))


class Record(Section):
    """A record of a run file: frozen, unknown fields refused; values as training computed them (numpy numbers
    taken as numbers), so the field types are plain, not the config's strict ones."""


class TeacherRecord(Record):
    """One teacher of a run, as its cache described it."""

    weight: float | None = None  # the teacher's weight in the distillation loss
    embed_dim: int | None = None
    spec: str | None = None  # the SPEC it was cached from
    logit_scale: float | None = None


class CorpusRecord(Record):
    path: str | None = None
    size: int | None = None  # pairs in the corpus
    rows_used: int | None = None  # pairs training draws from (after routing and held-out rows)
    fingerprint: str | None = None


class RunMeta(Record):
    """What a run was trained from: teachers, corpus, student, loss and the resolved config."""

    mode: str | None = None
    student: str | None = None  # the preset or SPEC the student was built from
    teachers: dict[str, TeacherRecord] = Field(default_factory=dict)
    student_dir: str | None = None
    corpus: CorpusRecord = Field(default_factory=CorpusRecord)
    features: str | None = None
    loss: str | None = None  # the loss formula, e.g. "Loss = 1.0 * infonce + 3.0 * affinity"
    total_steps: int | None = None
    num_processes: int | None = None
    global_batch_epoch0: int | None = None
    routing: dict[str, Any] | None = None
    # which pixels the student saw, so a report can say whether student and baseline saw the same augmentation:
    # true: the cache's stored views (hybrid/distill with data.use_views, or replayed by mode=contrastive)
    stored_views: bool | None = None
    augmentation: str | None = None  # one line, e.g. "stored views of F.h5: 4 per image (seed 0): scale 0.5-1, ..."
    resumed_from: str | None = None
    config: dict[str, Any] = Field(default_factory=dict)  # the resolved config, as `distill train` read it


def write_run_meta(run: str | Path, meta: RunMeta) -> Path:
    path = Path(run) / RUN_META_FILE
    path.write_text(json.dumps(meta.model_dump(mode="json"), indent=2) + "\n")
    return path


def read_run_meta(run: str | Path) -> RunMeta | None:
    """`run/run_meta.json`, or None when the run has none; ValueError naming the file when it is damaged."""
    path = Path(run) / RUN_META_FILE
    if not path.is_file():
        return None
    data = _known(RunMeta, _read_json(path), path)
    for t in data.get("teachers", {}).values():
        _known(TeacherRecord, t, path)
    _known(CorpusRecord, data.get("corpus") or {}, path)
    try:
        return RunMeta(**{**data, "corpus": data.get("corpus") or {}})
    except ConfigError as e:
        raise ValueError(f"{path}: {e}; the file is damaged or written by another version") from None
