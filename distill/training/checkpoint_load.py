"""Resuming a checkpoint without unpickling anything that could run code.

Why: accelerate's `load_state` unpickles `custom_checkpoint_N.pkl` with weights_only=False, and a refused file
ends in a raw traceback. Here every file is read by us: `train_state.json` (counters), `model.safetensors`,
`optimizer.bin` / `scheduler.bin` / `scaler.pt` with `torch.load(weights_only=True)`, and `rng_state_RANK.safetensors`
(distill.training.rng_state). `custom_checkpoint_*.pkl` and accelerate's `random_states_*.pkl` are never opened.
A refused, damaged or missing file raises CheckpointError naming it. FSDP checkpoints go through accelerate's
`load_fsdp_model`/`load_fsdp_optimizer` (torch.distributed.checkpoint), with DCP's two pickle readers (the
`.metadata` file and non-tensor values) replaced, for the duration of the load, by allow-listed ones.
"""

from __future__ import annotations

import io
import logging
import pickle
import re
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import load_fsdp_model, load_fsdp_optimizer
from safetensors.torch import load_file

from distill.training.checkpoint import (
    FSDP_MODEL_DIR,
    FSDP_OPTIMIZER_DIR,
    MODEL_FILE,
    OPTIMIZER_FILE,
    SCHEDULER_FILE,
    CheckpointError,
    TrainState,
    why_unusable,
)
from distill.training.rng_state import load_rng_state, rng_file

log = logging.getLogger(__name__)

SCALER_FILE = "scaler.pt"
_WHAT_TO_DO = "resume from another checkpoint (train.resume=PATH) or delete this checkpoint folder"


def _first_line(e: BaseException) -> str:
    text = str(e)
    # weights_only's refusal: "Unsupported global: GLOBAL m.f was not an allowed global" or "Trying to load
    # unsupported GLOBAL m.f whose module m is blocked"
    found = re.search(r"(?:nsupported global: |unsupported )GLOBAL (\S+)", text)
    if found:
        return f"it names the global {found.group(1)}, not allowed in plain data"
    return (text.strip().splitlines() or [type(e).__name__])[0]


def load_plain(path: Path, map_location: str | torch.device = "cpu") -> Any:
    """`torch.load(weights_only=True)`: tensors and plain Python values only; CheckpointError naming the file."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; {_WHAT_TO_DO}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused to load ({_first_line(e)}): it holds Python objects, not only "
            f"tensors, and loading it could run code; {_WHAT_TO_DO}"
        ) from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is damaged ({_first_line(e)}); {_WHAT_TO_DO}") from e


def _load_into(path: Path, target, state_dict) -> None:
    try:
        target.load_state_dict(state_dict)
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
        raise CheckpointError(
            f"{path} does not fit this run ({_first_line(e)}): was it written with another config? {_WHAT_TO_DO}"
        ) from e


def load_model_file(model: torch.nn.Module, path: Path) -> None:
    """model.safetensors (keys `student.*`, `heads.*`) into the unwrapped training module."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; {_WHAT_TO_DO}")
    try:
        sd = load_file(str(path), device="cpu")
    except Exception as e:  # SafetensorError (a pickle in its place, truncated, bad header)
        raise CheckpointError(f"{path} is not a readable safetensors file ({_first_line(e)}); {_WHAT_TO_DO}") from e
    _load_into(path, model, sd)


# -- FSDP: torch.distributed.checkpoint's pickles, allow-listed ---------------------------------------------------
_DCP_META = "torch.distributed.checkpoint.metadata"
_ALLOWED = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Only DCP's own metadata classes, torch dtypes/sizes and a few containers: nothing that calls out."""

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == _DCP_META:
            obj = super().find_class(module, name)
            if isinstance(obj, type) and obj.__module__ == _DCP_META:
                return obj
        if module == "torch":
            obj = getattr(torch, name, None)
            if isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
                return obj
        raise pickle.UnpicklingError(f"Unsupported global: {module}.{name}")


def _restricted_pickle_load(f) -> Any:
    return _MetadataUnpickler(f).load()


