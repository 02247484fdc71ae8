"""Image bombs and oversized JPEGs: a pixel limit checked before decoding, and reduced JPEG decodes (issue 8)."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
import textwrap
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
from hostile_images import png_bomb
from PIL import Image, ImageFile

from cache.build.image_rows import ImageRows, teacher_inputs
from cache.sources.corpus import open_corpus
from cache.sources.image_decode import BadSampleError, DecodeLimits, decode_image
from distill.cli import _pixels, build_parser, main
from distill.config.train_config import DataCfg
from distill.data.loader import DataError, PairDataset
from teachers import load_teacher
from teachers.transforms import PreprocessCfg

BOMB_REASON = "image is 12000x12000 = 144 Mpx, over the 64 Mpx limit (--max-pixels)"
ROOT = Path(__file__).resolve().parents[1]


def _corpus_with_bomb(tmp_path: Path) -> Path:
    """Three small PNG rows and, as row 2, a 17 KB PNG claiming 12000 x 12000 pixels."""
    (tmp_path / "bomb.png").write_bytes(png_bomb())
    for i in (0, 2, 3):
        Image.new("RGB", (40, 30), (60 * i, 20, 200)).save(tmp_path / f"ok{i}.png")
    rows = [
        "image,caption,key",
        "ok0.png,a red one,k0",
        "bomb.png,the bomb,k1",
        "ok2.png,a blue one,k2",
        "ok3.png,a green one,k3",
    ]
    (tmp_path / "corpus.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "corpus.csv"


def test_a_png_bomb_is_a_recorded_bad_sample_and_is_never_decoded(tmp_path, tiny_teachers, monkeypatch, capsys):
    """`distill cache` records the 144 Mpx PNG as bad with the size and the flag in the reason; no pixel of it is
    decoded (ImageFile.load never runs on a 12000 x 12000 image) and the other rows are cached."""
    assert len(png_bomb()) < 20_000
    corpus = _corpus_with_bomb(tmp_path)
    loaded_sizes = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loaded_sizes.append(self.size) or real_load(self))
    out = tmp_path / "f.h5"
    rc = main(
        [
            "cache",
            "--data",
            str(corpus),
            "--teacher",
            f"oc={tiny_teachers['oc']}",
            "--out",
            str(out),
            "--num-workers",
            "0",
            "--device",
            "cpu",
            "--batch-size",
            "2",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    assert (12000, 12000) not in loaded_sizes and (40, 30) in loaded_sizes
    with h5py.File(out, "r") as f:
        assert f["bad/rows"][:].tolist() == [1]
        assert f["bad/keys"].asstr()[:].tolist() == ["k1"]
        assert f["bad/reasons"].asstr()[:].tolist() == [BOMB_REASON]
        assert f["teachers/oc/done"][:].tolist() == [True, False, True, True]


def test_the_bomb_costs_no_memory_in_a_fresh_process():
    """Peak RSS grows by far less than the decoded image (144 MB as mode L, 432 MB as RGB) while refusing it."""
    script = textwrap.dedent(f"""
        import resource, sys
        sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / "tests")!r}]
        from cache.sources.image_decode import BadSampleError, decode_image
        from hostile_images import png_bomb
        data = png_bomb()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            decode_image(data, None, "k", "here")
        except BadSampleError as e:
            print(e.reason)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)  # KiB -> MiB (Linux)
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    reason, grown_mib = res.stdout.strip().splitlines()
    assert reason == BOMB_REASON
    assert int(grown_mib) < 20


