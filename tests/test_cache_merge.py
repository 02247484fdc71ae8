"""The merge that copies no feature data (issue 12): segments mapped by virtual datasets (cache format 2).

What must hold: the merged file equals a single-process run (values, done flags, bad records, statistics), also
when several processes were killed mid-run and rerun; the reader, `--verify` and h5py read the merged layout; the
file and its folder can be moved together, and a file without its folder is refused by name; adding a teacher
maps only the new run's segments; a retried row maps to the newest segment; a format-1 file (real datasets) still
reads, trains and resumes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from test_cache_faults import _assert_equal_to, _state, fault_job  # noqa: F401  (fixture)
from train_fixtures import tiny_cache, tiny_config, tiny_tokenizer  # noqa: F401  (fixtures)

import cache.store.layout as L
import cache.store.segments as S
import cache.store.writer as W
from cache.build.commit import commit_chunk, deal, open_segment
from cache.build.dist import DistEnv
from cache.build.run import CacheJob, build_cache
from cache.store.reader import FeatureReader
from cache.store.schema import CacheError
from cache.store.segments import copy_cache, list_segments, read_log, segment_dir
from cache.store.verify import verify
from distill.train import train
from teachers.kernel.modality import Modality

ROOT = Path(__file__).resolve().parents[1]
ATOL = 2e-3


def _sources(path: Path, name: str, what: str = "image") -> list[str]:
    with h5py.File(path, "r") as f:
        return [vs.file_name for vs in f[L.feature(name, Modality(what))].virtual_sources()]


# -- several processes, killed and resumed, equal one -------------------------------------------------------------
DRIVER = textwrap.dedent("""
    import json, os, sys, time
    import torch
    torch.set_num_threads(1)
    from cache import CacheJob, build_cache
    from teachers.base import Teacher
    kw, delay = json.loads(sys.argv[1]), float(sys.argv[2])
    for meth in ("encode_image", "encode_text"):  # a slower model, so that the kill lands mid-run
        orig = getattr(Teacher, meth)
        def slow(self, x, _orig=orig):
            time.sleep(delay)
            return _orig(self, x)
        setattr(Teacher, meth, slow)
    build_cache(CacheJob(**kw))
""")


def _torchrun(tmp_path: Path, kw: dict, delay: float, pythonpath: str, kill_after_commits: int = 0) -> int:
    """2 processes (torchrun, gloo, CPU) caching `kw`; SIGKILLed, all of them, once the segments hold
    `kill_after_commits` commits (0: run to the end). Returns the exit code."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), pythonpath, os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--standalone",
            str(driver),
            json.dumps(kw),
            str(delay),
        ],
        env=env,
        cwd=ROOT,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    t0 = time.time()
    while proc.poll() is None:
        assert time.time() - t0 < 300, "a cache run hung"
        folder = Path(kw["out"] + L.SEGMENTS_SUFFIX)
        commits = sum(len(read_log(str(p))) for p in folder.glob("run-*-rank-*.h5")) if folder.is_dir() else 0
        if kill_after_commits and commits >= kill_after_commits:
            os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both workers at once
            break
        time.sleep(0.01)
    proc.wait(timeout=60)
    if kill_after_commits == 0:
        assert proc.stderr is not None  # piped above
        assert proc.returncode == 0, proc.stderr.read()[-3000:]
    return proc.returncode


@pytest.mark.slow
def test_two_processes_killed_and_resumed_equal_one(tmp_path, fault_job):
    """Teacher x gives NaN / zero rows, so bad records and statistics go through the kill and the merge too."""
    kw = {k: v for k, v in fault_job.items() if not k.startswith("_")}
    build_cache(CacheJob(**kw, out=str(tmp_path / "one.h5")))
    ref = _state(tmp_path / "one.h5")

    out = tmp_path / "multi.h5"
    code = _torchrun(tmp_path, {**kw, "out": str(out)}, 0.05, fault_job["_pythonpath"], kill_after_commits=3)
    assert code != 0  # killed mid-run: some chunks committed, the rest not
    assert _torchrun(tmp_path, {**kw, "out": str(out)}, 0.0, fault_job["_pythonpath"]) == 0
    _assert_equal_to(out, ref)
    assert not Path(f"{out}.parts").exists() and not Path(f"{out}.tmp").exists()
    # two runs x two processes at most, each mapped by a few row ranges; no feature byte in FEATURES.h5
    for name in ("oc", "x"):
        files = set(_sources(out, name))
        assert 1 <= len(files) <= 4 and len(_sources(out, name)) <= 2 * len(files) + 8
    assert os.path.getsize(out) < sum(p.stat().st_size for p in Path(f"{out}.segments").glob("*-rank-*.h5"))
    for block_rows in (0, 4):  # the training reader on the merged layout
        with FeatureReader(str(out), block_rows=block_rows) as r:
            rows = np.flatnonzero(ref["teachers"]["x"]["done"])[::-1]
            got = r.read(rows)
            for name in ("oc", "x"):
                np.testing.assert_allclose(got[name]["image"], ref["teachers"][name]["image"][rows], atol=ATOL)
    assert verify(str(out), progress=False).ok