@contextmanager
def _dcp_without_pickle() -> Iterator[None]:
    """During an FSDP load: DCP reads `.metadata` with the allow-list and non-tensor values with weights_only."""
    from torch.distributed.checkpoint import default_planner, filesystem  # noqa: PLC0415 (lazy: heavy, ~2 s, FSDP only)

    planner_cls = default_planner.DefaultLoadPlanner
    original_load_bytes, original_pickle = planner_cls.load_bytes, filesystem.pickle

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            default_planner.set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj

    # a deliberate patch of torch's planner method and of DCP's `pickle` module, undone below
    planner_cls.load_bytes = load_bytes  # type: ignore[method-assign]  # patched for this load only
    filesystem.pickle = types.SimpleNamespace(  # type: ignore[assignment]  # stands in for the pickle module
        load=_restricted_pickle_load, dump=pickle.dump
    )
    try:
        yield
    finally:
        planner_cls.load_bytes = original_load_bytes  # type: ignore[method-assign]  # restores torch's method
        filesystem.pickle = original_pickle


def _load_fsdp(accelerator, ckpt: Path, model, optimizer) -> None:
    for sub in (FSDP_MODEL_DIR, FSDP_OPTIMIZER_DIR):  # refuse before any collective starts: same on every rank
        meta = ckpt / sub / ".metadata"
        if meta.is_file():
            try:
                with open(meta, "rb") as f:
                    _restricted_pickle_load(f)
            except Exception as e:
                raise CheckpointError(f"{meta}: refused to load ({_first_line(e)}); {_WHAT_TO_DO}") from e
    plugin = accelerator.state.fsdp_plugin
    try:
        with _dcp_without_pickle():
            if accelerator.scaler is not None and accelerator.is_fsdp2:  # before the optimizer, as load_state does
                _load_into(ckpt / SCALER_FILE, accelerator.scaler, load_plain(ckpt / SCALER_FILE))
            load_fsdp_model(plugin, accelerator, model, str(ckpt), 0)
            load_fsdp_optimizer(plugin, accelerator, optimizer, model, str(ckpt), 0)
    except CheckpointError:
        raise
    except Exception as e:  # DCP wraps a refusal on any rank in a CheckpointException raised on every rank
        raise CheckpointError(f"{ckpt}: the FSDP shards cannot be loaded ({_first_line(e)}); {_WHAT_TO_DO}") from e


def load_checkpoint(accelerator, ckpt: Path, model, optimizer, scheduler) -> TrainState:
    """Restore model, optimizer, scheduler, grad scaler, RNG states and counters from `ckpt`; returns the counters.

    Every process calls it (each restores its own RNG file). Nothing is unpickled beyond plain tensors and values.
    """
    reason = why_unusable(ckpt)
    if reason is not None:
        raise CheckpointError(f"cannot resume from {ckpt}: {reason}")
    state = TrainState.read(ckpt)
    if accelerator.distributed_type == "FSDP":
        _load_fsdp(accelerator, ckpt, model, optimizer)
    else:
        load_model_file(accelerator.unwrap_model(model), ckpt / MODEL_FILE)
        _load_into(ckpt / OPTIMIZER_FILE, optimizer, load_plain(ckpt / OPTIMIZER_FILE))
        if accelerator.scaler is not None:
            _load_into(ckpt / SCALER_FILE, accelerator.scaler, load_plain(ckpt / SCALER_FILE))
    _load_into(ckpt / SCHEDULER_FILE, scheduler, load_plain(ckpt / SCHEDULER_FILE))
    rng = rng_file(ckpt, accelerator.process_index)
    if rng.is_file():
        try:
            for warning in load_rng_state(rng):
                log.warning("%s", warning)
        except ValueError as e:
            raise CheckpointError(f"{e}; {_WHAT_TO_DO}") from e
    else:
        log.warning(
            "%s is missing (a checkpoint from an older version): random states are not restored, so "
            "dropout and sampling after the resume differ from an uninterrupted run",
            rng,
        )
    accelerator.step = state.micro_step
    return state
