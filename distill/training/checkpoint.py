"""Checkpoints: the `TrainState` counters, `checkpoint-STEP/` folders written atomically, finding one to resume.

Why `train_state.json` and no registered object: the step, epoch and position inside the epoch come back from the
checkpoint itself, never from parsing folder names (accelerate's complete_nlp_example gets that wrong), and
never from a pickle (accelerate's `register_for_checkpointing` writes `custom_checkpoint_0.pkl` and unpickles it
with weights_only=False, so a planted file would run code). Folder names only order the candidates;
`train_state.json` marks a finished checkpoint. Loading lives in `distill.training.checkpoint_load`.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
from pathlib import Path

from safetensors import safe_open

from distill.training.collective import all_ok
from distill.training.rng_state import save_rng_state
from student import run_files

log = logging.getLogger(__name__)

PREFIX = "checkpoint-"
STATE_FILE = run_files.TRAIN_STATE_FILE
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.bin"
SCHEDULER_FILE = "scheduler.bin"
FSDP_MODEL_DIR = "pytorch_model_fsdp_0"  # accelerate's sharded FSDP model folder
FSDP_OPTIMIZER_DIR = "optimizer_0"
_NAME = re.compile(rf"{PREFIX}(\d+)")
# RuntimeErrors that torch.save / safetensors raise when the disk fails under them (no errno attached)
_WRITE_FAILURES = (
    "basic_ios::clear",
    "iostream error",
    "PytorchStreamWriter failed",
    "unexpected pos",
    "No space left",
    "file write failed",
    "Failed to write",
)


class CheckpointError(ValueError):
    """A checkpoint cannot be resumed: a file is missing, damaged, or refused because it is not plain data."""


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (full disk, I/O error); the half-written folder was removed.

    An OSError with errno and filename (the folder), so the CLI reads it as an environment failure; str() is the
    whole one-line message.
    """

    def __str__(self) -> str:
        return str(self.strerror)


class TrainState(run_files.TrainState):
    """The schema's `TrainState` (student.run_files), read back with errors a resume can act on."""

    @classmethod
    def read(cls, ckpt: str | Path) -> TrainState:
        """The state in `ckpt/train_state.json`; CheckpointError naming the file when missing or damaged."""
        path = Path(ckpt) / STATE_FILE
        try:
            state = cls(**run_files.read_train_state(ckpt).state_dict())
            if not all(
                isinstance(getattr(state, k), int) and getattr(state, k) >= 0
                for k in ("step", "epoch", "batches_in_epoch", "samples_seen", "micro_step")
            ):
                raise ValueError("counters must be non-negative integers")
        except FileNotFoundError:
            raise CheckpointError(f"{path} is missing: {path.parent} is not a finished checkpoint") from None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(
                f"{path} is damaged ({e}); resume from another checkpoint (train.resume=PATH) or delete {path.parent}"
            ) from e
        return state


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f"{PREFIX}{step}"


