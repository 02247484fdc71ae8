"""What `distill eval` is asked to do (`EvalJob`), and where a task named on its command line lives.

Why here, torch-free: `distill eval` validates its command line (models, baselines, task names) before torch is
imported, and `distill.eval` imports torch with its evaluators. `distill.eval` re-exports both.
"""

from __future__ import annotations

import difflib
import os
import sys
from importlib import resources

if sys.version_info >= (3, 11):
    from importlib.resources.abc import Traversable
else:  # Python 3.10
    from importlib.abc import Traversable
from pathlib import Path

from pydantic import Field, model_validator

from teachers.kernel.config_model import Bool, ConfigError, Int, Section, Str

__all__ = ["EvalJob", "TaskError", "find_task", "list_tasks", "builtin_task_dir", "DEVICES"]

DEVICES = ("cpu", "cuda", "auto")  # --device's choices (the API also takes cuda:N)


class TaskError(ConfigError):
    """A task file or its dataset is invalid; the message names the file and what to fix."""


def builtin_task_dir() -> Traversable:
    return resources.files("distill") / "tasks"


def list_tasks() -> list[str]:
    """Names of the built-in tasks."""
    return sorted(p.name[:-5] for p in builtin_task_dir().iterdir() if p.name.endswith(".yaml"))


def find_task(name_or_path: str) -> tuple[Path | Traversable, bool]:
    """(the task's YAML file, whether it is built in): a path to a .yaml file, else a built-in task's name;
    TaskError naming a missing file, or an unknown name with close matches."""
    p = Path(os.path.expanduser(name_or_path))
    if p.suffix in (".yaml", ".yml") or p.is_file():
        if not p.is_file():
            raise TaskError(f"task file {p} not found")
        return p, False
    res = builtin_task_dir() / f"{name_or_path}.yaml"
    if not res.is_file():
        close = difflib.get_close_matches(name_or_path, list_tasks(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise TaskError(
            f"unknown task {name_or_path!r}{hint} (built-in: {', '.join(list_tasks())}; "
            "or give a path to a task .yaml file)"
        )
    return res, True


class EvalJob(Section):
    """What `distill eval` asks for. Every model is loaded with `teachers.load_teacher`. The field descriptions
    are the flags' help, the defaults the flags' defaults (`distill.cli`)."""

    models: dict[Str, Str] = Field(
        description="NAME -> SPEC: the student, teachers and baselines alike (any open_clip or HF CLIP)"
    )
    tasks: tuple[Str, ...] = Field(description="built-in task name or task YAML file")
    out: Str = Field(description="REPORT_DIR (report.json, report.md, PNG charts)")
    device: Str = Field("auto", description="cpu | cuda | cuda:N | auto")
    batch_size: Int = Field(64, description="images per forward pass")
    num_workers: Int = Field(0, description="DataLoader workers decoding images")
    bootstrap: Int = Field(1000, description="bootstrap resamples for the 95% CIs (0: none)")
    seed: Int = Field(0, description="seed of the bootstrap resamples and of the probes")
    student: Str | None = Field(
        None,
        description="which --model is the student (default: the first model "
        "written by distill export, else the first --model that is not a baseline)",
    )
    baselines: tuple[Str, ...] = Field(
        (),
        description="a --model to compare the student with on its own, not as "
        "a teacher (repeatable); report.json gives student minus each baseline with "
        "its interval and a verdict",
    )
    max_samples: Int | None = Field(None, description="cap every split of every task (quick looks, CI)")
    cache_dir: Str | None = Field(None, description="keep image embeddings on disk here and reuse them across runs")
    trust_remote_code: Bool = Field(False, description="let hub models run their repo's own code")

    @model_validator(mode="after")
    def _check(self) -> EvalJob:
        if not self.models:
            raise ValueError("eval needs at least one --model NAME=SPEC")
        if not self.tasks:
            raise ValueError("eval needs at least one --task (a built-in name or a task .yaml file)")
        if self.student is not None and self.student not in self.models:
            raise ValueError(f"student {self.student!r} is not one of the models ({', '.join(self.models)})")
        for b in self.baselines:
            if b not in self.models:
                raise ValueError(
                    f"baseline {b!r} is not one of the models ({', '.join(self.models)}); "
                    "give it with --model NAME=SPEC as well"
                )
            if b == self.student:
                raise ValueError(f"{b!r} is the student; a baseline must be another model")
        if len(set(self.baselines)) != len(self.baselines):
            raise ValueError(f"a baseline is given twice: {list(self.baselines)}")
        if set(self.baselines) >= set(self.models):
            raise ValueError("every model is a baseline; one --model must be the student")
        if self.bootstrap < 0 or self.batch_size < 1:
            raise ValueError("bootstrap must be >= 0 and batch_size >= 1")
        if self.num_workers < 0 or (self.max_samples is not None and self.max_samples < 1):
            raise ValueError("num_workers must be >= 0 and max_samples >= 1 (or not given)")
        for task in self.tasks:  # a missing file or unknown name answers now, before any model or dataset
            find_task(task)
        return self