def test_pil_limits_become_bad_samples_without_a_warning():
    """With --max-pixels 0 PIL's own limit applies: its warning level is a bad sample (no warning escapes), and its
    hard DecompressionBombError is one too."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a DecompressionBombWarning reaching us would fail the test
        with pytest.raises(BadSampleError) as e:
            decode_image(png_bomb(), None, "k", "here", DecodeLimits(max_pixels=None))
    assert e.value.reason == "image is 12000x12000 = 144 Mpx, over the 89 Mpx limit (PIL's Image.MAX_IMAGE_PIXELS)"
    with pytest.raises(
        BadSampleError,
        match=r"^here: image over PIL's decompression-bomb limit \(Image size "
        r"\(400000000 pixels\)",
    ):
        decode_image(png_bomb(20000, 20000), None, "k", "here", DecodeLimits(max_pixels=10**9))


def test_max_pixels_flag_reaches_the_cache(tmp_path, tiny_corpus, tiny_teachers, capsys):
    """`--max-pixels 2000` makes every 48 x 48 (2304 px) image of the tiny corpus bad; 64M is the default."""
    args = build_parser().parse_args(["cache", "--data", "x", "--teacher", "a=b", "--out", "o"])
    assert args.max_pixels == 64_000_000
    assert _pixels("64M") == 64_000_000 and _pixels("1500") == 1500 and _pixels("0") == 0
    out = tmp_path / "f.h5"
    rc = main(
        [
            "cache",
            "--data",
            str(tiny_corpus),
            "--teacher",
            f"oc={tiny_teachers['oc']}",
            "--out",
            str(out),
            "--num-workers",
            "0",
            "--device",
            "cpu",
            "--max-pixels",
            "2000",
        ]
    )
    err = capsys.readouterr().err  # every row bad is an error naming the commonest reason; the records are kept
    assert rc == 2 and "every row is bad samples" in err and "over the 0.002 Mpx limit (--max-pixels)" in err, err
    with h5py.File(out, "r") as f:
        reasons = set(f["bad/reasons"].asstr()[:].tolist())
        assert len(f["bad/rows"]) == 32 and not f["teachers/oc/done"][:].any()
    assert reasons == {"image is 48x48 = 0.0023 Mpx, over the 0.002 Mpx limit (--max-pixels)"}
    with pytest.raises(SystemExit) as e:
        main(["cache", "--data", str(tiny_corpus), "--teacher", "a=b", "--out", str(out), "--max-pixels", "lots"])
    assert e.value.code == 2
    assert "expected a pixel count such as 64000000 or 64M, got 'lots'" in capsys.readouterr().err


def _jpeg(size, color=(120, 30, 200)) -> bytes:
    img = Image.radial_gradient("L").resize(size).convert("RGB")
    img.paste(color, (0, 0, size[0] // 3, size[1] // 3))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_large_jpegs_are_drafted_and_small_ones_are_decoded_exactly():
    """A 1600 x 1200 JPEG for a 224 target decodes at 1/4 scale (400 x 300, shorter side still >= 224); a JPEG
    under twice the target, and any PNG, decode to exactly the pixels of a plain full decode."""
    limits = DecodeLimits(draft_side=224)
    big = decode_image(_jpeg((1600, 1200)), None, "k", "here", limits)
    assert big.size == (400, 300) and big.mode == "RGB"
    assert decode_image(_jpeg((1600, 1200)), None, "k", "here").size == (1600, 1200)  # no target: full decode
    small = _jpeg((447, 600))  # shorter side 447 < 2 x 224
    plain = Image.open(io.BytesIO(small)).convert("RGB")
    got = decode_image(small, None, "k", "here", limits)
    assert got.size == (447, 600) and got.tobytes() == plain.tobytes()
    buf = io.BytesIO()
    Image.new("RGB", (1000, 900), (1, 2, 3)).save(buf, format="PNG")
    assert decode_image(buf.getvalue(), None, "k", "here", limits).size == (1000, 900)


def test_the_draft_target_is_the_largest_input_any_teacher_needs(tiny_corpus, tiny_teachers):
    """Tiny teachers take 32 px inputs: the cache drafts to 32 (eval transform) or 53 with stored views (a view
    crop keeps at least sqrt(0.5 * 3/4) of a side); the limit passed to ImageRows is the corpus's."""
    teachers = {name: load_teacher(spec) for name, spec in tiny_teachers.items()}
    corpus = open_corpus(tiny_corpus)
    rows = np.arange(4)
    for views, side in ((False, 32), (True, 53)):
        inputs = teacher_inputs(teachers, views)
        ds = ImageRows(corpus, rows, np.ones((4, len(inputs)), bool), inputs, max_pixels=1234)
        assert ds.corpus.limits == DecodeLimits(1234, draft_side=side)
    assert corpus.limits == DecodeLimits()  # the caller's corpus is not changed


def test_training_stops_on_a_bomb_naming_the_row_and_the_setting(tmp_path):
    """PairDataset decodes under data.max_pixels: a bomb row is a DataError naming the row and the setting, before
    decoding; the default student crops (scale >= 0.9) set the JPEG draft target."""
    corpus = open_corpus(_corpus_with_bomb(tmp_path))
    ds = PairDataset(corpus, PreprocessCfg(image_size=(224, 224)), max_pixels=DataCfg().max_pixels)
    assert ds.corpus.limits.draft_side == 273  # ceil(224 / sqrt(0.9 * 3/4)) = ceil(272.6)
    assert ds[0]["image"].shape == (3, 224, 224)
    with pytest.raises(
        DataError,
        match=r"corpus\.csv row 2 \(line 3\), key 'k1': image is 12000x12000 = 144 Mpx, "
        r"over the 64 Mpx limit \(data\.max_pixels\)",
    ):
        ds[1]
    with pytest.raises(ValueError, match="data.max_pixels must be >= 0"):
        DataCfg(max_pixels=-1)


def test_a_tar_member_too_large_for_any_image_within_the_limit_is_not_read(tmp_path):
    """With --max-pixels 1000 no image can take more than 8 bytes a pixel plus 16 MiB of metadata: a 17 MiB member
    is a bad sample before its bytes are read."""
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for name, data in (("big.png", bytes(17 << 20)), ("big.txt", b"a caption")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    corpus = open_corpus(tmp_path / "00000.tar").with_limits(DecodeLimits(max_pixels=1000))
    assert DecodeLimits(max_pixels=1000).max_bytes == 8000 + (16 << 20)
    with pytest.raises(
        BadSampleError,
        match=r"00000\.tar sample 'big': image member is 17 MiB, larger than any "
        r"image within the pixel limit \(--max-pixels\); not read",
    ):
        corpus.load_image(0)