def _recorded_step(d: Path) -> int | None:
    try:
        return int(json.loads((d / STATE_FILE).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Finished checkpoints (`checkpoint-N` with train_state.json), oldest first by the step recorded inside them.

    `checkpoint-N.tmp` (being written) and `checkpoint-N.broken` (set aside) are never listed.
    """
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = []
    for d in out.iterdir():
        if d.is_dir() and _NAME.fullmatch(d.name) and (step := _recorded_step(d)) is not None:
            found.append((step, d))
    return [d for _, d in sorted(found)]


def why_unusable(ckpt: Path) -> str | None:
    """Why `ckpt` cannot be resumed (cheap checks: no tensor is read), or None when it looks complete."""
    try:
        TrainState.read(ckpt)
    except CheckpointError as e:
        return str(e)
    model = ckpt / MODEL_FILE
    if model.is_file():
        try:
            with safe_open(str(model), framework="pt") as f:
                list(f.keys())
        except Exception as e:  # SafetensorError: a truncated file or not safetensors at all
            return f"{model} is unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    elif not (ckpt / FSDP_MODEL_DIR / ".metadata").is_file():
        return f"{model} is missing"
    if not ((ckpt / OPTIMIZER_FILE).is_file() or (ckpt / FSDP_OPTIMIZER_DIR / ".metadata").is_file()):
        return f"{ckpt / OPTIMIZER_FILE} is missing"
    if not (ckpt / SCHEDULER_FILE).is_file():
        return f"{ckpt / SCHEDULER_FILE} is missing"
    return None


def _set_aside(ckpt: Path) -> Path:
    """Rename a broken checkpoint to `checkpoint-N.broken` (kept for inspection, never listed or pruned)."""
    dest, n = ckpt.with_name(ckpt.name + ".broken"), 1
    while dest.exists():
        dest, n = ckpt.with_name(f"{ckpt.name}.broken{n}"), n + 1
    os.replace(ckpt, dest)
    return dest


def _auto_resume(out: Path, set_aside: bool) -> Path | None:
    """The newest checkpoint that is complete; broken newer ones are skipped with a warning (and set aside)."""
    cands = []
    for d in out.iterdir() if out.is_dir() else []:
        m = _NAME.fullmatch(d.name)
        if d.is_dir() and m:
            step = _recorded_step(d)
            cands.append((step if step is not None else int(m.group(1)), d))
    skipped: list[tuple[Path, str]] = []
    for _, d in sorted(cands, reverse=True):
        reason = why_unusable(d)
        if reason is None:
            for bad, why in skipped:
                moved = f" (moved to {_set_aside(bad).name})" if set_aside else ""
                log.warning(
                    "train.resume=auto: skipping %s: %s%s; resuming from %s instead", bad.name, why, moved, d.name
                )
            return d
        skipped.append((d, reason))
    if skipped:
        raise CheckpointError(
            f"train.resume=auto: {out} holds checkpoints but none can be resumed ("
            + "; ".join(f"{d.name}: {why}" for d, why in skipped)
            + "); resume from a good copy "
            "with train.resume=PATH, or move them away to start afresh"
        )
    return None


def resolve_resume(resume: str, output_dir: str | Path, set_aside: bool = False) -> Path | None:
    """The checkpoint to resume from: `auto` = newest complete one (or None), `none` = None, else a path.

    `auto` skips a newest checkpoint that is damaged or incomplete, with a warning naming it and why, and falls back
    to the previous good one; with `set_aside` (the main process) the broken one is renamed `checkpoint-N.broken`
    so that pruning and later resumes never mix it with the new trajectory.
    `none` refuses an output_dir that already holds checkpoints: a fresh run there would overwrite the old run's
    log and tokenizer, and pruning to `keep_last` by step would delete the new run's lower-numbered checkpoints.
    """
    out = Path(output_dir)
    if resume == "none":
        found = list_checkpoints(out)
        if found:
            raise ValueError(
                f"train.resume=none, but {output_dir} already holds {', '.join(d.name for d in found)} "
                "from an earlier run; choose a new train.output_dir, delete that folder, or continue "
                "it with train.resume=auto"
            )
        return None
    if resume == "auto":
        return _auto_resume(out, set_aside)
    path = Path(resume)
    if not path.is_dir():
        raise FileNotFoundError(
            f"train.resume={resume}: {path} not found; give a finished {PREFIX}STEP folder, `auto` or `none`"
        )
    reason = why_unusable(path)
    if reason is not None:
        raise CheckpointError(f"train.resume={resume}: cannot resume: {reason}")
    found = [d.resolve() for d in list_checkpoints(out)]  # oldest first, by recorded step
    if path.resolve() in found:
        newer = found[found.index(path.resolve()) + 1 :]
        if newer:  # the new trajectory's checkpoints would mix with the old ones and be pruned first
            raise ValueError(
                f"train.resume={resume}: {output_dir} also holds newer "
                f"{', '.join(d.name for d in newer)} from the run being rewound; move them away, or "
                "resume into a new train.output_dir"
            )
    return path


def install_unwrapped_state_hooks(accelerator) -> None:
    """Store model weights under their own keys (`student.*`, `heads.*`), never DDP's `module.` prefix.

    Why: the export reads model.safetensors and must not care how many processes trained it. Loading is done by
    `distill.training.checkpoint_load`, never by accelerate's `load_state`.
    """

    def save_hook(models, weights, output_dir):
        if len(weights) == len(models):
            for i, m in enumerate(models):
                weights[i] = accelerator.unwrap_model(m).state_dict()

    accelerator.register_save_state_pre_hook(save_hook)


def _is_write_failure(e: BaseException) -> bool:
    return isinstance(e, OSError) or (isinstance(e, RuntimeError) and any(s in str(e) for s in _WRITE_FAILURES))


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _folder_size(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file()) if d.is_dir() else 0


def _needed_bytes(accelerator, output_dir: Path) -> int:
    """What a checkpoint takes: the newest one's size, else the weights plus AdamW's two moments (3x params)."""
    found = list_checkpoints(output_dir)
    if found:
        return _folder_size(found[-1])
    return 3 * sum(p.numel() * p.element_size() for m in accelerator._models for p in m.parameters())


def _write_error(accelerator, e: BaseException | None, final: Path, output_dir: Path) -> CheckpointWriteError:
    """One line naming the folder, calling a full disk 'no space left on device', and what to do next."""
    try:
        free = shutil.disk_usage(output_dir).free
    except OSError:
        free = None
    need = _needed_bytes(accelerator, output_dir)
    prev = list_checkpoints(output_dir)
    then = f"rerun with train.resume=auto to continue from {prev[-1].name}" if prev else "rerun to start again"
    code = getattr(e, "errno", None)
    if code == errno.ENOSPC or (free is not None and free < need):
        what = (
            f"no space left on device ({_bytes(free) if free is not None else 'unknown'} free, a checkpoint "
            f"needs about {_bytes(need)})"
        )
        code = errno.ENOSPC
    elif e is None:
        what = "another process failed to write its part (see its message)"
    else:
        what = " | ".join(line.strip() for line in f"{type(e).__name__}: {e}".splitlines() if line.strip())
    return CheckpointWriteError(
        code or errno.EIO,
        f"could not write checkpoint {final}: {what}; the partial "
        f"folder was removed; free space or fix the disk, then {then}",
        str(final),
    )


def save_checkpoint(accelerator, output_dir: str | Path, state: TrainState, keep_last: int, ema=None) -> Path:
    """save_state into `checkpoint-STEP.tmp`, add our RNG file (and `ema`'s average, `distill.training.ema.Ema`)
    and train_state.json, rename, prune to `keep_last`.

    A write failure (full disk, I/O error) removes the `.tmp` folder on every process and raises
    CheckpointWriteError; the previous checkpoint is untouched, so the next run resumes from it.
    """
    output_dir = Path(output_dir)
    final = checkpoint_dir(output_dir, state.step)
    tmp = final.with_name(final.name + ".tmp")
    rank = accelerator.process_index
    state.micro_step = accelerator.step
    failure: BaseException | None = None
    try:
        if accelerator.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp), safe_serialization=True)
        (tmp / f"random_states_{rank}.pkl").unlink(missing_ok=True)  # a pickle: ours is rng_state_RANK.safetensors
        save_rng_state(tmp, rank)
        if ema is not None:  # the main process's
            ema.save(tmp, state.step)
    except (OSError, RuntimeError) as e:
        if not _is_write_failure(e):
            raise
        failure = e
    if all_ok(accelerator, failure is None) and accelerator.is_main_process:
        try:
            run_files.write_train_state(tmp, state)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except OSError as e:
            failure = e
    if not all_ok(accelerator, failure is None):
        error = _write_error(accelerator, failure, final, output_dir)
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise error from failure
    if accelerator.is_main_process:
        for old in list_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final
