"""A feature cache never stores, and training never silently trains on, corrupt teacher features.

`distill cache` refuses non-finite / zero / non-unit embeddings (recorded as bad samples naming the teacher);
new files carry HDF5 fletcher32 checksums; `distill info --verify` names teacher, modality and rows of every
damaged row; training stops on bad rows (or skips them with data.bad_features=skip); truncated files and
interrupted runs are described in one honest line.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from train_fixtures import load_weights, tiny_tokenizer  # noqa: F401  (fixture)

import cache.store.writer as W
from cache.build.run import CacheJob, build_cache
from cache.inspect import info
from cache.store.reader import FeatureReader
from cache.store.schema import CacheError
from cache.store.segments import copy_cache
from cache.store.verify import BadRowsError, format_rows, verify
from distill.cli import main
from distill.config.train_config import ConfigError, DataCfg
from distill.data.loader import Collate

ROOT = Path(__file__).resolve().parents[1]
CHUNK = 8  # HDF5 chunk rows of the test cache: 4 chunks over the 32 rows, so a damaged chunk names 8 rows

BAD_TEACHER = """
import torch
from teachers import load_teacher

SPEC = {spec!r}


def zero_image(images):  # the brightest images of the tiny corpus (rows 6, 19, 28, 29)
    return images.flatten(1).mean(1) > -0.6


def nan_text(caption):  # rows 9, 14, 15
    return caption.startswith("mri") and "cross" in caption


def make(device="cpu"):
    t = load_teacher(SPEC, device=device)
    tok, img, txt, flags = t.tokenize, t._image_features, t._text_features, []

    def tokenize(texts):
        flags[:] = [nan_text(c) for c in texts]
        return tok(texts)

    def text_features(tokens):
        x = txt(tokens)
        return torch.where(torch.tensor(flags[:len(x)])[:, None], torch.full_like(x, float("nan")), x)

    def image_features(images):
        x = img(images)
        return torch.where(zero_image(images)[:, None], torch.zeros_like(x), x)

    t.tokenize, t._text_features, t._image_features = tokenize, text_features, image_features
    return t
