"""distill.data.loader.teacher_feats: every teacher's features in one buffer, so a worker sends one block per batch."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

from distill.data.loader import teacher_feats
from teachers.kernel.modality import Pair

DIMS = {"a": 512, "b": 768, "c": 1152}


def _got(b: int = 4, views: int = 0, seed: int = 0) -> dict[str, Pair[np.ndarray]]:
    """What FeatureReader.read returns: float16 rows as stored ((B, K, D) image views when `views`)."""
    rng = np.random.default_rng(seed)
    unit = lambda *s: (lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True))(rng.standard_normal(s))  # noqa: E731
    return {
        t: Pair((unit(b, views, d) if views else unit(b, d)).astype(np.float16), unit(b, d).astype(np.float16))
        for t, d in DIMS.items()
    }


def test_values_are_the_stored_rows_in_float32_and_share_one_storage():
    got = _got()
    feats = teacher_feats(got)
    assert list(feats) == list(DIMS)
    ptrs = set()
    for t, d in DIMS.items():
        for m, x in feats[t].items():
            assert x.dtype == torch.float32 and x.shape == (4, d) and x.is_contiguous()
            assert torch.equal(x, torch.from_numpy(got[t][m].astype(np.float32)))
            ptrs.add(x.untyped_storage().data_ptr())
    assert len(ptrs) == 1  # one buffer, so one shared-memory block crosses the worker queue
    # the views do not overlap: writing one leaves every other as read
    feats["b"].image.zero_()
    assert torch.equal(feats["a"].text, torch.from_numpy(got["a"].text.astype(np.float32)))
    assert torch.equal(feats["c"].image, torch.from_numpy(got["c"].image.astype(np.float32)))


def test_stored_views_are_averaged_and_renormalised():
    got = _got(views=3)
    feats = teacher_feats(got)
    for t, d in DIMS.items():
        want = torch.from_numpy(got[t].image.astype(np.float64)).mean(1)
        want = want / want.norm(dim=-1, keepdim=True)
        assert feats[t].image.shape == (4, d)
        # against a float64 reference, bounds that hold in any summation order: the norm's float32 sum of d squares
        # is off by < d x 2^-24 relative (plus a few roundings: mean, sqrt, divide), so each component by that
        # fraction of itself (rtol ~7e-5 at d = 1152); the mean of 3 views adds < 4 x 2^-24 absolute (atol). A view
        # left out of the mean or a missing renormalisation is off by >= 1e-2 relative.
        assert torch.allclose(feats[t].image.double(), want, rtol=(d + 10) * 2.0**-24, atol=4 * 2.0**-24)
        assert torch.allclose(feats[t].image.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert teacher_feats({}) == {}


def _collate(items):
    return teacher_feats(_got(seed=items[0]))


def test_a_worker_sends_the_same_features_in_one_block():
    loader = DataLoader(list(range(3)), batch_size=1, collate_fn=_collate, num_workers=1)
    for i, feats in enumerate(loader):
        want = _got(seed=i)
        ptrs = {x.untyped_storage().data_ptr() for p in feats.values() for _, x in p.items()}
        assert len(ptrs) == 1
        for t in DIMS:
            for m, x in feats[t].items():
                assert torch.equal(x, torch.from_numpy(want[t][m].astype(np.float32)))
