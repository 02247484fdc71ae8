"""`train.ema`: an exponential moving average of the student's weights, saved with every checkpoint.

Why float32 and on the main process only: under DDP every process holds the same weights, so one average is enough
and the others spend no memory on it; a float32 copy keeps small updates (1 - decay = 1e-4) that bf16 weights would
round away. It is written as `ema.safetensors` beside `model.safetensors`, with the same `student.*` keys, so that
`distill export --ema` reads it in place of the weights, and a resumed run restores it bit for bit.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from distill.config.ema import EmaCfg
from distill.training.checkpoint import CheckpointError
from student.checkpoint_read import EMA_FILE

log = logging.getLogger(__name__)
PREFIX = "student."  # the keys of the training module's state dict that the export reads


class Ema:
    """The average of the floating-point parameters of `student` (the open_clip model inside the training module)."""

    def __init__(self, cfg: EmaCfg, student: torch.nn.Module):
        self.cfg = cfg
        self.params = {n: p for n, p in student.named_parameters() if p.is_floating_point()}
        device = torch.device("cpu") if cfg.device == "cpu" else None
        self.average = {n: p.detach().to(device=device, dtype=torch.float32, copy=True) for n, p in self.params.items()}

    @torch.no_grad()
    def update(self, step: int) -> None:
        """After optimizer step `step` (1, 2, ...): copy the weights before `start`, then average every `every`."""
        names = list(self.params)
        weights = [self.params[n].detach().to(self.average[n].device, torch.float32) for n in names]
        averages = [self.average[n] for n in names]
        if step <= self.cfg.start:
            torch._foreach_copy_(averages, weights)
        elif (step - self.cfg.start) % self.cfg.every == 0:
            torch._foreach_lerp_(averages, weights, 1.0 - self.cfg.decay)  # a + (1 - decay) (w - a)

    def save(self, folder: Path, step: int) -> Path:
        path = Path(folder) / EMA_FILE
        tensors = {PREFIX + n: a.detach().cpu().contiguous() for n, a in self.average.items()}
        meta = {
            "step": str(step),
            "decay": repr(self.cfg.decay),
            "every": str(self.cfg.every),
            "start": str(self.cfg.start),
        }
        save_file(tensors, str(path), metadata=meta)
        return path

    def load(self, folder: Path) -> bool:
        """Restore the average from a checkpoint; False (with a warning) when it has none: the average restarts
        from the current weights."""
        path = Path(folder) / EMA_FILE
        if not path.is_file():
            log.warning(
                "%s has no %s (written without train.ema): the average starts again from the resumed weights",
                folder,
                EMA_FILE,
            )
            for n, p in self.params.items():
                self.average[n].copy_(p.detach())
            return False
        want = {PREFIX + n for n in self.average}
        try:
            with safe_open(str(path), framework="pt") as f:
                keys = set(f.keys())
                if keys != want:
                    raise ValueError(f"its keys differ from this student's ({len(keys ^ want)} not shared)")
                for n, a in self.average.items():
                    a.copy_(f.get_tensor(PREFIX + n))
        except (SafetensorError, ValueError, RuntimeError) as e:
            raise CheckpointError(
                f"{path} does not fit this run ({str(e).splitlines()[0]}); resume from another checkpoint "
                "(train.resume=PATH) or remove train.ema"
            ) from e
        return True