"""


@pytest.fixture()
def bad_teacher(tmp_path, tiny_teachers, monkeypatch) -> str:
    """`py:` SPEC of the tiny open_clip teacher giving zero image and NaN text embeddings for some rows."""
    (tmp_path / "bad_teacher_mod.py").write_text(BAD_TEACHER.format(spec=tiny_teachers["oc"]))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "py:bad_teacher_mod:make"


@pytest.fixture(scope="session")
def checked_cache(tiny_corpus, tiny_teachers, tmp_path_factory) -> Path:
    """Both tiny teachers, float32, 8-row HDF5 chunks (so one damaged chunk is 8 named rows of 1-1.3 KiB)."""
    out = tmp_path_factory.mktemp("integrity") / "features.h5"
    build_cache(
        CacheJob(
            data=str(tiny_corpus),
            teachers=tiny_teachers,
            out=str(out),
            batch_size=16,
            num_workers=0,
            device="cpu",
            dtype="float32",
            h5_chunk_rows=CHUNK,
            progress=False,
        )
    )
    return out


def _copy(src: Path, dst: Path) -> Path:
    """The cache file and its segment folder (format 2: the features live there)."""
    copy_cache(str(src), str(dst))
    return dst


def _flip_chunk(path: Path, dataset: str, chunk_index: int, nbytes: int = 1024) -> range:
    """Flip `nbytes` (at most the chunk) in the middle of one stored chunk; returns the chunk's rows. A virtual
    dataset's chunk is its segment's (one process, one run: slot = row)."""
    target = path
    with h5py.File(path, "r") as f:
        if f[dataset].is_virtual:
            (src,) = {vs.file_name for vs in f[dataset].virtual_sources()}
            target = path.parent / src
    with h5py.File(target, "r") as f:
        ds = f[dataset]
        info = ds.id.get_chunk_info(chunk_index)
        rows = range(info.chunk_offset[0], min(ds.shape[0], info.chunk_offset[0] + ds.chunks[0]))
        offset, size = info.byte_offset, info.size
    n = min(nbytes, size - 8)
    start = offset + (size - n) // 2
    with open(target, "r+b") as fh:
        fh.seek(start)
        data = bytearray(fh.read(n))
        fh.seek(start)
        fh.write(bytes(b ^ 0xFF for b in data))
    return rows


def _nan_every_7th(path: Path, teacher: str = "oc", what: str = "image") -> list[int]:
    with h5py.File(path, "r+") as f:
        ds = f[f"teachers/{teacher}/{what}"]
        x = ds[:]
        x[::7] = np.nan
        ds[...] = x
    return list(range(0, 32, 7))


# -- 1. distill cache refuses non-finite / zero embeddings ------------------------------------------------------
def test_cache_records_a_teachers_nan_and_zero_rows_as_bad_and_never_done(
    tmp_path, tiny_corpus, tiny_teachers, bad_teacher
):
    out = tmp_path / "f.h5"
    summary = build_cache(
        CacheJob(
            data=str(tiny_corpus),
            teachers={"oc": tiny_teachers["oc"], "x": bad_teacher},
            out=str(out),
            batch_size=8,
            chunk_rows=8,
            num_workers=0,
            device="cpu",
            progress=False,
        )
    )
    zero_rows, nan_rows = [6, 19, 28, 29], [9, 14, 15]
    with h5py.File(out, "r") as f:
        bad = dict(zip(f["bad/rows"][:].tolist(), f["bad/reasons"].asstr()[:].tolist()))
        assert sorted(bad) == sorted(zero_rows + nan_rows)
        assert all(bad[r] == "teacher 'x' gave a zero-norm image embedding" for r in zero_rows)
        assert all(bad[r] == "teacher 'x' gave a non-finite text embedding" for r in nan_rows)
        done_x, done_oc = f["teachers/x/done"][:], f["teachers/oc/done"][:]
        assert not done_x[sorted(bad)].any() and done_x.sum() == 32 - 7
        assert done_oc.all()  # the other teacher's rows are fine, and a good teacher never lifts x's records
        stored = f["teachers/x/image"][:][done_x].astype(np.float32)
        assert np.isfinite(stored).all() and np.allclose(np.linalg.norm(stored, axis=-1), 1, atol=2e-3)
        assert "stats" in f["teachers/x"] and int(f["teachers/x/stats"].attrs["count"]) == 25
    assert summary.teachers["x"].skipped == 7 and summary.teachers["x"].done == 25
    # a rerun (even one retrying bad rows) gets the same refusals: nothing is ever stored as done
    build_cache(
        CacheJob(
            data=str(tiny_corpus),
            teachers={"oc": tiny_teachers["oc"], "x": bad_teacher},
            out=str(out),
            batch_size=8,
            num_workers=0,
            device="cpu",
            progress=False,
            retry_bad=True,
        )
    )
    with h5py.File(out, "r") as f:
        assert sorted(f["bad/rows"][:].tolist()) == sorted(zero_rows + nan_rows)
        assert f["teachers/x/done"][:].sum() == 25
    assert verify(str(out), progress=False).ok


# -- 2. fletcher32 on new files, identical reads, old files still read --------------------------------------------
def test_new_files_have_checksums_and_read_identically(checked_cache):
    with h5py.File(checked_cache, "r") as f:
        raw = {t: {m: f[f"teachers/{t}/{m}"][:] for m in ("image", "text")} for t in ("oc", "hf")}
        for t in raw:  # format 2: virtual datasets over segment files, each chunk of which carries fletcher32
            for m in ("image", "text"):
                ds = f[f"teachers/{t}/{m}"]
                (src,) = {vs.file_name for vs in ds.virtual_sources()}
                with h5py.File(checked_cache.parent / src, "r") as seg:
                    assert seg[f"teachers/{t}/{m}"].fletcher32 and seg[f"teachers/{t}/{m}"].chunks[0] == CHUNK
    rows = np.array([31, 0, 9, 9, 17, 3, 30])
    for block_rows in (0, CHUNK, 2 * CHUNK):
        with FeatureReader(str(checked_cache), block_rows=block_rows) as r:
            got = r.read(rows)
            for t in raw:
                for m in ("image", "text"):
                    np.testing.assert_array_equal(got[t][m], raw[t][m][rows].astype(np.float32))


def test_an_old_file_without_checksums_still_reads_and_verifies(tmp_path, checked_cache):
    old = _copy(checked_cache, tmp_path / "old.h5")
    with h5py.File(old, "r+") as f:  # rewrite one teacher's datasets as files written before checksums were
        for m in ("image", "text"):
            x, chunks = f[f"teachers/oc/{m}"][:], f[f"teachers/oc/{m}"].chunks
            del f[f"teachers/oc/{m}"]
            f.create_dataset(f"teachers/oc/{m}", data=x, chunks=chunks)
            assert not f[f"teachers/oc/{m}"].fletcher32
    with FeatureReader(str(old)) as r, h5py.File(checked_cache, "r") as f:
        np.testing.assert_array_equal(r.read([0, 5])["oc"]["text"], f["teachers/oc/text"][[0, 5]])
    report = verify(str(old), progress=False)
    assert report.ok and "no checksums in this (older) file" in str(report)


# -- 3. distill info --verify ---------------------------------------------------------------------------------------
def test_verify_passes_a_clean_file(checked_cache, capsys):
    assert main(["info", "--verify", str(checked_cache)]) == 0
    out = capsys.readouterr().out
    assert "verified: 32 rows x 2 teachers OK (checksums, finite, unit-norm" in out


def test_verify_names_the_teacher_and_rows_of_a_damaged_chunk(tmp_path, checked_cache, capsys):
    path = _copy(checked_cache, tmp_path / "flipped.h5")
    rows = _flip_chunk(path, "teachers/hf/text", 2)  # 8 rows x 40 x 4 bytes: 1 KiB of its 1280 bytes flipped
    assert list(rows) == list(range(16, 24))
    assert main(["info", "--verify", str(path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"{path}: 1 problem(s) found"
    assert (
        err[1] == "  teacher 'hf' text rows 16-23: checksum mismatch (the bytes changed on disk after they "
        "were written)"
    )
    assert "del f['teachers/hf']" in err[2] and "--retry-bad` cannot repair" in err[2]
    # without checksums the same flip would be finite garbage: the reader refuses it instead of returning it
    with FeatureReader(str(path)) as r:
        assert r.read([0, 15])["hf"]["text"].shape == (2, 40)  # the other chunks still read
        with pytest.raises(BadRowsError, match=r"teacher 'hf' text features of cache rows 20 are unreadable"):
            r.read([3, 20])  # the rows asked for that fall in the damaged chunk


def test_verify_names_every_nan_row(tmp_path, checked_cache, capsys):
    path = _copy(checked_cache, tmp_path / "nan.h5")
    _nan_every_7th(path)
    assert main(["info", "--verify", str(path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[1] == "  teacher 'oc' image rows 0, 7, 14, 21, 28: non-finite values (NaN/inf)"
    assert len(err) == 3  # one line per problem, then what to do


def test_verify_flags_finite_values_that_are_not_unit_vectors(tmp_path, checked_cache):
    path = _copy(checked_cache, tmp_path / "scaled.h5")
    with h5py.File(path, "r+") as f:
        f["teachers/hf/image"][3] = f["teachers/hf/image"][3] * 3e4
        f["teachers/hf/image"][4] = 0
    [p] = verify(str(path), progress=False).problems
    assert (p.teacher, p.modality, p.kind, p.rows.tolist()) == ("hf", "image", "not unit-norm", [3, 4])


def test_format_rows_gives_ranges():
    assert format_rows([5, 1, 2, 3, 9]) == "1-3, 5, 9"
    assert format_rows(range(0, 40, 2), limit=3) == "0, 2, 4, ... (20 rows in all)"


# -- 4. training never trains on bad rows silently --------------------------------------------------------------
def _error_line(capsys, command: str = "train") -> str:
    """The one `distill COMMAND: error:` line of stderr (a tqdm bar may share stderr)."""
    err = capsys.readouterr().err
    lines = [
        line[line.index(f"distill {command}:") :]
        for line in err.replace("\r", "\n").splitlines()
        if f"distill {command}:" in line
    ]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    return lines[0]


def _train_argv(corpus, features, out, tokenizer, *extra):
    return [
        "train",
        "--config",
        str(ROOT / "configs" / "tiny-hybrid.yaml"),
        f"data.corpus={corpus}",
        f"data.features={features}",
        f"train.output_dir={out}",
        f"student.tokenizer_dir={tokenizer}",
        "train.max_steps=4",
        "train.checkpoint_every=0",
        "data.sampler=random",
        *extra,
    ]


def test_training_stops_on_nan_rows_naming_teacher_and_rows(
    tmp_path, tiny_corpus, checked_cache, tiny_tokenizer, capsys
):
    path = _copy(checked_cache, tmp_path / "nan.h5")
    _nan_every_7th(path)
    code = main(_train_argv(tiny_corpus, path, tmp_path / "run", tiny_tokenizer))
    err = _error_line(capsys)
    assert code == 2
    assert err.startswith(f"distill train: error: {path}: teacher 'oc' image features of cache rows ")
    assert "are non-finite; run `distill info --verify" in err and "data.bad_features=skip" in err
    assert not list((tmp_path / "run").glob("checkpoint-*"))


def test_a_bad_row_found_in_a_dataloader_worker_is_the_same_one_line(
    tmp_path, tiny_corpus, checked_cache, tiny_tokenizer, capsys
):
    """PyTorch re-raises a worker's error with the worker's traceback as its text; the message stays one line."""
    path = _copy(checked_cache, tmp_path / "nan.h5")
    _nan_every_7th(path)
    assert main(_train_argv(tiny_corpus, path, tmp_path / "run", tiny_tokenizer, "data.num_workers=1")) == 2
    err = _error_line(capsys)
    assert re.fullmatch(
        rf"distill train: error: {re.escape(str(path))}: teacher 'oc' image features of cache rows "
        r"[0-9, -]+ are non-finite; run `distill info --verify .*` to list every bad row, then "
        r"restore the file or rebuild that teacher, or set data.bad_features=skip .*",
        err,
    ), err


def test_training_stops_on_a_checksum_failure(tmp_path, tiny_corpus, checked_cache, tiny_tokenizer, capsys):
    path = _copy(checked_cache, tmp_path / "flipped.h5")
    _flip_chunk(path, "teachers/hf/text", 1)
    assert main(_train_argv(tiny_corpus, path, tmp_path / "run", tiny_tokenizer)) == 2
    err = _error_line(capsys)
    m = re.search(
        rf"{re.escape(str(path))}: teacher 'hf' text features of cache rows ([0-9, -]+) are unreadable "
        r"\(checksum mismatch",
        err,
    )
    assert m, err
    named = [int(x) for part in m.group(1).split(", ") for x in part.split("-")]
    assert named and all(8 <= r < 16 for r in named)  # the batch's rows in the damaged chunk


def test_skip_trains_without_the_bad_teacher_rows_and_counts_them(
    tmp_path, tiny_corpus, checked_cache, tiny_tokenizer, caplog
):
    path = _copy(checked_cache, tmp_path / "nan.h5")
    nan_rows = _nan_every_7th(path)
    flipped = list(_flip_chunk(path, "teachers/hf/text", 1))
    out = tmp_path / "run"
    with caplog.at_level("WARNING", logger="distill.data.loader"):
        assert main(_train_argv(tiny_corpus, path, out, tiny_tokenizer, "data.bad_features=skip")) == 0
    weights = load_weights(out / "checkpoint-4")
    assert all(torch.isfinite(w).all() for w in weights.values())
    skips = [r.getMessage() for r in caplog.records if "data.bad_features=skip" in r.getMessage()]
    assert skips and "pair(s) so far" in skips[-1]
    so_far = int(re.search(r"\((\d+) pair\(s\) so far", skips[-1]).group(1))
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert so_far > 0 and logged[-1]["skipped_features"] == so_far  # one process: the log's total is its count

    # the same Collate on every row: exactly the damaged (teacher, row) pairs are dropped, nothing NaN survives
    collate = Collate(
        lambda caps: torch.zeros(len(caps), 4, dtype=torch.long), str(path), ["oc", "hf"], bad_features="skip"
    )
    batch = collate(
        [{"image": torch.zeros(3, 4, 4), "caption": "c", "row": r, "cache_row": r, "view": -1} for r in range(32)]
    )
    assert batch.skipped_features == len(nan_rows) + len(flipped) == collate.skipped_total
    assert torch.equal(~batch.route[:, 0], torch.isin(torch.arange(32), torch.tensor(nan_rows)))
    assert torch.equal(~batch.route[:, 1], torch.isin(torch.arange(32), torch.tensor(flipped)))
    assert all(torch.isfinite(x).all() for p in batch.teacher_feats.values() for _, x in p.items())


def test_bad_features_option_is_validated():
    with pytest.raises(ConfigError, match="data.bad_features must be 'stop' or 'skip', got 'ignore'"):
        DataCfg(bad_features="ignore")


# -- 5. truncated or garbage files: one line naming the file --------------------------------------------------------
def test_training_on_a_truncated_cache_names_the_file(tmp_path, tiny_corpus, checked_cache, tiny_tokenizer, capsys):
    path = _copy(checked_cache, tmp_path / "trunc.h5")
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size // 2)
    assert main(_train_argv(tiny_corpus, path, tmp_path / "run", tiny_tokenizer)) == 2
    err = _error_line(capsys)
    assert err.startswith(f"distill train: error: {path} is damaged: HDF5 cannot read it (")
    assert "rebuild it with `distill cache`" in err and "restore it from a backup" in err


def test_cache_onto_a_truncated_file_is_refused_and_leaves_it(tmp_path, tiny_corpus, tiny_teachers, checked_cache):
    path = _copy(checked_cache, tmp_path / "trunc.h5")
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size // 2)
    before = path.read_bytes()
    with pytest.raises(CacheError, match=rf"^{re.escape(str(path))} is damaged: HDF5 cannot read it .*rebuild it"):
        build_cache(
            CacheJob(
                data=str(tiny_corpus),
                teachers=tiny_teachers,
                out=str(path),
                num_workers=0,
                device="cpu",
                progress=False,
            )
        )
    assert path.read_bytes() == before


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_info_on_a_damaged_file_is_one_line(tmp_path, checked_cache, capsys, damage):
    path = tmp_path / "f.h5"
    if damage == "truncated":
        _copy(checked_cache, path)
        with open(path, "r+b") as fh:
            fh.truncate(path.stat().st_size // 3)
    else:
        path.write_bytes(b"not an hdf5 file\n" * 100)
    for argv in (["info", str(path)], ["info", "--verify", str(path)]):
        assert main(argv) == 2
        assert _error_line(capsys, "info").startswith(f"distill info: error: {path} is damaged: HDF5 cannot read it")
    with pytest.raises(CacheError, match="is damaged"):
        FeatureReader(str(path))


# -- 6. an honest pending line after a kill before the first commit ---------------------------------------------
def test_info_after_a_kill_before_the_first_commit(tmp_path, checked_cache):
    path = _copy(checked_cache, tmp_path / "f.h5")
    W.write_meta(str(path), "new", {"attrs": {}, "dtype": "float16"})  # what a run writes before its first part
    (Path(W.teacher_parts_dir(str(path), "new")) / ".tmp-123-part-0000000000-8-123.npz").write_bytes(b"PK half")
    text = info(str(path))
    assert "0 chunk(s)" not in text
    assert text.splitlines()[-1] == (
        "pending: a `distill cache` run for new started but committed no chunk yet (it "
        "was interrupted before its first commit); rerun the same command to resume "
        "(nothing committed was lost)"
    )
    W.write_part(str(path), "new", np.array([0, 1]), np.zeros((2, 4)), np.zeros((2, 4)))
    assert (
        info(str(path)).splitlines()[-1].startswith("pending: committed chunks not yet folded in for new (1 chunk(s))")
    )
