"""The input pipeline sized for a GPU: uint8 images normalised on the device (equal to the old float path),
captions cut to the batch's longest (equal text embeddings), persistent workers, the fused-AdamW choice."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image
from train_fixtures import tiny_cache, tiny_config, tiny_tokenizer  # noqa: F401  (fixtures)

from distill.config.train_config import Config, OptimCfg
from distill.data.loader import Collate, make_uint8_view_transform, trim_padding
from distill.train import make_accelerator
from distill.training.build_run import build_run, text_pad_id
from distill.training.optim import build_optimizer, use_fused
from distill.training.student_model import student_pixels
from teachers.transforms import PreprocessCfg, make_view_transform


def _image(seed: int, size=(61, 47)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_uint8_pixels_normalised_on_the_device_equal_the_old_float_path(interpolation):
    cfg = PreprocessCfg(image_size=(32, 32), interpolation=interpolation)
    old, new = make_view_transform(cfg), make_uint8_view_transform(cfg)
    mean, std = torch.tensor(cfg.mean), torch.tensor(cfg.std)
    for seed, params in enumerate([[0, 0, 1, 1, 0], [0.1, 0.2, 0.7, 0.6, 1], [0.5, 0.4, 0.3, 0.5, 0]]):
        img = _image(seed)
        u8 = new(img, params)
        assert u8.dtype == torch.uint8 and u8.shape == (3, 32, 32)
        batch = torch.stack([u8, u8])
        assert torch.equal(student_pixels(batch, mean, std), torch.stack([old(img, params)] * 2))


def test_student_pixels_leaves_float_images_alone():
    x = torch.randn(2, 3, 4, 4)
    assert student_pixels(x, torch.zeros(3), torch.ones(3)) is x


def test_trim_padding_cuts_to_the_longest_caption():
    tokens = torch.tensor([[2, 7, 3, 0, 0, 0], [2, 7, 8, 9, 3, 0], [2, 3, 0, 0, 0, 0]])
    assert torch.equal(trim_padding(tokens, 0), tokens[:, :5])
    assert trim_padding(tokens, None) is tokens  # a tower that needs the full context
    assert trim_padding(torch.zeros(2, 6, dtype=torch.long), 0).shape == (2, 1)
    assert torch.equal(trim_padding(tokens[:, :5], 0), tokens[:, :5])  # a full-length caption: nothing to cut


def test_collate_trims_only_with_a_pad_id():
    items = [
        {"image": torch.zeros(3, 4, 4, dtype=torch.uint8), "caption": c, "row": i, "cache_row": i, "view": -1}
        for i, c in enumerate(["a b", "a b c d"])
    ]

    def tok(texts):  # 1 + one id per word, padded with 0 to 8
        return torch.tensor([[1] + [5] * len(t.split()) + [0] * (7 - len(t.split())) for t in texts])

    assert Collate(tok, pad_id=0)(items).tokens.shape == (2, 5)
    full = Collate(tok)(items)
    assert full.tokens.shape == (2, 8) and full.images.dtype == torch.uint8


@pytest.fixture(scope="module")
def tiny_run(tiny_corpus, tiny_tokenizer, tmp_path_factory):
    cfg = tiny_config(
        tiny_corpus,
        tmp_path_factory.mktemp("run"),
        None,
        mode="contrastive",
        tokenizer=tiny_tokenizer,
        data__num_workers=1,
    )
    return build_run(cfg, make_accelerator(cfg))


def test_trimmed_captions_give_the_full_context_text_embeddings(tiny_run):
    model = tiny_run.model.student.eval()
    pad = text_pad_id(model)
    assert pad == 0
    tok = tiny_run.loader.collate_fn.tokenizer
    captions = ["chest x-ray", "ct of the lung", "ct"]
    full = tok(captions)
    short = trim_padding(full, pad)
    assert short.shape[1] < full.shape[1]
    # in float64 (a copy: the run is shared): the two lengths change only the attention's sums over the (masked)
    # padding, whose float32 order is up to the CPU's kernels; in float64 that is ~1e-15 of these unit vectors,
    # while attending to a trimmed real token or pooling at a wrong position moves them by >= 1e-2
    model = copy.deepcopy(model).to(torch.float64)
    with torch.no_grad():
        a, b = model.encode_text(full, normalize=True), model.encode_text(short, normalize=True)
    assert a.dtype == torch.float64
    torch.testing.assert_close(b, a, atol=1e-12, rtol=0)


def test_the_loader_persists_workers_and_yields_uint8_the_model_normalises(tiny_run):
    loader = tiny_run.loader
    assert loader.persistent_workers and loader.num_workers == 1 and loader.collate_fn.pad_id == 0
    cfg = Config.from_dict({"mode": "contrastive", "data": {"corpus": "c.csv"}})
    assert make_accelerator(cfg).dataloader_config.non_blocking  # pinned batches: the copy overlaps host work
    batch = next(iter(loader))
    assert batch.images.dtype == torch.uint8 and (batch.tokens != 0).any(0)[-1]  # the last column holds a token
    m = tiny_run.model.eval()
    with torch.no_grad():
        by_uint8 = m(batch.images, batch.tokens)
        by_float = m(student_pixels(batch.images, m.pixel_mean, m.pixel_std), batch.tokens)
    assert torch.equal(by_uint8.image, by_float.image)
    assert not any(k.startswith("pixel_") for k in m.state_dict())  # checkpoints keep student.* and heads.*


@pytest.mark.parametrize(
    "mode,device,dtypes,want",
    [
        ("auto", "cuda", {torch.float32}, True),
        ("auto", "cuda", {torch.float32, torch.bfloat16}, True),
        ("auto", "cuda", {torch.float32, torch.int64}, False),
        ("auto", "cuda", set(), False),
        ("auto", "cpu", {torch.float32}, False),
        ("on", "cpu", {torch.float32}, True),
        ("off", "cuda", {torch.float32}, False),
    ],
)
def test_fused_adamw_only_on_cuda_float_params_by_default(mode, device, dtypes, want):
    assert use_fused(mode, device, dtypes) is want


def test_build_optimizer_passes_fused_by_target_device():
    model = torch.nn.Linear(3, 2)
    assert not build_optimizer(model, OptimCfg()).defaults["fused"]  # CPU: torch's default loop
    assert build_optimizer(model, OptimCfg(fused="on"), device="cpu").defaults["fused"] is True
    with pytest.raises(ValueError, match="optim.fused"):
        OptimCfg(fused="yes")


def test_fused_adamw_steps_equal_the_default_on_cpu():
    torch.manual_seed(0)
    a = torch.nn.Linear(4, 3)
    b = torch.nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    oa, ob = build_optimizer(a, OptimCfg(fused="off")), build_optimizer(b, OptimCfg(fused="on"))
    x = torch.randn(5, 4)
    for _ in range(3):
        for m, o in ((a, oa), (b, ob)):
            o.zero_grad()
            m(x).pow(2).sum().backward()
            o.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pb, pa, atol=1e-6, rtol=1e-6)
