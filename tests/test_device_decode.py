"""data.decode=device: JPEGs leave the workers compressed and are decoded, cropped and resized on the training device.

On a CPU machine the "device" is the CPU, through the same code (torchvision's decode_jpeg); the tests check the
crops equal the worker path's, the pixels differ only by resampling, other formats fall back, and training runs.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from train_fixtures import read_log, tiny_config, tiny_tokenizer  # noqa: F401  (fixture)

import distill.data.loader
from cache.sources.corpus import open_corpus
from cache.sources.image_decode import BadSampleError, DecodeLimits, jpeg_size
from distill.data.device_decode import EncodedImages, decode_into
from distill.data.loader import Collate, DataError, PairDataset, make_uint8_view_transform
from distill.train import train
from teachers.transforms import PreprocessCfg, apply_view, view_box


def _photo(seed: int, w: int, h: int) -> Image.Image:
    """A smooth image (JPEG-friendly): gradients plus a few blobs."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    chans = [np.sin(x * rng.uniform(2, 6) + rng.uniform(0, 3)) + np.cos(y * rng.uniform(2, 6)) for _ in range(3)]
    arr = ((np.stack(chans, -1) + 2) / 4 * 255).clip(0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture(scope="module")
def jpeg_corpus(tmp_path_factory) -> Path:
    """24 JPEGs of varied sizes, 4 PNGs and one CMYK JPEG (the last two decoded in the workers)."""
    root = tmp_path_factory.mktemp("jpegs")
    (root / "images").mkdir()
    rows = []
    for i in range(29):
        img = _photo(i, 40 + 7 * (i % 5), 36 + 5 * (i % 4))
        name = f"images/{i}.{'png' if i >= 24 and i < 28 else 'jpg'}"
        if i == 28:
            img.convert("CMYK").save(root / name, "JPEG")
        else:
            img.save(root / name, "PNG" if name.endswith("png") else "JPEG", quality=95)
        rows.append({"image": name, "caption": f"scan number {i} of the chest", "key": f"k{i}"})
    with open(root / "corpus.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["image", "caption", "key"])
        w.writeheader()
        w.writerows(rows)
    return root / "corpus.csv"


def test_jpeg_size_reads_the_header_and_refuses_what_the_workers_must_decode():
    img = _photo(0, 50, 30)
    assert jpeg_size(_jpeg(img), "k", "here") == (50, 30)
    assert jpeg_size(_jpeg(img.convert("L")), "k", "here") == (50, 30)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    assert jpeg_size(buf.getvalue(), "k", "here") is None  # not a JPEG: PIL decodes it in the worker
    cmyk = io.BytesIO()
    img.convert("CMYK").save(cmyk, "JPEG")
    assert jpeg_size(cmyk.getvalue(), "k", "here") is None
    assert jpeg_size(b"\xff\xd8 not really", "k", "here") is None  # PIL reports it, with its reason
    with pytest.raises(BadSampleError, match="pixel"):
        jpeg_size(_jpeg(img), "k", "here", DecodeLimits(max_pixels=100))


def test_view_box_rounds_as_apply_view():
    img = _photo(1, 53, 41)
    for params in ([0, 0, 1, 1, 0], [0.13, 0.27, 0.61, 0.5, 0], [0.9, 0.95, 0.4, 0.4, 1]):
        left, top, right, bottom = view_box(params, 53, 41)
        assert apply_view(img, params).size == (right - left, bottom - top)


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_device_decoded_views_equal_the_worker_s_up_to_resampling(interpolation):
    cfg = PreprocessCfg(image_size=(32, 32), interpolation=interpolation)
    worker = make_uint8_view_transform(cfg)
    params = [[0, 0, 1, 1, 0], [0.1, 0.2, 0.7, 0.6, 1], [0.5, 0.4, 0.3, 0.5, 0], [0.05, 0.3, 0.9, 0.7, 0]]
    imgs = [_photo(i, 64 + 8 * i, 48 + 4 * i) for i in range(len(params))]
    data = [torch.frombuffer(bytearray(_jpeg(im)), dtype=torch.uint8) for im in imgs]
    out = torch.zeros(len(params) + 1, 3, 32, 32, dtype=torch.uint8)
    decode_into(out, EncodedImages(data, params, [0, 2, 3, 4]), interpolation)
    assert out[1].eq(0).all()  # positions not in the index are left alone
    for i, j in zip(range(len(params)), [0, 2, 3, 4]):
        ref = worker(Image.open(io.BytesIO(_jpeg(imgs[i]))), params[i]).float()
        diff = (out[j].float() - ref).abs()
        assert diff.mean() < 2.0, (i, diff.mean())  # same crop and flip: only the resampling differs
        other = worker(
            Image.open(io.BytesIO(_jpeg(imgs[i]))),
            [1 - params[i][0] - params[i][2], params[i][1], params[i][2], params[i][3], 1 - params[i][4]],
        )
        if not torch.equal(other, ref.to(torch.uint8)):  # a different crop would be caught
            assert (out[j].float() - other.float()).abs().mean() > 4 * diff.mean()


def test_a_jpeg_that_cannot_be_decoded_names_its_rows():
    bad = torch.frombuffer(bytearray(b"\xff\xd8\xff\xe0" + b"\x00" * 64), dtype=torch.uint8)
    with pytest.raises(ValueError, match="corpus rows 7"):
        decode_into(
            torch.zeros(1, 3, 8, 8, dtype=torch.uint8),
            EncodedImages([bad], [[0, 0, 1, 1, 0]], [0]),
            "bilinear",
            rows=[7],
        )


def test_dataset_sends_jpegs_encoded_with_the_worker_s_crop_and_decodes_the_rest(jpeg_corpus):
    corpus = open_corpus(str(jpeg_corpus))
    pp = PreprocessCfg(image_size=(24, 24))
    kw = dict(crop_scale=(0.5, 1.0), flip=True, seed=3)
    dev, cpu = PairDataset(corpus, pp, decode="device", **kw), PairDataset(corpus, pp, **kw)
    items = [dev[(1, i)] for i in range(len(corpus))]
    assert [("encoded" in it) for it in items] == [True] * 24 + [False] * 5  # PNGs and the CMYK JPEG: decoded here
    collate = Collate(lambda texts: torch.zeros(len(texts), 4, dtype=torch.long))
    batch = collate(items)
    assert batch.encoded is not None and batch.encoded.index == list(range(24))
    decoded = batch.decoded(pp.interpolation)
    assert decoded.encoded is None
    ref = torch.stack([cpu[(1, i)]["image"] for i in range(len(corpus))])
    assert torch.equal(decoded.images[24:], ref[24:])
    diff = (decoded.images[:24].float() - ref[:24].float()).abs().mean((1, 2, 3))
    assert diff.max() < 3.0, diff  # the same random crops, drawn from the header's size
    with pytest.raises(DataError, match="corpus rows"):
        broken = collate(items[:2])
        broken.encoded.data[0] = torch.frombuffer(bytearray(b"\xff\xd8\xff\xe0" + b"\x00" * 64), dtype=torch.uint8)
        broken.decoded(pp.interpolation)


def test_training_with_device_decoding_matches_worker_decoding(jpeg_corpus, tiny_tokenizer, tmp_path, monkeypatch):
    calls = []
    real = distill.data.loader.decode_into
    monkeypatch.setattr(
        distill.data.loader, "decode_into", lambda images, enc, *a: calls.append(len(enc)) or real(images, enc, *a)
    )
    first = {}
    for decode in ("worker", "device"):
        out = tmp_path / decode
        cfg = tiny_config(
            jpeg_corpus,
            out,
            None,
            mode="contrastive",
            tokenizer=tiny_tokenizer,
            data__decode=decode,
            data__num_workers=1,
            data__batch_size=8,
            train__max_steps=6,
            train__checkpoint_every=0,
            train__log_every=1,
        )
        train(cfg)
        first[decode] = [r["loss"] for r in read_log(out)]
    assert len(first["device"]) == 6 and len(calls) == 6 and min(calls) >= 6  # every batch: its JPEGs on device
    assert np.allclose(first["device"], first["worker"], atol=0.05), first  # the same crops, resampled alike
