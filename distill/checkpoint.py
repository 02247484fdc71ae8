"""Checkpoints: the `TrainState` counters, `checkpoint-STEP/` folders written atomically, finding one to resume.

Why a registered TrainState: the step, epoch and position inside the epoch come back from the checkpoint itself
(accelerate's `register_for_checkpointing`), never from parsing folder names (accelerate's complete_nlp_example
gets that wrong). Folder names only order the candidates; `train_state.json` marks a finished checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

PREFIX = "checkpoint-"
STATE_FILE = "train_state.json"


@dataclass
class TrainState:
    """Where training is: counts optimizer steps, epochs and the batches already consumed in this epoch."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch
    batches_in_epoch: int = 0  # micro-batches of this epoch already consumed (per process)
    samples_seen: int = 0  # global samples consumed by finished optimizer steps
    last_losses: dict[str, float] = field(default_factory=dict)

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, d: dict) -> None:
        for k, v in d.items():
            if not hasattr(self, k):
                raise KeyError(f"checkpoint train state has unknown field {k!r}: written by another version?")
            setattr(self, k, v)


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f"{PREFIX}{step}"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Finished checkpoints (those with train_state.json), oldest first by the step recorded inside them."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = []
    for d in out.glob(f"{PREFIX}*"):
        f = d / STATE_FILE
        if d.is_dir() and f.is_file():
            try:
                found.append((int(json.loads(f.read_text())["step"]), d))
            except (ValueError, KeyError, json.JSONDecodeError):
                continue  # a damaged marker: not a finished checkpoint
    return [d for _, d in sorted(found)]


def resolve_resume(resume: str, output_dir: str | Path) -> Path | None:
    """The checkpoint to resume from: `auto` = newest finished one (or None), `none` = None, else a path.

    `none` refuses an output_dir that already holds checkpoints: a fresh run there would overwrite the old run's
    log and tokenizer, and pruning to `keep_last` by step would delete the new run's lower-numbered checkpoints.
    """
    if resume == "none":
        found = list_checkpoints(output_dir)
        if found:
            raise ValueError(f"train.resume=none, but {output_dir} already holds {', '.join(d.name for d in found)} "
                             "from an earlier run; choose a new train.output_dir, delete that folder, or continue "
                             "it with train.resume=auto")
        return None
    if resume == "auto":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"train.resume={resume}: {path / STATE_FILE} not found; give a finished "
                                f"{PREFIX}STEP folder, `auto` or `none`")
    found = [d.resolve() for d in list_checkpoints(output_dir)]  # oldest first, by recorded step
    if path.resolve() in found:
        newer = found[found.index(path.resolve()) + 1:]
        if newer:  # the new trajectory's checkpoints would mix with the old ones and be pruned first
            raise ValueError(f"train.resume={resume}: {output_dir} also holds newer "
                             f"{', '.join(d.name for d in newer)} from the run being rewound; move them away, or "
                             "resume into a new train.output_dir")
    return path


def install_unwrapped_state_hooks(accelerator) -> None:
    """Store model weights under their own keys (`student.*`, `heads.*`), never DDP's `module.` prefix.

    Why: the export reads model.safetensors and must not care how many processes trained it.
    """
    def save_hook(models, weights, output_dir):
        if len(weights) == len(models):
            for i, m in enumerate(models):
                weights[i] = accelerator.unwrap_model(m).state_dict()

    def load_hook(models, input_dir):
        from safetensors.torch import load_file

        for i in reversed(range(len(models))):
            name = "model.safetensors" if i == 0 else f"model_{i}.safetensors"
            f = Path(input_dir) / name
            if f.is_file():
                accelerator.unwrap_model(models[i]).load_state_dict(load_file(str(f), device="cpu"))
                models.pop(i)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(accelerator, output_dir: str | Path, state: TrainState, keep_last: int) -> Path:
    """save_state into `checkpoint-STEP.tmp`, add train_state.json, rename, prune to the newest `keep_last`."""
    final = checkpoint_dir(output_dir, state.step)
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(state.state_dict(), indent=2) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final
