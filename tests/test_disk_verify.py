"""`distill info --verify` covers every dataset the trainer reads; plain `distill info` notices a cut segment.

The attacks: 4 KiB flipped inside `teachers/NAME/stats/image_cov` passed `--verify` (PHI-S then trained on it);
a segment file truncated to 45% was reported "complete" by `distill info`.
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pytest

from cache.build.run import CacheJob, build_cache
from cache.store.segments import copy_cache
from cache.store.verify import verify
from cache.store.verify_stats import tolerance
from distill.cli import main


@pytest.fixture(scope="module")
def cache(tiny_corpus, tiny_teachers, tmp_path_factory) -> Path:
    """Both tiny teachers, 2 views, complete (so each has statistics)."""
    out = tmp_path_factory.mktemp("verify") / "features.h5"
    build_cache(
        CacheJob(
            data=str(tiny_corpus),
            teachers=tiny_teachers,
            out=str(out),
            batch_size=16,
            num_workers=0,
            device="cpu",
            views=2,
            h5_chunk_rows=8,
            chunk_rows=16,
            progress=False,
        )
    )
    return out


def _copy(src: Path, dst: Path) -> Path:
    copy_cache(str(src), str(dst))
    return dst


def _flip(path: Path, dataset: str, nbytes: int = 4096) -> None:
    """Flip (xor 0xFF) up to `nbytes` of a dataset's stored bytes (a contiguous or single-chunk dataset)."""
    with h5py.File(path, "r") as f:
        ds = f[dataset]
        offset = ds.id.get_offset() if ds.chunks is None else ds.id.get_chunk_info(0).byte_offset
        size = ds.id.get_storage_size()
    n = min(nbytes, size)
    with open(path, "r+b") as fh:
        fh.seek(offset)
        data = fh.read(n)
        fh.seek(offset)
        fh.write(bytes(b ^ 0xFF for b in data))


def _as_older_file(path: Path, teacher: str) -> None:
    """Rewrite a teacher's statistics as files written before they carried checksums."""
    with h5py.File(path, "r+") as f:
        s = f[f"teachers/{teacher}/stats"]
        for k in ("image_mean", "image_cov", "text_mean", "text_cov"):
            x = s[k][:]
            del s[k]
            s.create_dataset(k, data=x)  # contiguous, no fletcher32
            assert not s[k].fletcher32


def test_a_clean_cache_verifies(cache, capsys):
    assert main(["info", "--verify", str(cache)]) == 0
    out = capsys.readouterr().out
    assert "verified: 32 rows x 2 teachers OK" in out and "statistics re-derived" in out
    with h5py.File(cache, "r") as f:  # new files checksum what the trainer reads besides the features
        assert f["teachers/oc/stats/image_cov"].fletcher32 and f["teachers/oc/done"].fletcher32


def test_flipped_statistics_fail_verify_by_checksum(cache, tmp_path, capsys):
    path = _copy(cache, tmp_path / "f.h5")
    _flip(path, "teachers/hf/stats/image_cov")
    assert main(["info", "--verify", str(path)]) == 2
    err = capsys.readouterr().err
    assert "teacher 'hf' teachers/hf/stats/image_cov: checksum mismatch" in err
    assert "del f['teachers/hf']" in err


def test_flipped_statistics_of_an_older_file_fail_verify_by_rederivation(cache, tmp_path, capsys):
    path = _copy(cache, tmp_path / "old.h5")
    _as_older_file(path, "oc")
    assert verify(str(path), progress=False).ok  # rewritten unchanged: still agrees with its features
    _flip(path, "teachers/oc/stats/image_cov")  # 24 x 24 float32 = 2.3 KiB: all of it
    report = verify(str(path), progress=False)
    assert not report.ok
    (problem,) = report.problems
    assert problem.teacher == "oc" and problem.modality == "stats/image_cov" and problem.kind == "mismatch"
    assert "differ from the features they summarise" in str(problem)


def test_statistics_off_by_a_little_more_than_rounding_fail(cache, tmp_path):
    """One covariance value moved by 10x its allowed rounding error is caught; the bound is not vacuous."""
    path = _copy(cache, tmp_path / "nudged.h5")
    _as_older_file(path, "oc")
    with h5py.File(path, "r+") as f:
        cov = f["teachers/oc/stats/text_cov"]
        second = cov[:] + np.outer(f["teachers/oc/stats/text_mean"][:], f["teachers/oc/stats/text_mean"][:])
        _, tol = tolerance(second, f["teachers/oc/stats/text_mean"][:], cov[:], 4096)
        x = cov[:]
        x[3, 3] += 10 * tol[3, 3]
        cov[...] = x
    assert float(tol[3, 3]) < 0.1 * abs(float(x[3, 3]))  # the bound is far below the value itself
    report = verify(str(path), progress=False)
    assert [p.modality for p in report.problems] == ["stats/text_cov"]


def test_flipped_view_parameters_fail_verify(cache, tmp_path, capsys):
    path = _copy(cache, tmp_path / "v.h5")
    with h5py.File(path, "r") as f:
        (src,) = {vs.file_name for vs in f["views/params"].virtual_sources()}
    _flip(path.parent / src, "views/params", nbytes=64)
    assert main(["info", "--verify", str(path)]) == 2
    assert "views/params: checksum mismatch" in capsys.readouterr().err


# -- plain `distill info`: segment file sizes ---------------------------------------------------------------
def test_info_names_a_truncated_segment_and_never_says_complete(cache, tmp_path, capsys):
    path = _copy(cache, tmp_path / "cut.h5")
    segs = sorted(p for p in (tmp_path / "cut.h5.segments").glob("run-*-rank-*.h5") if ".sums" not in p.name)
    (seg,) = segs
    size = seg.stat().st_size
    os.truncate(seg, int(size * 0.45))
    assert main(["info", str(path)]) == 2
    captured = capsys.readouterr()
    assert "complete" not in captured.out.replace("incomplete", "")
    assert f"DAMAGED (segment cut.h5.segments/{seg.name}: truncated: " in captured.out
    err = [line for line in captured.err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith(
        f"distill info: error: {path}: 1 segment file(s) damaged, e.g. cut.h5.segments/{seg.name}: truncated: "
    )
    assert "(45%)" in err[0] and "restore the file and its folder" in err[0]


def test_info_of_an_intact_cache_says_complete(cache, capsys):
    assert main(["info", str(cache)]) == 0
    out = capsys.readouterr().out
    assert out.count(", complete, stats yes") == 2 and "DAMAGED" not in out
