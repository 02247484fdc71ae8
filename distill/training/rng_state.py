"""Random-number states (python `random`, numpy, torch CPU and CUDA) saved per process without pickle.

Why: accelerate keeps them in `random_states_N.pkl`, a pickle; a checkpoint from anyone must never run code when
resumed. Here every state is an integer tensor in `rng_state_RANK.safetensors`, the few scalars in its metadata.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import cast

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file


def rng_file(folder: str | Path, rank: int) -> Path:
    return Path(folder) / f"rng_state_{rank}.safetensors"


def save_rng_state(folder: str | Path, rank: int) -> Path:
    """Write this process's generator states to `folder/rng_state_RANK.safetensors`."""
    version, py_state, gauss_next = random.getstate()
    np_state = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state())  # legacy=True: the tuple
    kind, np_keys, np_pos, np_has_gauss, np_gauss = np_state
    tensors = {
        "python": torch.tensor(py_state, dtype=torch.int64),
        "numpy": torch.from_numpy(np_keys.astype(np.int64)),
        "torch_cpu": torch.get_rng_state(),
    }
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    tensors.update({f"cuda_{i}": s for i, s in enumerate(cuda)})
    scalars = {
        "python_version": version,
        "python_gauss_next": gauss_next,
        "numpy_kind": kind,
        "numpy_pos": np_pos,
        "numpy_has_gauss": np_has_gauss,
        "numpy_cached_gaussian": np_gauss,
        "cuda_devices": len(cuda),
    }
    path = rng_file(folder, rank)
    save_file(tensors, str(path), metadata={"scalars": json.dumps(scalars)})
    return path


def load_rng_state(path: str | Path) -> list[str]:
    """Restore the states written by `save_rng_state`; returns warnings (e.g. CUDA state saved but no GPU now).

    Raises ValueError naming the file when it is not what `save_rng_state` wrote.
    """
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            scalars = json.loads((f.metadata() or {})["scalars"])
            t = {k: f.get_tensor(k) for k in f.keys()}
        random.setstate(
            (int(scalars["python_version"]), tuple(int(x) for x in t["python"].tolist()), scalars["python_gauss_next"])
        )
        np.random.set_state(
            (
                scalars["numpy_kind"],
                t["numpy"].numpy().astype(np.uint32),
                int(scalars["numpy_pos"]),
                int(scalars["numpy_has_gauss"]),
                float(scalars["numpy_cached_gaussian"]),
            )
        )
        torch.set_rng_state(t["torch_cpu"])
    except Exception as e:  # safetensors, json, missing keys, wrong shapes: all mean "not our file"
        raise ValueError(
            f"{path}: not a random-state file written by distill.train ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''})"
        ) from e
    warnings = []
    n = int(scalars.get("cuda_devices", 0))
    if n and torch.cuda.is_available() and torch.cuda.device_count() == n:
        torch.cuda.set_rng_state_all([t[f"cuda_{i}"] for i in range(n)])
    elif n:
        warnings.append(
            f"{path}: CUDA random states saved for {n} device(s), "
            f"{torch.cuda.device_count() if torch.cuda.is_available() else 0} here: not restored"
        )
    return warnings