# -- adding a teacher, moving the folder, copying, a missing folder ------------------------------------------------
def _job(tiny_corpus, teachers, out, **kw) -> CacheJob:
    return CacheJob(
        data=str(tiny_corpus),
        teachers=teachers,
        out=str(out),
        batch_size=4,
        chunk_rows=8,
        h5_chunk_rows=8,
        num_workers=0,
        device="cpu",
        progress=False,
        **kw,
    )


def test_a_teacher_added_later_maps_its_own_segments_and_equals_both_at_once(tmp_path, tiny_corpus, tiny_teachers):
    both = tmp_path / "both" / "f.h5"
    both.parent.mkdir()
    build_cache(_job(tiny_corpus, tiny_teachers, both))
    out = tmp_path / "a" / "f.h5"
    out.parent.mkdir()
    build_cache(_job(tiny_corpus, {"oc": tiny_teachers["oc"]}, out))
    oc_before = _sources(out, "oc")
    summary = build_cache(_job(tiny_corpus, tiny_teachers, out))  # adds hf: only hf is computed
    assert summary.teachers["hf"].computed == 32 and summary.teachers["oc"].computed == 0
    assert _sources(out, "oc") == oc_before  # oc's mapping is untouched
    (seg_oc,), (seg_hf,) = set(oc_before), set(_sources(out, "hf"))
    assert seg_oc != seg_hf and "run-" in seg_hf
    _assert_equal_to(out, _state(both))
    assert len(list_segments(segment_dir(str(out)))) == 2  # one per run, nothing left over


def test_the_merged_file_reads_after_moving_its_folder_and_refuses_a_lone_file(
    tmp_path, tiny_corpus, tiny_teachers, monkeypatch
):
    home = tmp_path / "a"
    home.mkdir()
    out = home / "features.h5"
    build_cache(_job(tiny_corpus, tiny_teachers, out, views=2))
    ref = _state(out)
    with h5py.File(out, "r") as f:
        views = f[L.VIEW_PARAMS][:]
        keys = f[L.KEYS].asstr()[:].tolist()

    moved = tmp_path / "elsewhere" / "b"
    shutil.move(str(home), str(moved))  # the file and its folder, together
    monkeypatch.chdir(tmp_path)  # relative sources resolve beside the file, not in the working directory
    out = moved / "features.h5"
    _assert_equal_to(out, ref)
    with FeatureReader(str(out), block_rows=8) as r:
        assert r.keys == keys and r.chunk_rows == 8
        np.testing.assert_allclose(
            r.read([31, 2], views=np.array([1, 0]))["hf"]["image"],
            ref["teachers"]["hf"]["image"][[31, 2], [1, 0]],
            atol=ATOL,
        )
        np.testing.assert_array_equal(r.view_params([5]), views[[5]])
    assert verify(str(out), progress=False).ok

    copy = copy_cache(str(out), str(moved / "copy.h5"))  # beside it, under another name: its own folder
    assert all(s.startswith("copy.h5.segments/") for s in _sources(Path(copy), "oc"))
    with h5py.File(copy, "r+") as f:  # damage the copy only
        ds = f[L.feature("oc", "text")]
        ds[3] = np.full(ds.shape[1:], np.nan, ds.dtype)
    assert [str(p) for p in verify(copy, progress=False).problems] == [
        "teacher 'oc' text rows 3: non-finite values (NaN/inf)"
    ]
    assert verify(str(out), progress=False).ok

    lone = tmp_path / "lone.h5"
    shutil.copyfile(out, lone)  # without its folder
    with pytest.raises(
        CacheError,
        match=r"lone.h5 maps its features from \d+ file\(s\) that are not there, e\.g\. "
        r".*features.h5.segments/run-.*copy or move both",
    ):
        FeatureReader(str(lone))
    seg = Path(list_segments(segment_dir(str(out)))[0])
    seg.rename(seg.with_suffix(".away"))
    with pytest.raises(CacheError, match=r"maps its features from 1 file\(s\) that are not there"):
        verify(str(out), progress=False)


