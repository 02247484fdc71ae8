"""Teachers: the spec parser, the alias registry, and each back-end against the library called directly."""
from __future__ import annotations

import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from distill.registry import Registry
from teachers import Teacher, load_teacher, parse_spec, resolve_spec
from teachers.registry import list_teachers


def _image(seed: int = 0, size=(50, 60)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((*size, 3)) * 255).astype("uint8"))


# -- spec parsing --------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec,kind,target", [
    ("hf-hub:microsoft/BiomedCLIP", "hf-hub", "microsoft/BiomedCLIP"),
    ("local-dir:/tmp/x", "local-dir", "/tmp/x"),
    ("ViT-B-16/openai", "open_clip", "ViT-B-16/openai"),
    ("hf-clip:vinid/plip", "hf-clip", "vinid/plip"),
    ("py:my.mod:make", "py", "my.mod:make"),
    ("biomedclip", "alias", "biomedclip"),
])
def test_parse_spec_forms(spec, kind, target):
    s = parse_spec(spec)
    assert (s.kind, s.target, s.raw) == (kind, target, spec)


@pytest.mark.parametrize("bad,match", [
    ("", "empty"), ("hf-hub:", "nothing after"), ("hf-hub:norepo", "ORG/REPO"), ("py:mod", "module.path:function"),
    ("s3:bucket/x", "unknown prefix"),
])
def test_parse_spec_rejects(bad, match):
    with pytest.raises(ValueError, match=match):
        parse_spec(bad)


def test_bare_path_gets_the_right_prefix(tmp_path):
    (tmp_path / "open_clip_config.json").write_text("{}")
    with pytest.raises(ValueError, match=f"local-dir:{tmp_path}"):
        parse_spec(str(tmp_path))


def test_aliases_resolve_and_suggest():
    assert resolve_spec("plip") == parse_spec("hf-clip:vinid/plip")
    assert resolve_spec("biomedclip").target == "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
    assert list_teachers("quiltnet*") == ["quiltnet-b16", "quiltnet-b32"]
    with pytest.raises(KeyError, match="did you mean biomedclip"):
        resolve_spec("biomedclp")


def test_registry_refuses_duplicates():
    reg: Registry[int] = Registry("thing")
    reg.add("a", 1)
    with pytest.raises(KeyError, match="already registered"):
        reg.add("a", 2)

    @reg.register
    def b():  # registered under its __name__
        return 0

    assert reg.get("b") is b and reg.list() == ["a", "b"]


# -- back-ends against the libraries -------------------------------------------------------------------
def test_open_clip_local_dir_matches_open_clip(tiny_teachers):
    import open_clip

    t = load_teacher(tiny_teachers["oc"])
    path = tiny_teachers["oc"]
    model, _, preprocess = open_clip.create_model_and_transforms(path)
    tok = open_clip.get_tokenizer(path)
    model.eval()
    img, texts = _image(), ["a ct scan of the chest", "an mri"]
    with torch.no_grad():
        ref_i = F.normalize(model.encode_image(preprocess(img)[None]), dim=-1)
        ref_t = F.normalize(model.encode_text(tok(texts)), dim=-1)
    got_i = t.encode_image(t.image_transform(img)[None])
    got_t = t.encode_text(t.tokenize(texts))
    torch.testing.assert_close(got_i, ref_i)
    torch.testing.assert_close(got_t, ref_t)
    assert t.embed_dim == 24 and got_i.shape == (1, 24) and got_t.shape == (2, 24)
    assert t.preprocess_cfg.image_size == (32, 32) and t.preprocess_cfg.mean == (0.5, 0.5, 0.5)
    assert t.logit_scale == pytest.approx(float(model.logit_scale.exp()))


def test_hf_clip_matches_transformers(tiny_teachers):
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    folder = tiny_teachers["hf"].removeprefix("hf-clip:")
    t = load_teacher(tiny_teachers["hf"])
    model = CLIPModel.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    proc = CLIPImageProcessor.from_pretrained(folder)
    img, texts = _image(1), ["dermoscopy of a melanoma", "histology"]
    with torch.no_grad():
        ri = model.get_image_features(**proc(images=img, return_tensors="pt"))
        rt = model.get_text_features(**tok(texts, padding=True, return_tensors="pt"))
    ri = ri if torch.is_tensor(ri) else ri.pooler_output
    rt = rt if torch.is_tensor(rt) else rt.pooler_output
    torch.testing.assert_close(t.encode_image(t.image_transform(img)[None]), F.normalize(ri, dim=-1))
    torch.testing.assert_close(t.encode_text(t.tokenize(texts)), F.normalize(rt, dim=-1), atol=1e-5, rtol=1e-5)
    assert t.embed_dim == 40


def test_teacher_is_frozen_and_stays_in_eval(tiny_teachers):
    t = load_teacher(tiny_teachers["oc"])
    t.train()
    assert not t.training and not any(m.training for m in t.modules())
    assert not any(p.requires_grad for p in t.parameters())
    out = t.encode_text(t.tokenize(["x"]))
    assert not out.requires_grad and out.dtype == torch.float32
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(1))


def test_view_transform_crops_then_resizes(tiny_teachers):
    t = load_teacher(tiny_teachers["oc"])
    img = Image.new("RGB", (40, 40), (0, 0, 0))
    img.paste((255, 255, 255), (20, 0, 40, 40))  # right half white
    left = t.view_transform(img, [0.0, 0.0, 0.5, 1.0, 0.0])
    flipped_right = t.view_transform(img, [0.5, 0.0, 0.5, 1.0, 1.0])
    assert left.shape == (3, 32, 32)
    black, white = (0 - 0.5) / 0.25, (1 - 0.5) / 0.25
    assert torch.allclose(left, torch.full_like(left, black), atol=1e-4)
    assert torch.allclose(flipped_right, torch.full_like(left, white), atol=1e-4)


def test_py_backend_loads_custom_teacher(tmp_path, tiny_teachers, monkeypatch):
    mod = tmp_path / "my_custom_teacher.py"
    mod.write_text(textwrap.dedent(f"""
        from teachers import load_teacher
        def make(device="cpu"):
            return load_teacher({tiny_teachers['oc']!r}, device=device)
        def not_a_teacher(device="cpu"):
            return 42
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    t = load_teacher("py:my_custom_teacher:make")
    assert isinstance(t, Teacher) and t.spec == "py:my_custom_teacher:make" and t.embed_dim == 24
    with pytest.raises(TypeError, match="expected a teachers.Teacher"):
        load_teacher("py:my_custom_teacher:not_a_teacher")
    with pytest.raises(AttributeError, match="no callable 'missing'"):
        load_teacher("py:my_custom_teacher:missing")
    with pytest.raises(ImportError, match="cannot import module"):
        load_teacher("py:no_such_module_xyz:make")
    sys.modules.pop("my_custom_teacher", None)


def test_describe_has_cache_attrs(tiny_teachers):
    d = load_teacher(tiny_teachers["hf"]).describe()
    assert d["embed_dim"] == 40 and d["image_size"] == [32, 32] and d["context_length"] == 32
    assert d["spec"] == tiny_teachers["hf"] and d["logit_scale"] > 1
