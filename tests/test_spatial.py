"""Spatial (patch-token) distillation: teacher tokens per back-end, the token cache, the student's tokens, the loss.

Every token test compares with the library's own last hidden state pooled by hand (`adaptive_avg_pool2d`), not
with our own code path.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import h5py
import numpy as np
import open_clip
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from test_grad_cache import FP64_TOL, _assert_equal
from timm.models import register_model
from timm.models.vision_transformer import _create_vision_transformer
from train_fixtures import read_log, tiny_config, tiny_tokenizer  # noqa: F401  (fixtures)
from transformers import CLIPModel, SiglipConfig, SiglipModel

from cache.build.job import CacheJob
from cache.build.run import build_cache
from cache.inspect import info
from cache.sources.corpus import open_corpus
from cache.store.reader import FeatureReader
from cache.store.schema import CacheError
from cache.store.segments import copy_cache
from cache.store.verify import BadRowsError, verify
from distill.cli import main
from distill.data.loader import Collate, DataError
from distill.losses import CombineCfg, DistillLoss, LossTermCfg, StudentOutput, TeacherBatch
from distill.losses import combine as C
from distill.losses.distributed import StepGather, all_gather_rows
from distill.losses.terms import StepContext
from distill.train import make_accelerator, train
from distill.training.build_run import build_run, teacher_batch
from distill.training.grad_cache import grad_cache_step, merge_batches
from distill.training.heads import TokenAdaptors
from distill.training.student_model import DistillModel
from teachers import load_teacher
from teachers.base import Teacher
from teachers.kernel.config_model import ConfigError
from teachers.kernel.modality import Modality, Pair
from teachers.tokens import (
    TokensUnsupported,
    hf_visual_tokens,
    open_clip_visual_tokens,
    pool_tokens,
    visual_token_shape,
)
from teachers.transforms import PreprocessCfg

TIMM_NAME = "test_vit_micro_patch8_32"


def register_tiny_timm() -> str:
    """A 2-block, 32-wide timm ViT at 32 px (patch 8), registered with timm so open_clip can build it by name."""
    if TIMM_NAME not in timm.list_models(TIMM_NAME):

        def test_vit_micro_patch8_32(pretrained: bool = False, **kwargs):
            args = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
            return _create_vision_transformer("vit_tiny_patch16_224", pretrained=False, **dict(args, **kwargs))

        register_model(test_vit_micro_patch8_32)
    return TIMM_NAME


def make_tiny_timm_open_clip(out: Path, embed_dim: int = 20, seed: int = 3) -> Path:
    """An open_clip CLIP whose image tower is a timm trunk (BiomedCLIP's kind), as a `local-dir:` folder."""
    register_tiny_timm()
    out.mkdir(parents=True, exist_ok=True)
    model_cfg = {
        "embed_dim": embed_dim,
        "vision_cfg": {
            "timm_model_name": TIMM_NAME,
            "timm_model_pretrained": False,
            "timm_pool": "",
            "timm_proj": "linear",
            "image_size": 32,
        },
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    }
    pp = {"size": 32, "mean": [0.5] * 3, "std": [0.25] * 3, "interpolation": "bicubic", "resize_mode": "shortest"}
    torch.manual_seed(seed)
    model = open_clip.CLIP(**model_cfg)
    (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": pp}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "open_clip_model.safetensors"))
    return out


def _by_hand(nchw: torch.Tensor, g: int) -> torch.Tensor:
    """(B, D, h, w) -> (B, g*g, D) with torch's pooling, the reference for every back-end."""
    return F.adaptive_avg_pool2d(nchw, g).flatten(2).transpose(1, 2)


# -- teachers ------------------------------------------------------------------------------------------------
def test_pool_tokens_is_adaptive_average_pooling_and_refuses_upsampling():
    x = torch.arange(2 * 16 * 3, dtype=torch.float32).reshape(2, 16, 3)  # a 4 x 4 grid
    got = pool_tokens(x, (4, 4), 2)
    grid = x.reshape(2, 4, 4, 3)
    want = torch.stack(
        [
            grid[:, :2, :2].mean((1, 2)),
            grid[:, :2, 2:].mean((1, 2)),
            grid[:, 2:, :2].mean((1, 2)),
            grid[:, 2:, 2:].mean((1, 2)),
        ],
        dim=1,
    )
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(pool_tokens(x, (4, 4), 4), x)
    with pytest.raises(ValueError, match="at least that size"):
        pool_tokens(x, (4, 4), 5)


def test_open_clip_vit_tokens_equal_its_forward_intermediates(tiny_teachers):
    t = load_teacher(tiny_teachers["oc"])
    x = torch.randn(3, 3, 32, 32)
    emb, tokens, grid = t.encode_image_with_tokens(x)
    with torch.no_grad():
        ref = t.trunk.visual.forward_intermediates(x, indices=1, normalize_intermediates=True)
    last = ref["image_intermediates"][-1]  # (B, D, h, w): after ln_post, without the class token
    assert grid == (4, 4) and tokens.shape == (3, 16, 32) and t.token_shape() == (4, 4, 32)
    torch.testing.assert_close(tokens, last.flatten(2).transpose(1, 2))
    torch.testing.assert_close(pool_tokens(tokens, grid, 2), _by_hand(last, 2))
    torch.testing.assert_close(emb, t.encode_image(x))  # the same pass gives the pooled embedding
    torch.testing.assert_close(t.encode_image_tokens(x), tokens)


def test_timm_trunk_tokens_equal_forward_features_without_prefix(tmp_path):
    t = load_teacher(f"local-dir:{make_tiny_timm_open_clip(tmp_path / 'timm')}")
    trunk = t.trunk.visual.trunk
    assert trunk.num_prefix_tokens == 1
    x = torch.randn(2, 3, 32, 32)
    emb, tokens, grid = t.encode_image_with_tokens(x)
    with torch.no_grad():
        ref = t.trunk.visual.forward_intermediates(x, indices=1, normalize_intermediates=True)["image_intermediates"]
        feats = trunk.forward_features(x)
    assert grid == (4, 4) and tokens.shape == (2, 16, 32) and t.token_shape() == (4, 4, 32)
    torch.testing.assert_close(tokens, feats[:, 1:])
    torch.testing.assert_close(pool_tokens(tokens, grid, 2), _by_hand(ref[-1], 2))
    torch.testing.assert_close(emb, t.encode_image(x))


def test_hf_clip_tokens_are_the_normed_last_hidden_state_without_cls(tiny_teachers):
    t = load_teacher(tiny_teachers["hf"])
    model = CLIPModel.from_pretrained(tiny_teachers["hf"].removeprefix("hf-clip:")).eval()
    x = torch.randn(2, 3, 32, 32)
    emb, tokens, grid = t.encode_image_with_tokens(x)
    with torch.no_grad():
        hidden = model.vision_model(pixel_values=x).last_hidden_state  # (B, 1 + 16, 32): CLS first
        want = model.vision_model.post_layernorm(hidden[:, 1:])
    assert hidden.shape == (2, 17, 32) and grid == (4, 4) and t.token_shape() == (4, 4, 32)
    torch.testing.assert_close(tokens, want)
    nchw = want.transpose(1, 2).reshape(2, 32, 4, 4)
    torch.testing.assert_close(pool_tokens(tokens, grid, 2), _by_hand(nchw, 2))
    torch.testing.assert_close(emb, t.encode_image(x))


def test_hf_siglip_tokens_are_its_last_hidden_state(tmp_path):
    cfg = SiglipConfig(
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        text_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "vocab_size": 64,
        },
    )
    torch.manual_seed(0)
    model = SiglipModel(cfg).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _, tokens, grid = hf_visual_tokens(model, x)
        hidden = model.vision_model(pixel_values=x).last_hidden_state  # no CLS token, already normed
    assert hidden.shape == (2, 16, 32) and grid == (4, 4)
    torch.testing.assert_close(tokens, hidden)


def test_a_teacher_without_tokens_is_refused_in_one_line(tiny_teachers):
    class NoTokens(Teacher):
        def _image_features(self, images):
            return images.flatten(1)[:, :4]

        def _text_features(self, tokens):
            return tokens.float()

        def tokenize(self, texts):
            return torch.zeros(len(texts), 4)

    t = NoTokens(
        torch.nn.Identity(),
        spec="py:mine:make",
        embed_dim=4,
        logit_scale=10.0,
        preprocess_cfg=PreprocessCfg(image_size=(8, 8)),
        context_length=4,
    )
    with pytest.raises(TokensUnsupported, match="'py:mine:make' .*gives no patch tokens") as e:
        t.encode_image_tokens(torch.zeros(1, 3, 8, 8))
    assert "\n" not in str(e.value)


def test_open_clip_tokens_refuse_a_non_vit_tower():
    with pytest.raises(TokensUnsupported, match="not a ViT"):
        open_clip_visual_tokens(torch.nn.Linear(3, 3), torch.zeros(1, 3, 8, 8))


# -- the cache -----------------------------------------------------------------------------------------------
def _job(data, teachers, out, **kw):
    kw = {"num_workers": 0, "batch_size": 8, "chunk_rows": 16, "progress": False, **kw}
    return CacheJob(data=str(data), teachers=teachers, out=str(out), **kw)


def _want_tokens(t, corpus, rows, g: int, params=None) -> np.ndarray:
    """What the cache should hold: the teacher's own transform (or stored view), its tokens pooled by hand."""
    x = torch.stack(
        [
            t.image_transform(corpus.load_image(r))
            if params is None
            else t.view_transform(corpus.load_image(r), params[r])
            for r in rows
        ]
    )
    tokens = t.encode_image_tokens(x)
    nchw = tokens.transpose(1, 2).reshape(len(rows), tokens.shape[-1], 4, 4)
    return _by_hand(nchw, g).numpy()


@pytest.fixture(scope="module")
def token_cache(tmp_path_factory, tiny_corpus, tiny_teachers) -> Path:
    out = tmp_path_factory.mktemp("tokens") / "features.h5"
    build_cache(_job(tiny_corpus, tiny_teachers, out, tokens=2))
    return out


def test_cache_stores_pooled_tokens_float16(token_cache, tiny_corpus, tiny_teachers):
    corpus = open_corpus(tiny_corpus)
    with h5py.File(token_cache, "r") as f:
        for name, dim in (("oc", 32), ("hf", 32)):
            g = f[f"teachers/{name}"]
            tok = g["tokens"]  # virtual, over the segment's checksummed chunks
            assert tok.shape == (32, 4, dim) and tok.dtype == np.float16 and tok.attrs["fletcher32"]
            assert int(g.attrs["tokens"]) == 2 and int(g.attrs["token_dim"]) == dim
            want = _want_tokens(load_teacher(tiny_teachers[name]), corpus, range(32), 2)
            np.testing.assert_allclose(g["tokens"][:].astype(np.float32), want, atol=5e-3, rtol=2e-3)
            assert g["image"].shape == (32, 24 if name == "oc" else 40)  # the features are unchanged
    with FeatureReader(str(token_cache), block_rows=16) as reader:
        assert reader.token_grid("oc") == 2
        rows = np.array([5, 30, 5, 2])
        got = reader.read_tokens(rows, ["oc"])["oc"]
        with h5py.File(token_cache, "r") as f:
            np.testing.assert_array_equal(got, f["teachers/oc/tokens"][:][rows].astype(np.float32))


def test_cache_with_views_stores_tokens_per_view(tmp_path, tiny_corpus, tiny_teachers):
    out = tmp_path / "f.h5"
    build_cache(_job(tiny_corpus, {"oc": tiny_teachers["oc"]}, out, views=2, tokens=1, dtype="float32"))
    corpus, t = open_corpus(tiny_corpus), load_teacher(tiny_teachers["oc"])
    with h5py.File(out, "r") as f:
        params, tok = f["views/params"][:], f["teachers/oc/tokens"][:]
    assert tok.shape == (32, 2, 1, 32) and tok.dtype == np.float32
    for k in range(2):
        want = _want_tokens(t, corpus, [3, 17], 1, params[:, k])
        np.testing.assert_allclose(tok[[3, 17], k], want, atol=1e-5)
    assert np.abs(tok[3, 0] - tok[3, 1]).max() > 1e-3  # the views differ
    rows, views = np.array([17, 3]), np.array([1, 0])
    with FeatureReader(str(out)) as reader:
        np.testing.assert_array_equal(reader.read_tokens(rows, views=views)["oc"], tok[rows, views])
        assert reader.read_tokens(rows)["oc"].shape == (2, 2, 1, 32)


def test_token_size_is_printed_and_a_run_over_max_gb_is_refused(tmp_path, tiny_corpus, tiny_teachers, capsys):
    out = tmp_path / "f.h5"
    args = [
        "cache",
        "--data",
        str(tiny_corpus),
        "--teacher",
        f"oc={tiny_teachers['oc']}",
        "--out",
        str(out),
        "--num-workers",
        "0",
        "--tokens",
        "2",
        "--views",
        "3",
    ]
    assert main([*args, "--max-gb", "0.000001"]) == 2
    err = capsys.readouterr().err.strip()
    size = 32 * 3 * 4 * 32 * 2  # rows x views x G*G x D x float16 bytes
    assert err.count("\n") == 0 and f"~{size / 1e9:.3g} GB" in err and "--max-gb 1e-06" in err
    assert not Path(str(out) + ".parts").exists()  # no teacher meta was written: another G starts afresh
    assert main([*args, "--tokens", "1", "--max-gb", "0.001"]) == 0
    assert f"patch tokens: 1 x 1 grid, 32 rows x 3 views: ~{size / 4 / 1e9:.3g} GB" in capsys.readouterr().out


def test_token_refusals_name_the_teacher_and_the_flag(tmp_path, tiny_corpus, tiny_teachers, token_cache):
    with pytest.raises(CacheError, match="teacher 'oc' has a 4 x 4 patch grid; use --tokens 4 or less"):
        build_cache(_job(tiny_corpus, {"oc": tiny_teachers["oc"]}, tmp_path / "a.h5", tokens=5))
    copy = tmp_path / "b.h5"
    copy_cache(str(token_cache), str(copy))  # the file and its segment folder
    with pytest.raises(CacheError, match="teacher 'oc' was cached with --tokens 2, this run asks --tokens 3"):
        build_cache(_job(tiny_corpus, {"oc": tiny_teachers["oc"]}, copy, tokens=3))
    mod = tmp_path / "no_tokens_teacher.py"
    mod.write_text(
        "from teachers import load_teacher\n"
        "from teachers.base import Teacher\n"
        "class Plain(Teacher):\n"
        "    def __init__(self, inner):\n"
        "        super().__init__(inner.trunk, spec='x', embed_dim=inner.embed_dim, logit_scale=10.0,\n"
        "            preprocess_cfg=inner.preprocess_cfg, context_length=inner.context_length)\n"
        "        self.inner = inner\n"
        "    def _image_features(self, x): return self.inner._image_features(x)\n"
        "    def _text_features(self, t): return self.inner._text_features(t)\n"
        "    def tokenize(self, texts): return self.inner.tokenize(texts)\n"
        f"def make(): return Plain(load_teacher({tiny_teachers['oc']!r}))\n"
    )

    sys.path.insert(0, str(tmp_path))
    try:
        with pytest.raises(CacheError, match="--tokens 2: teacher 'mine': .*gives no patch tokens"):
            build_cache(_job(tiny_corpus, {"mine": "py:no_tokens_teacher:make"}, tmp_path / "c.h5", tokens=2))
    finally:
        sys.path.remove(str(tmp_path))


def test_info_shows_the_grid_and_verify_checks_the_tokens(tmp_path, token_cache):
    text = info(str(token_cache))
    assert "patch tokens: 2 x 2 grid, 32-wide, shape (32, 4, 32)" in text and "/teachers/oc/tokens" in text
    assert verify(str(token_cache), progress=False).ok
    copy = tmp_path / "bad.h5"
    copy_cache(str(token_cache), str(copy))  # the file and its segment folder
    with h5py.File(copy, "r+") as f:
        f["teachers/hf/tokens"][7, 1, 3] = np.nan
    report = verify(str(copy), progress=False)
    assert [str(p) for p in report.problems] == ["teacher 'hf' patch tokens rows 7: non-finite values (NaN/inf)"]


# -- the student's tokens ------------------------------------------------------------------------------------
def _tiny_clip(timm_trunk: bool):
    vision = (
        {
            "timm_model_name": register_tiny_timm(),
            "timm_model_pretrained": False,
            "timm_pool": "",
            "timm_proj": "linear",
            "image_size": 32,
        }
        if timm_trunk
        else {"image_size": 32, "patch_size": 8, "width": 48, "layers": 2, "head_width": 24}
    )
    torch.manual_seed(0)
    return open_clip.CLIP(
        embed_dim=16,
        vision_cfg=vision,
        text_cfg={"context_length": 8, "vocab_size": 100, "width": 16, "heads": 2, "layers": 1},
    ).eval()


@pytest.mark.parametrize("timm_trunk", [False, True], ids=["open_clip-vit", "timm-trunk"])
def test_student_exposes_adapted_pooled_tokens_for_both_tower_kinds(timm_trunk):
    clip = _tiny_clip(timm_trunk)
    h, w, dim = visual_token_shape(clip.visual)
    assert (h, w, dim) == (4, 4, 32 if timm_trunk else 48)
    adaptors = TokenAdaptors(dim, {"a": (2, 12), "b": (4, 20)})
    model = DistillModel(clip, adaptors=adaptors).eval()
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        out = model(images, torch.randint(1, 100, (3, 8)))
        x = (images.float() / 255 - model.pixel_mean.view(-1, 1, 1)) / model.pixel_std.view(-1, 1, 1)
        last = clip.visual.forward_intermediates(x, indices=1, normalize_intermediates=True)["image_intermediates"][-1]
        tokens = last.flatten(2).transpose(1, 2)  # (B, 16, D): the library's own last layer, normed, no prefix
        want_a = _by_hand(adaptors.mlp["a"](tokens).transpose(1, 2).reshape(3, 12, 4, 4), 2)
        want_b = adaptors.mlp["b"](tokens)
        torch.testing.assert_close(out.image, F.normalize(clip.encode_image(x), dim=-1))
    assert out.tokens["a"].shape == (3, 4, 12) and out.tokens["b"].shape == (3, 16, 20)
    torch.testing.assert_close(out.tokens["a"], want_a)
    torch.testing.assert_close(out.tokens["b"], want_b)
    assert DistillModel(clip)(images, torch.randint(1, 100, (3, 8))).tokens == {}  # no spatial term: none


# -- the loss ------------------------------------------------------------------------------------------------
S_A = [[[1.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [2.0, 0.0]]]  # student tokens adapted for teacher a: (B=2, G*G=2, D=2)
T_A = [[[1.0, 0.0], [1.0, 0.0]], [[-1.0, -1.0], [0.0, 3.0]]]  # teacher a's cached tokens
S_B = [[[2.0, 0.0], [0.0, 2.0]], [[0.0, 1.0], [1.0, 0.0]]]
T_B = [[[1.0, 0.0], [0.0, 1.0]], [[0.0, -2.0], [1.0, 0.0]]]
# by hand, 1 - cos per token, mean over the 2 tokens: a: row 0 (0 + 1) / 2, row 1 (2 + 1) / 2; b: row 0 0, row 1 1
COS_A, COS_B = [0.5, 1.5], [0.0, 1.0]
# smooth-L1 (beta 1), mean over 2 tokens x 2 dims, teacher a: row 0 (0 + 0 + .5 + .5) / 4; row 1 (1.5 + 1.5 + 1.5
# + 2.5) / 4
L1_A = [0.25, 1.75]


def _spatial_inputs(route=None, feats: bool = False):
    t = lambda x: torch.tensor(x)  # noqa: E731
    e = F.normalize(torch.randn(2, 4, generator=torch.Generator().manual_seed(0)), dim=-1)
    student = StudentOutput(
        image=e, text=e.flip(0), logit_scale=torch.tensor(10.0), tokens={"a": t(S_A).requires_grad_(), "b": t(S_B)}
    )
    pair = Pair(e, e)
    teachers = TeacherBatch(
        {"a": pair, "b": Pair(e.flip(0), e)} if feats else {},
        {"a": 5.0, "b": 20.0},
        route=route,
        tokens={"a": t(T_A), "b": t(T_B)},
    )
    return student, teachers


def test_spatial_term_values_by_hand():
    s, t = _spatial_inputs()
    loss = DistillLoss([LossTermCfg("sp", "spatial", 2.0)], ["a", "b"])  # weights a 1, b 1
    out = loss(s, t)
    want = 2.0 * np.mean([(COS_A[i] + COS_B[i]) / 2 for i in range(2)])
    assert out["sp"].item() == pytest.approx(want) and out["loss"].item() == pytest.approx(want)
    one = DistillLoss([LossTermCfg("sp", "spatial", 1.0, {"a": 1.0, "b": 3.0})], ["a", "b"])
    assert one(s, t)["sp"].item() == pytest.approx(np.mean([0.25 * COS_A[i] + 0.75 * COS_B[i] for i in range(2)]))
    for metric, per_a in (("smooth_l1", L1_A), ("cosine+smooth_l1", [0.9 * c + 0.1 * d for c, d in zip(COS_A, L1_A)])):
        only_a = DistillLoss([LossTermCfg("sp", "spatial", 1.0, {"a": 1.0}, {"metric": metric})], ["a", "b"])
        assert only_a(s, t)["sp"].item() == pytest.approx(np.mean(per_a)), metric
    out["loss"].backward()
    assert s.tokens["a"].grad is not None and s.tokens["a"].grad.abs().sum() > 0
    with pytest.raises(ValueError, match="spatial metric 'l2' is unknown"):
        LossTermCfg("sp", "spatial", kwargs={"metric": "l2"})


def test_spatial_term_with_routing_and_every_combine_mode():
    route = {"a": torch.tensor([True, False]), "b": torch.tensor([True, True])}
    s, t = _spatial_inputs(route, feats=True)
    routed = DistillLoss([LossTermCfg("sp", "spatial", 1.0, {"a": 1.0, "b": 3.0})], ["a", "b"])
    # row 0: a 1/4, b 3/4; row 1 is routed to b only
    assert routed(s, t)["sp"].item() == pytest.approx((0.25 * COS_A[0] + 0.75 * COS_B[0] + COS_B[1]) / 2)
    per = torch.tensor([COS_A, COS_B]).T  # (B, T)
    for mode in ("weighted_sum", "random_teacher", "confidence"):
        loss = DistillLoss(
            [LossTermCfg("sp", "spatial", 1.0, {"a": 1.0, "b": 3.0})],
            ["a", "b"],
            combine=CombineCfg(mode=mode, temperature=0.5),
        )
        got = loss(s, t, torch.Generator().manual_seed(3))["sp"].item()
        ctx = StepContext(s, t, StepGather(all_gather_rows))
        conf = torch.stack([ctx.log_confidence(n) for n in ("a", "b")], 1) if mode == "confidence" else None
        mix = C.weight_matrix(
            loss.combine_cfg,
            {"a": 1.0, "b": 3.0},
            loss.draw(2, torch.Generator().manual_seed(3)),
            2,
            route=ctx.route(["a", "b"]),
            log_confidence=conf,
        )
        assert mix[1].tolist() == [0.0, 1.0] and mix.sum(1).tolist() == pytest.approx([1.0, 1.0])
        assert got == pytest.approx((mix * per).sum(1).mean().item()), mode


def test_spatial_term_errors_name_the_teacher():
    s, t = _spatial_inputs()
    loss = DistillLoss([LossTermCfg("sp", "spatial")], ["a", "b"])
    assert loss.token_teachers() == ["a", "b"] and loss.student_modalities() == (Modality.IMAGE,)
    t.tokens.pop("b")
    with pytest.raises(ValueError, match="patch tokens of teacher 'b'.*--tokens G"):
        loss(s, t)
    s, t = _spatial_inputs()
    s.tokens.pop("a")
    with pytest.raises(KeyError, match="no adapted patch tokens for teacher 'a'"):
        loss(s, t)


# -- training ------------------------------------------------------------------------------------------------
SPATIAL_TERMS = "[{kind: infonce}, {kind: spatial, weight: 1.0}]"


@pytest.fixture(scope="module")
def spatial_cache(tmp_path_factory, tiny_corpus, tiny_teachers) -> Path:
    """Both tiny teachers with 2 stored views per image and their tokens on a 2 x 2 grid per view."""
    out = tmp_path_factory.mktemp("spatial") / "features.h5"
    build_cache(_job(tiny_corpus, tiny_teachers, out, views=2, tokens=2))
    return out


def test_a_tiny_spatial_run_lowers_the_spatial_loss(tiny_corpus, spatial_cache, tiny_tokenizer, tmp_path):
    cfg = tiny_config(
        tiny_corpus,
        tmp_path / "run",
        spatial_cache,
        tokenizer=tiny_tokenizer,
        loss__terms=SPATIAL_TERMS,
        train__max_steps=40,
        train__checkpoint_every=0,
    )
    run = build_run(cfg, make_accelerator(cfg))
    assert run.model.adaptors.grids == {"oc": 2, "hf": 2} and run.model.adaptors.dims == {"oc": 32, "hf": 32}
    batch = next(iter(run.loader))
    cached = run.loader.collate_fn.reader.read_tokens(
        run.join.cache_rows[batch.rows.numpy()], ["oc"], views=batch.views.numpy()
    )["oc"]
    assert batch.teacher_tokens["oc"].shape == (8, 4, 32) and (batch.views >= 0).all()
    np.testing.assert_array_equal(batch.teacher_tokens["oc"].numpy(), cached)  # the view the student sees
    tb = teacher_batch(batch, {"oc": 1.0, "hf": 1.0}, run.loss.teacher_names)
    assert tb.tokens["hf"].shape == (8, 4, 32)
    train(cfg)
    spatial = [r["spatial"] for r in read_log(tmp_path / "run")]
    assert len(spatial) == 40 and np.isfinite(spatial).all()
    assert np.mean(spatial[-5:]) < 0.7 * np.mean(spatial[:5]), spatial


def test_spatial_grad_cache_equals_one_forward(tiny_corpus, spatial_cache, tiny_tokenizer, tmp_path):
    cfg = tiny_config(tiny_corpus, tmp_path / "run", spatial_cache, tokenizer=tiny_tokenizer, loss__terms=SPATIAL_TERMS)
    run = build_run(cfg, make_accelerator(cfg))
    it = iter(run.loader)
    batch = merge_batches([next(it), next(it)], run.loader.collate_fn.pad_id)
    assert batch.teacher_tokens["oc"].shape == (16, 4, 32)
    teachers = teacher_batch(batch, {"oc": 1.0, "hf": 1.0}, run.loss.teacher_names)
    # float64 model and images (FP64_TOL's derivation in test_grad_cache): chunking changes only the summation
    # order, which in float32 is up to the CPU's kernels; in float64 it moves gradients by ~1e-13 of their scale,
    # while a token row sent to the wrong chunk or a chunk's gradient dropped moves them by >= 1e-3
    model = run.model.train().to(torch.float64)
    images = batch.images.to(torch.float64)
    out = model(images, batch.tokens)
    assert out.image.dtype == torch.float64 and all(t.dtype == torch.float64 for t in out.tokens.values())
    ref = run.loss(out, teachers)
    ref["loss"].backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    got = grad_cache_step(model, images, batch.tokens, 5, lambda s: run.loss(s, teachers), lambda x: x.backward())
    assert got["spatial"].item() == pytest.approx(ref["spatial"].item(), rel=FP64_TOL, abs=FP64_TOL)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == want.keys() and any(k.startswith("adaptors.") for k in grads)
    _assert_equal(grads, want, atol=FP64_TOL)


def test_spatial_runs_are_refused_without_tokens_or_with_patch_dropout(
    tiny_corpus, spatial_cache, tiny_tokenizer, tmp_path, token_cache
):
    def build(features, **kw):
        cfg = tiny_config(
            tiny_corpus, tmp_path / "r", features, tokenizer=tiny_tokenizer, loss__terms=SPATIAL_TERMS, **kw
        )
        return build_run(cfg, make_accelerator(cfg))

    with pytest.raises(ConfigError, match="student.patch_dropout=0.5 drops some; set student.patch_dropout=0"):
        build(spatial_cache, student__patch_dropout=0.5)
    with pytest.raises(ConfigError, match="teacher 'hf' patch tokens are cached per view: .*data.use_views=true"):
        build(spatial_cache, data__use_views="false")
    with pytest.raises(DataError, match="teacher 'hf' has no patch tokens for the spatial loss term"):
        build(_no_token_copy(token_cache, tmp_path))


def _no_token_copy(src: Path, tmp_path: Path) -> Path:
    """The token cache with teacher hf's tokens deleted (as if cached without --tokens)."""
    out = tmp_path / "notokens.h5"
    copy_cache(str(src), str(out))  # the file and its segment folder
    with h5py.File(out, "r+") as f:
        del f["teachers/hf/tokens"]
        del f["teachers/hf"].attrs["tokens"]
    return out


def test_bad_cached_tokens_stop_or_drop_that_teacher_for_the_row(token_cache, tmp_path):
    bad = tmp_path / "bad.h5"
    copy_cache(str(token_cache), str(bad))  # the file and its segment folder
    with h5py.File(bad, "r+") as f:
        f["teachers/hf/tokens"][7, 0, 0] = np.inf
    items = [
        {"image": torch.zeros(3, 4, 4, dtype=torch.uint8), "caption": "x", "row": r, "cache_row": r, "view": -1}
        for r in (3, 7)
    ]
    tok = lambda caps: torch.zeros(len(caps), 4, dtype=torch.long)  # noqa: E731
    stop = Collate(tok, str(bad), ["oc", "hf"], token_teachers=["hf"])
    with pytest.raises(BadRowsError, match="teacher 'hf' patch-token features of cache rows 7 are non-finite"):
        stop(items)
    batch = Collate(tok, str(bad), ["oc", "hf"], token_teachers=["hf"], bad_features="skip")(items)
    assert batch.route.tolist() == [[True, True], [True, False]] and batch.skipped_features == 1
    assert list(batch.teacher_tokens) == ["hf"] and batch.teacher_tokens["hf"].shape == (2, 4, 32)
    assert batch.teacher_tokens["hf"][1].abs().sum() == 0 and batch.teacher_tokens["hf"][0].abs().sum() > 0
