"""`train.ema`: an exponential moving average of the student's weights, kept beside the run."""

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
