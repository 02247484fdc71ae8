"""Stored views: their distribution (crop scale and ratio, flips, colour jitter) drawn, stored and shown; the same
pixels for the student and every teacher; 5-column files of earlier versions; conflicting flags and configs."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import ColorJitter
from torchvision.transforms import functional as TF
from train_fixtures import ROOT, tiny_config

import cache.store.layout as L
import cache.store.writer as W
from cache import CacheError, CacheJob, build_cache, info, open_corpus
from cache.build.views import ViewDist, draw_view_params, read_view_dist
from cache.store.segments import copy_cache
from distill.cli import main
from distill.config.train_config import Config, ConfigError
from distill.data.loader import PairDataset
from distill.train import train
from distill.training.student_model import student_pixels
from teachers import load_teacher
from teachers.transforms import apply_view

COLOR_FLAGS = ["--views", "2", "--view-scale", "0.3,0.9", "--view-flip", "0.5", "--view-color", "0.5", "--seed", "5"]


def _job(data, teachers, out, **kw) -> CacheJob:
    return CacheJob(
        data=str(data),
        teachers=teachers,
        out=str(out),
        num_workers=0,
        batch_size=8,
        chunk_rows=16,
        progress=False,
        dtype="float32",
        **kw,
    )


@pytest.fixture(scope="module")
def color_cache(tiny_corpus, tiny_teachers, tmp_path_factory):
    """Both tiny teachers, 2 views per image drawn with every --view-* flag, built through the command line."""
    out = tmp_path_factory.mktemp("views") / "f.h5"
    teachers = [a for name, spec in tiny_teachers.items() for a in ("--teacher", f"{name}={spec}")]
    assert (
        main(
            [
                "cache",
                "--data",
                str(tiny_corpus),
                *teachers,
                "--out",
                str(out),
                "--num-workers",
                "0",
                "--batch-size",
                "8",
                "--dtype",
                "float32",
                "--device",
                "cpu",
                *COLOR_FLAGS,
            ]
        )
        == 0
    )
    return out


def test_the_distribution_is_drawn_as_asked():
    d = ViewDist(4, scale=(0.3, 0.6), ratio=(0.5, 2.0), flip_p=1.0, color=0.4, seed=3)
    assert d.problem() is None
    p = d.draw(300)
    assert p.shape == (300, 4, 8) and p.dtype == np.float32
    x0, y0, w, h, flip = (p[..., i] for i in range(5))
    fits = (w < 1) | (h < 1)  # the fallback (whole image) is the only box outside the scale range
    assert fits.mean() > 0.95 and ((w * h)[fits] >= 0.3 - 1e-5).all() and ((w * h)[fits] <= 0.6 + 1e-5).all()
    assert ((x0 + w <= 1 + 1e-6) & (y0 + h <= 1 + 1e-6)).all() and (flip == 1).all()
    factors = p[..., 5:]
    assert factors.min() >= 0.6 - 1e-6 and factors.max() <= 1.4 + 1e-6
    assert factors.min() < 0.65 and factors.max() > 1.35 and abs(factors.mean() - 1.0) < 0.02
    # the boxes of a seed do not depend on jitter; without it a file keeps the 5 columns of earlier versions
    plain = ViewDist(4, scale=(0.3, 0.6), ratio=(0.5, 2.0), flip_p=1.0, seed=3).draw(300)
    assert plain.shape == (300, 4, 5) and np.array_equal(plain, p[..., :5])
    assert (ViewDist(4).draw(300)[..., 4] == 0).all()  # no flips by default (laterality)
    assert 0.4 < draw_view_params(300, 4, flip_p=0.5)[..., 4].mean() < 0.6
    assert ViewDist.from_attrs(d.to_attrs(), 4) == d
    assert d.differences({"flip_p": 1.0, "color": 0.2, "scale": (0.3, 0.6)}) == ["--view-color 0.2"]
    for bad, why in [
        (dict(scale=(0.5, 1.2)), "--view-scale"),
        (dict(ratio=(2.0, 1.0)), "--view-ratio"),
        (dict(flip_p=1.5), "--view-flip"),
        (dict(color=-0.1), "--view-color"),
    ]:
        assert why in ViewDist(2, **bad).problem()


def test_colour_factors_change_pixels_as_torchvision_does():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8))
    box = [0.1, 0.2, 0.6, 0.7, 0.0]
    b, c, s = 1.3, 0.7, 1.5
    got = np.asarray(apply_view(img, box + [b, c, s]))
    cropped = apply_view(img, box)
    assert np.array_equal(np.asarray(apply_view(img, box + [1.0, 1.0, 1.0])), np.asarray(cropped))
    want = TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(cropped, b), c), s)
    assert np.array_equal(got, np.asarray(want)) and not np.array_equal(got, np.asarray(cropped))
    # torchvision's ColorJitter with these factors, in a draw whose order is ours (brightness, contrast, saturation)
    jitter = ColorJitter(brightness=(b, b), contrast=(c, c), saturation=(s, s))
    for seed in range(100):
        torch.manual_seed(seed)
        order = [
            int(i)
            for i in jitter.get_params(jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue)[0]
            if int(i) < 3
        ]
        if order == [0, 1, 2]:
            torch.manual_seed(seed)
            assert np.array_equal(got, np.asarray(jitter(cropped)))
            break
    else:
        pytest.fail("no seed gave ColorJitter's order brightness, contrast, saturation")
    bright = np.asarray(apply_view(img, box + [1.4, 1.0, 1.0])).astype(float)
    assert bright.mean() > np.asarray(cropped).astype(float).mean() * 1.2


def test_views_are_stored_with_their_distribution_and_replayed_for_student_and_teachers(
    color_cache, tiny_corpus, tiny_teachers
):
    with h5py.File(color_cache, "r") as f:
        params = f[L.VIEW_PARAMS][:]
        attrs = dict(f[L.VIEW_PARAMS].attrs)
        images = {t: f[L.feature(t, "image")][:] for t in tiny_teachers}
    want = ViewDist(2, scale=(0.3, 0.9), flip_p=0.5, color=0.5, seed=5)
    assert read_view_dist(str(color_cache)) == want and params.shape == (32, 2, 8)
    assert np.array_equal(params, want.draw(32))
    assert attrs[L.ViewAttrs.COLOR] == 0.5 and attrs[L.ViewAttrs.FLIP_P] == 0.5 and attrs[L.ViewAttrs.SEED] == 5
    assert list(attrs[L.ViewAttrs.SCALE]) == [0.3, 0.9] and int(attrs[L.ViewAttrs.VIEWS]) == 2
    assert attrs[L.ViewAttrs.LAYOUT] == "x0, y0, w, h, flip, brightness, contrast, saturation"
    assert set(np.unique(params[..., 4])) == {0, 1} and not np.allclose(params[..., 5:], 1.0)

    corpus = open_corpus(tiny_corpus)
    for name, spec in tiny_teachers.items():
        t = load_teacher(spec, "cpu")
        # the student, shown a stored view at this teacher's preprocessing, gets exactly the teacher's input
        ds = PairDataset(corpus, t.preprocess_cfg, view_params=params, view_dist=want)
        mean, std = torch.tensor(t.preprocess_cfg.mean), torch.tensor(t.preprocess_cfg.std)
        for i in (0, 7, 30):
            item = ds[(0, i)]
            k = item["view"]
            img = corpus.load_image(i)
            teacher_input = t.view_transform(img, params[i, k])
            assert torch.equal(student_pixels(item["image"][None], mean, std)[0], teacher_input)
            no_colour = t.view_transform(img, params[i, k, :5])
            assert not torch.equal(teacher_input, no_colour)  # the jitter is part of what both see
            np.testing.assert_allclose(images[name][i, k], t.encode_image(teacher_input[None])[0].numpy(), atol=1e-5)


def test_info_shows_the_views(color_cache, capsys):
    text = info(str(color_cache))
    line = next(x for x in text.splitlines() if x.startswith("views:"))
    assert line == (
        "views: 2 per image (seed 5): scale 0.3-0.9, ratio 0.75-1.33333, flip p 0.5, colour jitter "
        "S 0.5 (brightness, contrast, saturation); stored in /views/params (x0, y0, w, h, flip, "
        "brightness, contrast, saturation)"
    )
    assert main(["info", str(color_cache)]) == 0 and line in capsys.readouterr().out


def test_other_view_flags_are_refused_when_adding_a_teacher(color_cache, tiny_corpus, tiny_teachers, tmp_path):
    out = tmp_path / "f.h5"
    copy_cache(str(color_cache), str(out))  # the file and its segment folder
    with pytest.raises(CacheError) as e:
        build_cache(_job(tiny_corpus, {"x": tiny_teachers["oc"]}, out, views=2, view_flip=0.0, view_color=0.5))
    assert str(e.value) == (
        f"{out} stores views 2 per image (seed 5): scale 0.3-0.9, ratio 0.75-1.33333, flip p 0.5, colour jitter "
        "S 0.5 (brightness, contrast, saturation); this run asks --view-flip 0: rerun with --views 2 --view-scale "
        "0.3,0.9 --view-ratio 0.75,1.33333 --view-flip 0.5 --view-color 0.5 (or without --view-* flags), or write "
        "another file"
    )
    with h5py.File(out, "r") as f:
        assert "x" not in f[L.TEACHERS]
    # the same flags, or none: the new teacher replays the stored views
    build_cache(
        _job(
            tiny_corpus,
            {"x": tiny_teachers["oc"]},
            out,
            views=2,
            view_scale=(0.3, 0.9),
            view_ratio=(0.75, 1.33333),
            view_flip=0.5,
            view_color=0.5,
        )
    )
    with h5py.File(out, "r") as f:
        np.testing.assert_allclose(f[L.feature("x", "image")][:], f[L.feature("oc", "image")][:], atol=1e-6)
    with pytest.raises(CacheError, match=r"--view-color given without --views K"):
        build_cache(_job(tiny_corpus, {"y": tiny_teachers["oc"]}, out, view_color=0.5))
    with pytest.raises(CacheError, match=r"--view-scale 0.5,1.5: use 0 < MIN <= MAX <= 1"):
        build_cache(_job(tiny_corpus, {"y": tiny_teachers["oc"]}, tmp_path / "g.h5", views=2, view_scale=(0.5, 1.5)))
    with pytest.raises(SystemExit) as e:  # argparse: not a MIN,MAX pair
        main(
            [
                "cache",
                "--data",
                str(tiny_corpus),
                "--teacher",
                "y=x",
                "--out",
                str(tmp_path / "h.h5"),
                "--views",
                "2",
                "--view-ratio",
                "1",
            ]
        )
    assert e.value.code == 2


def test_a_five_column_file_of_an_earlier_version_reads_and_replays(tiny_corpus, tiny_teachers, tmp_path):
    """Views drawn before jitter existed (5 columns, flips at p 0.5, no `color` or `views` attrs)."""
    corpus = open_corpus(tiny_corpus)
    out = tmp_path / "old.h5"
    old = draw_view_params(32, 2, seed=0, flip_p=0.5)
    W.create_file(str(out), corpus.keys, corpus.fingerprint(), str(tiny_corpus))
    W.add_views(
        str(out),
        old,
        {
            "seed": 0,
            "scale": [0.5, 1.0],
            "ratio": [0.75, 4 / 3],
            "flip_p": 0.5,
            "layout": "x0, y0, w, h (relative crop box), flip",
        },
    )
    assert read_view_dist(str(out)) == ViewDist(2, flip_p=0.5)
    assert (
        "views: 2 per image (seed 0): scale 0.5-1, ratio 0.75-1.33333, flip p 0.5, no colour jitter; stored "
        "in /views/params (x0, y0, w, h, flip)" in info(str(out))
    )
    # a teacher added with --views 2 alone replays them as they are
    build_cache(_job(tiny_corpus, {"oc": tiny_teachers["oc"]}, out, views=2))
    t = load_teacher(tiny_teachers["oc"], "cpu")
    with h5py.File(out, "r") as f:
        assert np.array_equal(f[L.VIEW_PARAMS][:], old) and set(np.unique(old[..., 4])) == {0, 1}
        for row in (2, 19):
            for k in range(2):
                x = t.view_transform(corpus.load_image(row), old[row, k])
                np.testing.assert_allclose(
                    f[L.feature("oc", "image")][row, k], t.encode_image(x[None])[0].numpy(), atol=1e-5
                )
    with pytest.raises(CacheError, match=r"this run asks --view-flip 0: rerun with .*--view-flip 0.5 "):
        build_cache(_job(tiny_corpus, {"hf": tiny_teachers["hf"]}, out, views=2, view_flip=0.0))


def test_training_refuses_crop_settings_that_contradict_the_views(color_cache, tiny_corpus, tmp_path):
    views = ViewDist(2, scale=(0.3, 0.9), flip_p=0.5, color=0.5, seed=5)

    def data(**kw):
        return Config.from_dict({"data": {"corpus": "c", "features": "f.h5", **kw}}).data

    data().check_views(views)  # unset: the views decide
    Config.from_dict(Config.from_dict({"data": {"corpus": "c", "features": "f.h5"}}).to_dict()).data.check_views(
        views
    )  # a config written back whole (every key "set", as a launcher's copy): defaults are not settings
    data(flip=True, crop_scale=[0.3, 0.9]).check_views(views)  # set, and agreeing with them
    data(flip=False, crop_scale=[0.8, 1.0]).check_views(None)  # no views in use: the student's own crops
    data(flip=False).check_views(views)  # the default: the views decide
    with pytest.raises(ConfigError) as e:
        data(flip=True, crop_scale=[0.8, 1.0]).check_views(ViewDist(2, scale=(0.3, 0.9), color=0.5, seed=5))
    assert str(e.value) == (
        "data.flip=true and data.crop_scale=[0.8, 1] contradict the cache's stored views, which the student is "
        "shown (data.use_views=true): 2 per image (seed 5): scale 0.3-0.9, ratio 0.75-1.33333, no flips, colour "
        "jitter S 0.5 (brightness, contrast, saturation); remove data.flip and data.crop_scale from the config (the "
        "views decide), or set data.use_views=false to train on the student's own crops"
    )
    with pytest.raises(ConfigError, match=r"^data\.flip=true contradicts .* no flips"):
        data(flip=True).check_views(ViewDist(2))
    # at the start of a run, from the cache's stored distribution, before anything is trained
    cfg = tiny_config(
        tiny_corpus, tmp_path / "run", features=color_cache, train__max_steps=1, data__crop_scale="[0.8, 1.0]"
    )
    with pytest.raises(ConfigError, match=r"^data\.crop_scale=\[0\.8, 1\] contradicts .* scale 0\.3-0\.9"):
        train(cfg)
    assert not list((tmp_path / "run").glob("checkpoint-*"))
    # the shipped configs leave crops and flips to the views
    for name in ("tiny-hybrid.yaml", "mmkd.yaml"):
        cfg = Config.from_yaml(ROOT / "configs" / name, ["data.corpus=c"])
        assert cfg.data.use_views
        cfg.data.check_views(views)
        cfg.data.check_views(ViewDist(2))
