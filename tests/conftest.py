"""Shared fixtures: offline mode, one CPU thread, tiny teachers and a synthetic corpus built once per session."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from cache.sources.synthetic import make_synthetic_corpus  # noqa: E402
from distill.tiny_models import make_tiny_hf_clip, make_tiny_open_clip  # noqa: E402

torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the project (present in CI, absent in a user's clone)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (it ships beside the project in CI only)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """A 32-row synthetic CSV corpus (PNG images 48x48, captions describing them)."""
    return make_synthetic_corpus(tmp_path_factory.mktemp("corpus"), n=32, image_size=48, seed=0)


@pytest.fixture(scope="session")
def tiny_teachers(tmp_path_factory) -> dict[str, str]:
    """Two tiny teachers of different kinds and dimensions, as SPEC strings: oc (open_clip, 24), hf (CLIPModel, 40)."""
    root = tmp_path_factory.mktemp("teachers")
    oc = make_tiny_open_clip(root / "oc", embed_dim=24, seed=1)
    hf = make_tiny_hf_clip(root / "hf", projection_dim=40, seed=2)
    return {"oc": f"local-dir:{oc}", "hf": f"hf-clip:{hf}"}
