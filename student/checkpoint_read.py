"""Reading a training run's checkpoint: which `checkpoint-STEP/` folder, its step, its weights as a state dict."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import torch
from accelerate.utils import merge_fsdp_weights
from safetensors.torch import load_file

from student.run_files import STUDENT_CONFIG_DIR, TRAIN_STATE_FILE, read_train_state, student_config_dir

EMA_FILE = "ema.safetensors"  # train.ema's average, `student.*` keys like model.safetensors (distill.training.ema)
CONFIG_NAME = "open_clip_config.json"  # the student's open_clip config, in RUN/student/ and in an export
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def checkpoint_step(ckpt: Path) -> int:
    """The step recorded in the checkpoint, else the number in its folder name (an unfinished checkpoint)."""
    try:
        return read_train_state(ckpt).step
    except (FileNotFoundError, ValueError):
        m = re.search(r"(\d+)$", ckpt.name)
        return int(m.group(1)) if m else -1


FSDP_SHARDS = "pytorch_model_fsdp_0"  # Accelerate's sharded (SHARDED_STATE_DICT) model folder


def weights_file(folder: Path) -> Path | None:
    """The model weights of a checkpoint folder (safetensors, a pickle of tensors, FSDP shards), or None."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    if (folder / FSDP_SHARDS).is_dir():
        return folder / FSDP_SHARDS
    return None


def resolve_checkpoint(checkpoint: str | Path) -> tuple[Path, Path]:
    """(checkpoint folder, run folder) for a `checkpoint-STEP/` folder or a run folder (its newest checkpoint)."""
    path = Path(checkpoint)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} not found (give RUN/checkpoint-STEP or a run folder)")
    if weights_file(path):
        ckpt = path
    else:
        # checkpoint-STEP folders with weights (not a `.tmp` still being written); finished ones
        # (train_state.json present) win over unfinished ones, then the highest step
        cands = [
            d for d in path.iterdir() if d.is_dir() and re.fullmatch(r"checkpoint-\d+", d.name) and weights_file(d)
        ]
        if not cands:
            if re.fullmatch(r"checkpoint-\d+(\.tmp)?", path.name) or (path / TRAIN_STATE_FILE).is_file():
                raise FileNotFoundError(
                    f"{path / 'model.safetensors'} is missing: {path} is an incomplete checkpoint; "
                    f"export another checkpoint-STEP folder (or the run folder for the newest)"
                )
            raise FileNotFoundError(
                f"{path} holds neither model.safetensors nor checkpoint-STEP/ folders with one; "
                f"give a checkpoint folder or a run folder"
            )
        ckpt = max(cands, key=lambda d: ((d / TRAIN_STATE_FILE).is_file(), checkpoint_step(d)))
    run = ckpt.parent
    if not (student_config_dir(run) / CONFIG_NAME).is_file():
        raise FileNotFoundError(
            f"{student_config_dir(run) / CONFIG_NAME} not found: the run folder of {ckpt} must "
            f"hold the {STUDENT_CONFIG_DIR}/ folder written by distill train"
        )
    return ckpt, run


def load_training_state(ckpt: Path) -> dict[str, torch.Tensor]:
    """The trained module's state dict from a checkpoint folder, with wrapper prefixes removed.

    Nothing is unpickled beyond plain tensors; a damaged or refused file raises ValueError naming it.
    """
    f = weights_file(ckpt)
    if f is None:
        raise FileNotFoundError(f"{ckpt / 'model.safetensors'} is missing: {ckpt} is not a complete checkpoint")
    try:
        sd = _read_weights(f)
    except Exception as e:  # SafetensorError, UnpicklingError (a refused pickle), truncated files
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(
            f"{f} cannot be read ({type(e).__name__}: {first}); it is damaged, truncated or holds "
            f"more than plain tensors; export another checkpoint"
        ) from e
    clean = {}
    for k, v in sd.items():
        while k.startswith(_WRAPPER_PREFIXES):
            k = k.split(".", 1)[1]
        clean[k] = v
    return clean


def _read_weights(f: Path) -> dict[str, torch.Tensor]:
    if f.name == FSDP_SHARDS:  # an FSDP run: merge the shards as `accelerate merge-weights` does
        with tempfile.TemporaryDirectory() as tmp:
            merge_fsdp_weights(str(f), tmp, safe_serialization=True)
            sd = load_file(str(Path(tmp) / "model.safetensors"))
    elif f.suffix == ".safetensors":
        sd = load_file(str(f))
    else:
        sd = torch.load(f, map_location="cpu", weights_only=True)
    return sd


def load_ema_state(ckpt: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's weights with its EMA (`ema.safetensors`) in place of the averaged parameters."""
    sd = load_training_state(ckpt)
    f = ckpt / EMA_FILE
    if not f.is_file():
        raise FileNotFoundError(f"{f} is missing: {ckpt} was trained without train.ema; export it without --ema")
    try:
        average = load_file(str(f))
    except Exception as e:  # SafetensorError: truncated or not safetensors
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{f} cannot be read ({first}); export another checkpoint, or without --ema") from e
    unknown = sorted(k for k in average if k not in sd or sd[k].shape != average[k].shape)
    if unknown:
        raise ValueError(f"{f} does not match {ckpt}'s weights (e.g. {unknown[0]!r}); export without --ema")
    return {**sd, **{k: v.to(sd[k].dtype) for k, v in average.items()}}


def average_states(states: list[tuple[Path, dict[str, torch.Tensor]]]) -> dict[str, torch.Tensor]:
    """The mean of compatible state dicts (same keys and shapes; summed in float64, cast back); other dtypes (int
    buffers) must be equal and are kept. A mismatch raises ValueError naming both checkpoints."""
    (first_path, first), rest = states[0], states[1:]
    for path, sd in rest:
        if sd.keys() != first.keys():
            diff = sorted(sd.keys() ^ first.keys())
            raise ValueError(
                f"{path} does not match {first_path}: {len(diff)} weight(s) not in both (e.g. {diff[0]!r}); "
                "average checkpoints of one student architecture"
            )
        for k, v in sd.items():
            if v.shape != first[k].shape or (not v.is_floating_point() and not torch.equal(v, first[k])):
                raise ValueError(f"{path} does not match {first_path} at {k!r}; average checkpoints of one student")
    out = {}
    for k, v in first.items():
        if v.is_floating_point():
            total = torch.zeros_like(v, dtype=torch.float64)
            for _, sd in states:
                total += sd[k].double()
            out[k] = (total / len(states)).to(v.dtype)
        else:
            out[k] = v
    return out
