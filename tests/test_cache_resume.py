"""Kill -9 at random moments (and at the worst instants of a commit) never loses a committed row; a rerun
completes the cache to exactly what an uninterrupted run writes.

Each run is a real process killed with SIGKILL, forked by cache_zygote.Zygote (torch imported once, so the test
stays fast) with a slowed-down model, so that random kills land mid-run, the way they would with a real teacher.
"""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from cache_zygote import Zygote, check_nothing_lost

pytestmark = pytest.mark.slow


def _final_equals_reference(out: Path, ref: dict, ref_stats: dict) -> None:
    assert not Path(str(out) + ".parts").exists() and not Path(str(out) + ".tmp").exists()
    assert not Path(str(out) + ".lock").exists()
    with h5py.File(out, "r") as f:
        for name in ref:
            g = f[f"teachers/{name}"]
            assert g["done"][:].all()
            for what in ("image", "text"):
                np.testing.assert_allclose(g[what][:].astype(np.float32), ref[name][what], atol=2e-3)
            np.testing.assert_allclose(g["stats/image_cov"][:], ref_stats[name], atol=1e-4)
        assert len(f["bad/rows"]) == 0


def test_kill_then_resume_equals_uninterrupted(tmp_path, tiny_corpus, tiny_teachers):
    kw = dict(data=str(tiny_corpus), teachers=tiny_teachers, batch_size=2, chunk_rows=4, num_workers=0, progress=False)
    ref_out = tmp_path / "ref.h5"
    zygote = Zygote(tmp_path, {**kw, "out": "PLACEHOLDER"})
    try:
        t0 = time.time()
        assert zygote.run(out=ref_out) == 0  # uninterrupted, same slowed-down model: the reference and its time
        duration = time.time() - t0
        with h5py.File(ref_out, "r") as f:
            ref = {
                n: {w: f[f"teachers/{n}/{w}"][:].astype(np.float32) for w in ("image", "text")} for n in tiny_teachers
            }
            ref_stats = {n: f[f"teachers/{n}/stats/image_cov"][:] for n in tiny_teachers}

        # 1. SIGKILL at random moments of the run
        out, history, codes = tmp_path / "random.h5", [], []
        rng = random.Random(1234)
        for _ in range(4):
            codes.append(zygote.run(out=out, kill_after=rng.uniform(0.15, 0.7) * duration))
            check_nothing_lost(out, ref, history)
        assert codes[0] == -signal.SIGKILL and sum(c == -signal.SIGKILL for c in codes) >= 1
        assert zygote.run(out=out, delay=0.0) == 0  # the same command again, to completion
        _final_equals_reference(out, ref, ref_stats)

        # 2. SIGKILL at the worst instants of a commit: each leaves work for the next
        out, history = tmp_path / "targeted.h5", []
        for at in ("part-mid", "fold-mid", "after-rename"):
            assert zygote.run(out=out, kill_at=at) == -signal.SIGKILL, f"the {at} kill did not happen"
            check_nothing_lost(out, ref, history)
        assert Path(str(out) + ".lock").exists()  # the killed writer's lock is stale, and taken over
        assert zygote.run(out=out, delay=0.0) == 0
        _final_equals_reference(out, ref, ref_stats)
    finally:
        zygote.close()
