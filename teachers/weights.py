"""Naming the weights file of a local model folder, and the file that failed when loading it fails.

Why: safetensors and torch report a truncated or garbled file without its path (`SafetensorError: Error while
deserializing header: incomplete metadata`), and open_clip only warns when a folder holds no weights; a user with
several teachers and students cannot tell which folder to fix. `find_weights` finds the file open_clip will load,
and `reading_weights` re-raises a load failure as `DamagedWeightsError` naming that file and what to do.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# open_clip's own preference (open_clip.factory._find_checkpoint_in_dir), then transformers' names
WEIGHT_NAMES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
    "model.safetensors",
    "pytorch_model.bin",
    "pytorch_model.pth",
    "model.pth",
)
_SUFFIXES = (".safetensors", ".bin", ".pth")
REDO_HINT = "export it again with `distill export` (or copy the model folder again)"


class DamagedWeightsError(ValueError):
    """A weights file that exists but cannot be read: truncated, a bad header, or a refused pickle."""


def find_weights(folder: str | Path, expected: str = "open_clip_model.safetensors") -> Path:
    """The weights file a model folder will be loaded from; FileNotFoundError naming `expected` when none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {folder} not found")
    for name in WEIGHT_NAMES:
        if (folder / name).is_file():
            return folder / name
    found = sorted(p for p in folder.iterdir() if p.suffix in _SUFFIXES and p.is_file())
    if found:
        return found[0]
    raise FileNotFoundError(f"{folder / expected} not found: {folder} holds no weights file; {REDO_HINT}")


def _is_damage(e: BaseException) -> bool:
    """True for the errors a damaged weights file raises (not for a wrong model config or a full disk)."""
    if isinstance(e, pickle.UnpicklingError) or type(e).__name__ == "SafetensorError":
        return True
    text = str(e)
    return isinstance(e, (RuntimeError, EOFError, OSError)) and any(
        s in text
        for s in (
            "PytorchStreamReader",
            "failed finding central directory",
            "invalid header",
            "unexpected EOF",
            "Ran out of input",
            "Error while deserializing",
            "Unable to load weights from",
            "safetensors",
        )
    )


@contextmanager
def reading_weights(file: str | Path) -> Iterator[None]:
    """Turn a failure to read `file` (truncated, bad header, refused pickle) into a one-line DamagedWeightsError."""
    try:
        yield
    except DamagedWeightsError:
        raise
    except Exception as e:
        if not _is_damage(e):
            raise
        kind = "not safetensors" if str(file).endswith(".safetensors") else "not a weights file"
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DamagedWeightsError(f"{file} is damaged (truncated or {kind}: {first}): {REDO_HINT}") from e
