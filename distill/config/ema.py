"""`train.ema` (an exponential moving average of the student's weights) and `train.eval` (evaluation during
training): what a run keeps and checks of its student besides its checkpoints."""

from __future__ import annotations

import math

from pydantic import Field, model_validator

from teachers.kernel.config_model import Float, Int, Section, Str

EMA_DEVICES = ("model", "cpu")


class EmaCfg(Section):
    """ema_t = decay x ema_(t-1) + (1 - decay) x weights_t after every `every`-th optimizer step from step `start`
    (before it the average is the weights themselves). Saved with every checkpoint and resumed exactly; `distill
    export --ema` exports it."""

    where = "train.ema"
    decay: Float = Field(0.9999, description="weight of the old average per update (0 < decay < 1)")
    every: Int = Field(1, description="optimizer steps between updates")
    start: Int = Field(0, description="optimizer step from which weights are averaged (before: copied)")
    device: Str = Field("model", description="where the average lives: model (the weights' device) or cpu")

    @model_validator(mode="after")
    def _valid(self) -> EmaCfg:
        if not (math.isfinite(self.decay) and 0 < self.decay < 1):
            raise ValueError(f"train.ema.decay must be between 0 and 1 (exclusive), got {self.decay!r}")
        if self.every < 1:
            raise ValueError(f"train.ema.every must be at least 1, got {self.every}")
        if self.start < 0:
            raise ValueError(f"train.ema.start must be >= 0, got {self.start}")
        if self.device not in EMA_DEVICES:
            raise ValueError(f"train.ema.device {self.device!r} is unknown; use one of {', '.join(EMA_DEVICES)}")
        return self


class TrainEvalCfg(Section):
    """`train.eval`: `distill eval`'s tasks run on the student (and its EMA) during training, every `every` optimizer
    steps and at the end; each time `OUTPUT_DIR/eval.jsonl` gets a line of headline metrics and
    `OUTPUT_DIR/eval/step-N/` the full report."""

    where = "train.eval"
    tasks: tuple[Str, ...] = Field(description="built-in task names or task YAML files (as distill eval --task)")
    every: Int = Field(0, description="optimizer steps between evaluations (0: only at the end)")
    max_samples: Int | None = Field(None, description="cap every split of every task (quick looks)")
    device: Str = Field("auto", description="cpu | cuda | cuda:N | auto")
    bootstrap: Int = Field(0, description="bootstrap resamples for the intervals of eval/step-N/ (0: none, fast)")

    @model_validator(mode="after")
    def _valid(self) -> TrainEvalCfg:
        if not self.tasks:
            raise ValueError("train.eval.tasks must name at least one task (a built-in name or a task .yaml)")
        if self.every < 0:
            raise ValueError(f"train.eval.every must be >= 0 (0: only at the end), got {self.every}")
        if self.bootstrap < 0:
            raise ValueError(f"train.eval.bootstrap must be >= 0, got {self.bootstrap}")
        return self