# -- the merge itself: latest segment wins, statistics from sums -----------------------------------------------------
def _unit(rng, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def _run(out: str, rows: np.ndarray, world: int, metas: dict, values: dict, bad: dict, finish: bool = True) -> None:
    """A cache run of `world` simulated processes over `rows` through the builder's commit path; `values[name]`:
    (image, text) of every row; `bad[name]`: rows that teacher fails on."""
    run = S.next_run(segment_dir(out))
    for name, m in metas.items():
        W.write_meta(out, name, {**m, L.SINCE_RUN: m.get(L.SINCE_RUN, run)})
    need = np.ones((int(rows.max()) + 1, len(metas)), dtype=bool)
    chunks = [rows[i : i + 4] for i in range(0, len(rows), 4)]
    for rank in range(world):
        env = DistEnv(rank, world)
        mine = deal(chunks, env)
        seg = open_segment(out, run, env, mine, need, metas, 4, 4, "fp")
        assert seg is not None  # every simulated process here is dealt rows
        for j, c in enumerate(mine):
            parts = []
            for name in metas:
                ok = c[~np.isin(c, bad.get(name, []))]
                img, txt = values[name][0][ok], values[name][1][ok]
                seg.add_sums(name, torch.from_numpy(img), torch.from_numpy(txt))
                gone = [int(r) for r in c if r in bad.get(name, [])]
                parts.append((name, ok, img, txt, gone, ["bad"] * len(gone), None))
            commit_chunk(out, parts, seg, j)
        if finish:
            seg.finish()
        seg.close()


def test_retried_rows_map_to_the_newest_segment_and_statistics_come_from_the_sums(tmp_path):
    n, rng = 40, np.random.default_rng(0)
    out = str(tmp_path / "f.h5")
    W.create_file(out, [f"k{i}" for i in range(n)], fingerprint="fp", source="synthetic")
    metas = {
        name: {"attrs": {"spec": name, "embed_dim": d, "views": 0}, "dtype": "float16", "fingerprint": "fp"}
        for name, d in (("a", 6), ("b", 5))
    }
    values = {
        name: (_unit(rng, n, m["attrs"]["embed_dim"]), _unit(rng, n, m["attrs"]["embed_dim"]))
        for name, m in metas.items()
    }
    _run(out, np.arange(n), 3, metas, values, {"b": [5, 17]})
    W.fold(out)
    with h5py.File(out, "r") as f:
        assert sorted(f[L.BAD_ROWS][:].tolist()) == [5, 17]
        assert f[L.done("b")][:].sum() == n - 2 and f[L.done("a")][:].all()
        assert f[L.feature("a", "image")].id.get_create_plist().get_virtual_count() == 3  # one range per process
        # a's statistics leave out rows 5 and 17 (bad for b): its sums counted them, the merge took them out
        usable = np.setdiff1d(np.arange(n), [5, 17])
        x = values["a"][0][usable].astype(np.float64)
        np.testing.assert_allclose(f[f"{L.stats('a')}/image_cov"][:], np.cov(x, rowvar=False), atol=1e-5)
        assert int(f[L.stats("a")].attrs["count"]) == n - 2

    # b is retried on its bad rows, in a run killed after its commits (no sums saved): the newest segment wins
    values["b"][0][[5, 17]] = _unit(rng, 2, 5)
    _run(out, np.array([5, 17]), 1, {"b": metas["b"]}, values, {}, finish=False)
    assert W.fold(out) == {"b": 2}
    with h5py.File(out, "r") as f:
        assert L.BAD not in f or len(f[L.BAD_ROWS]) == 0  # done for every teacher now: the records are lifted
        assert f[L.done("b")][:].all()
        np.testing.assert_array_equal(f[L.feature("b", "image")][:], values["b"][0])
        srcs = [vs.file_name for vs in f[L.feature("b", "image")].virtual_sources()]
        assert len(set(srcs)) == 4 and len(srcs) == 7  # 3 processes' ranges, split around the 2 rows of the retry
        for name in ("a", "b"):  # every row usable now: plain covariance of everything
            x = values[name][1].astype(np.float64)
            np.testing.assert_allclose(f[f"{L.stats(name)}/text_cov"][:], np.cov(x, rowvar=False), atol=1e-5)
            np.testing.assert_allclose(f[f"{L.stats(name)}/text_mean"][:], x.mean(0), atol=1e-6)


# -- format 1 ----------------------------------------------------------------------------------------------------
def _to_format_1(src: Path, dst: Path) -> None:
    """What this package wrote before format 2: every dataset real, inside the one file."""
    with h5py.File(src, "r") as a, h5py.File(dst, "w") as b:
        b.attrs.update({k: v for k, v in a.attrs.items() if k not in (L.Root.SEGMENTS, L.Root.FIRST_RUN)})
        b.attrs[L.Root.VERSION] = 1
        b.create_dataset(L.KEYS, data=a[L.KEYS][:], dtype=h5py.string_dtype("utf-8"))
        if L.VIEW_PARAMS in a:
            b.create_dataset(L.VIEW_PARAMS, data=a[L.VIEW_PARAMS][:], chunks=(8, *a[L.VIEW_PARAMS].shape[1:]))
            b[L.VIEW_PARAMS].attrs.update(a[L.VIEW_PARAMS].attrs)
        if L.BAD in a:
            a.copy(a[L.BAD], b, L.BAD)
        b.create_group(L.TEACHERS)
        for name, g in a[L.TEACHERS].items():
            meta = {
                "attrs": {k: v for k, v in g.attrs.items() if k not in (L.SINCE_RUN, L.FOLDED)},
                "dtype": str(g.attrs["dtype"]),
                "h5_chunk_rows": 8,
            }
            h = W._ensure_group(b, name, meta)
            for what in ("image", "text", "done"):
                h[what][...] = g[what][:]
            a.copy(g[L.STATS], h, L.STATS)


def test_a_format_1_file_still_reads_trains_and_resumes(
    tmp_path, tiny_corpus, tiny_teachers, tiny_cache, tiny_tokenizer
):
    old = tmp_path / "v1.h5"
    _to_format_1(tiny_cache, old)
    ref = _state(tiny_cache)
    with h5py.File(old, "r") as f:
        assert int(f.attrs[L.Root.VERSION]) == 1 and not f[L.feature("oc", "image")].is_virtual
    _assert_equal_to(old, ref)
    with FeatureReader(str(old), block_rows=8) as r:
        np.testing.assert_allclose(r.read([7, 3])["hf"]["text"], ref["teachers"]["hf"]["text"][[7, 3]], atol=ATOL)
    assert verify(str(old), progress=False).ok

    with h5py.File(old, "r+") as f:  # a killed old run: the last rows of oc still to do
        f[L.done("oc")][28:] = False
        del f[L.stats("oc")]
    summary = build_cache(
        CacheJob(
            data=str(tiny_corpus),
            teachers=tiny_teachers,
            out=str(old),
            batch_size=16,
            num_workers=0,
            device="cpu",
            views=2,
            progress=False,
        )
    )
    assert summary.teachers["oc"].computed == 4 and summary.teachers["hf"].computed == 0
    with h5py.File(old, "r") as f:  # resumed the old way: rows copied into its own datasets
        assert int(f.attrs[L.Root.VERSION]) == 1 and not f[L.feature("oc", "image")].is_virtual
    _assert_equal_to(old, ref)
    assert list_segments(segment_dir(str(old))) == []  # the run's segment, copied in, is gone
    train(
        tiny_config(
            tiny_corpus, tmp_path / "run", old, tokenizer=tiny_tokenizer, train__max_steps=2, train__checkpoint_every=2
        )
    )
    assert (tmp_path / "run" / "checkpoint-2").is_dir()
