"""Teachers: the spec parser, the alias registry, and each back-end against the library called directly."""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from huggingface_hub import constants
from open_clip import factory, pretrained
from open_clip.pretrained import get_pretrained_cfg
from PIL import Image
from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

from teachers import Teacher, TeacherLoadError, load_teacher, parse_spec, resolve_spec
from teachers.kernel.registry import Registry
from teachers.open_clip_teacher import open_clip_args
from teachers.registry import TEACHER_ALIASES, list_teachers


def _image(seed: int = 0, size=(50, 60)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((*size, 3)) * 255).astype("uint8"))


# -- spec parsing --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "spec,kind,target",
    [
        ("hf-hub:microsoft/BiomedCLIP", "hf-hub", "microsoft/BiomedCLIP"),
        ("local-dir:/tmp/x", "local-dir", "/tmp/x"),
        ("ViT-B-16/openai", "open_clip", "ViT-B-16/openai"),
        ("hf-clip:vinid/plip", "hf-clip", "vinid/plip"),
        ("py:my.mod:make", "py", "my.mod:make"),
        ("biomedclip", "alias", "biomedclip"),
    ],
)
def test_parse_spec_forms(spec, kind, target):
    s = parse_spec(spec)
    assert (s.kind, s.target, s.raw) == (kind, target, spec)


@pytest.mark.parametrize(
    "bad,match",
    [
        ("", "empty"),
        ("hf-hub:", "nothing after"),
        ("hf-hub:norepo", "ORG/REPO"),
        ("py:mod", "module.path:function"),
        ("s3:bucket/x", "unknown prefix"),
    ],
)
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
    assert t.logit_scale == pytest.approx(float(model.logit_scale.detach().exp()))


def test_hf_clip_matches_transformers(tiny_teachers):
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
    mod.write_text(
        textwrap.dedent(f"""
        from teachers import load_teacher
        def make(device="cpu"):
            return load_teacher({tiny_teachers["oc"]!r}, device=device)
        def not_a_teacher(device="cpu"):
            return 42
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    t = load_teacher("py:my_custom_teacher:make")
    assert isinstance(t, Teacher) and t.spec == "py:my_custom_teacher:make" and t.embed_dim == 24
    with pytest.raises(TypeError, match="expected a teachers.Teacher"):
        load_teacher("py:my_custom_teacher:not_a_teacher")
    with pytest.raises(AttributeError, match="no callable 'missing'"):
        load_teacher("py:my_custom_teacher:missing")
    with pytest.raises(ImportError, match="no module named 'no_such_module_xyz'"):  # also a TeacherLoadError
        load_teacher("py:no_such_module_xyz:make")
    sys.modules.pop("my_custom_teacher", None)


def test_describe_has_cache_attrs(tiny_teachers):
    d = load_teacher(tiny_teachers["hf"]).describe()
    assert d["embed_dim"] == 40 and d["image_size"] == [32, 32] and d["context_length"] == 32
    assert d["spec"] == tiny_teachers["hf"] and d["logit_scale"] > 1


# -- hub ids through an offline Hugging Face cache -------------------------------------------------------
def _fake_hub_repo(cache: Path, repo_id: str, files: list[Path], commit: str = "0" * 40) -> Path:
    """What `huggingface_hub` leaves after a download: models--ORG--REPO/{refs/main, snapshots/COMMIT/FILE}."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for f in files:
        shutil.copyfile(f, snap / f.name)
    return snap


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty offline hub cache in tmp: HF_HUB_CACHE as a fresh process with the variable set would see it."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # read at import; the loaders read it per call
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def _encode_oc(model, preprocess, tok, img, texts):
    with torch.no_grad():
        return (
            F.normalize(model.eval().encode_image(preprocess(img)[None]), dim=-1),
            F.normalize(model.encode_text(tok(texts)), dim=-1),
        )


def test_open_clip_hf_hub_matches_open_clip(tiny_teachers, hub_cache):
    folder = Path(tiny_teachers["oc"].removeprefix("local-dir:"))
    _fake_hub_repo(
        hub_cache, "fake-org/tiny-oc", [folder / "open_clip_config.json", folder / "open_clip_model.safetensors"]
    )
    t = load_teacher("hf-hub:fake-org/tiny-oc")
    model, _, preprocess = open_clip.create_model_and_transforms("hf-hub:fake-org/tiny-oc")
    ref_i, ref_t = _encode_oc(
        model,
        preprocess,
        open_clip.get_tokenizer("hf-hub:fake-org/tiny-oc"),
        _image(2),
        ["a ct scan", "an mri of the brain"],
    )
    got_i = t.encode_image(t.image_transform(_image(2))[None])
    got_t = t.encode_text(t.tokenize(["a ct scan", "an mri of the brain"]))
    torch.testing.assert_close(got_i, ref_i)
    torch.testing.assert_close(got_t, ref_t)
    # the hub copy holds the same weights as the folder: the weights were really loaded, not initialised
    local = load_teacher(tiny_teachers["oc"])
    torch.testing.assert_close(got_i, local.encode_image(local.image_transform(_image(2))[None]))
    assert t.spec == "hf-hub:fake-org/tiny-oc" and t.embed_dim == 24 and t.preprocess_cfg.std == (0.25,) * 3


def test_hf_hub_repo_without_weights_is_refused(tiny_teachers, hub_cache):
    """open_clip alone would warn and return a randomly initialised model; a teacher must not."""
    folder = Path(tiny_teachers["oc"].removeprefix("local-dir:"))
    _fake_hub_repo(hub_cache, "fake-org/no-weights", [folder / "open_clip_config.json"])
    with pytest.raises(TeacherLoadError, match=r"'hf-hub:fake-org/no-weights'.*could not be loaded"):
        load_teacher("hf-hub:fake-org/no-weights")
    with pytest.raises(TeacherLoadError, match=r"(?s)'hf-hub:fake-org/absent'.*HF_HUB_OFFLINE=1.*" + str(hub_cache)):
        load_teacher("hf-hub:fake-org/absent")
    with pytest.raises(
        TeacherLoadError, match=r"(?s)SPEC 'hf-clip:fake-org/absent' with the hf-clip back-end.*HF_HUB_OFFLINE"
    ):
        load_teacher("hf-clip:fake-org/absent")
    with pytest.raises(TeacherLoadError, match=f"folder {hub_cache}/nope not found"):
        load_teacher(f"hf-clip:{hub_cache}/nope")


def test_hf_clip_hub_id_matches_transformers(tiny_teachers, hub_cache):
    folder = Path(tiny_teachers["hf"].removeprefix("hf-clip:"))
    _fake_hub_repo(hub_cache, "fake-org/tiny-hf", sorted(p for p in folder.iterdir() if p.is_file()))
    t = load_teacher("hf-clip:fake-org/tiny-hf")
    model = CLIPModel.from_pretrained("fake-org/tiny-hf").eval()
    tok = AutoTokenizer.from_pretrained("fake-org/tiny-hf")
    proc = CLIPImageProcessor.from_pretrained("fake-org/tiny-hf")
    img, texts = _image(3), ["a chest x-ray with pneumonia"]
    with torch.no_grad():
        ri = model.get_image_features(**proc(images=img, return_tensors="pt"))
        rt = model.get_text_features(**tok(texts, padding=True, return_tensors="pt"))
    ri = ri if torch.is_tensor(ri) else ri.pooler_output
    rt = rt if torch.is_tensor(rt) else rt.pooler_output
    got_i = t.encode_image(t.image_transform(img)[None])
    torch.testing.assert_close(got_i, F.normalize(ri, dim=-1))
    torch.testing.assert_close(t.encode_text(t.tokenize(texts)), F.normalize(rt, dim=-1), atol=1e-5, rtol=1e-5)
    local = load_teacher(tiny_teachers["hf"])  # same weights as the folder
    torch.testing.assert_close(got_i, local.encode_image(local.image_transform(img)[None]))
    assert t.embed_dim == 40 and t.spec == "hf-clip:fake-org/tiny-hf"


def test_builtin_model_tag_spec_resolves_like_open_clip():
    """No real tag can be downloaded here: check what reaches open_clip, with open_clip's own tag table."""
    name, tag, kw = open_clip_args(parse_spec("ViT-B-32/openai"))
    assert (name, tag) == ("ViT-B-32", "openai") and get_pretrained_cfg(name, tag)["hf_hub"]
    assert kw == {"require_pretrained": True, "force_quick_gelu": True}  # OpenAI weights were trained with QuickGELU
    name, tag, kw = open_clip_args(parse_spec("ViT-B-16/laion2b_s34b_b88k"))
    assert (name, tag, kw) == ("ViT-B-16", "laion2b_s34b_b88k", {"require_pretrained": True})
    with pytest.raises(ValueError, match=r"'nosuchtag' is not a pretrained tag of ViT-B-32; known tags: .*openai"):
        open_clip_args(parse_spec("ViT-B-32/nosuchtag"))
    with pytest.raises(ValueError, match=r"'ViT-B-33' is not an open_clip built-in model; did you mean ViT-B-32"):
        open_clip_args(parse_spec("ViT-B-33/openai"))


def test_builtin_model_tag_loads_its_weights_through_the_hub_cache(tiny_teachers, hub_cache, monkeypatch):
    """The real MODEL/TAG path, end to end, on a tiny built-in registered for the test: open_clip's config and
    tag tables -> hf_hub_download from the offline cache -> strict checkpoint load -> the tag's preprocessing."""
    folder = Path(tiny_teachers["oc"].removeprefix("local-dir:"))
    cfg = json.loads((folder / "open_clip_config.json").read_text())
    monkeypatch.setitem(factory._MODEL_CONFIGS, "Tiny-OC-test", cfg["model_cfg"])
    tag_cfg = pretrained._pcfg(
        hf_hub="fake-org/tiny-oc-tag/", quick_gelu=True, mean=(0.4, 0.4, 0.4), std=(0.2, 0.3, 0.2)
    )
    monkeypatch.setitem(pretrained._PRETRAINED, "Tiny-OC-test", {"fake_tag": tag_cfg})
    _fake_hub_repo(hub_cache, "fake-org/tiny-oc-tag", [folder / "open_clip_model.safetensors"])

    t = load_teacher("Tiny-OC-test/fake-tag")
    model, _, preprocess = open_clip.create_model_and_transforms(
        "Tiny-OC-test", pretrained="fake_tag", force_quick_gelu=True
    )
    texts = ["ultrasound of the breast"]
    ref_i, ref_t = _encode_oc(model, preprocess, open_clip.get_tokenizer("Tiny-OC-test"), _image(4), texts)
    got_i = t.encode_image(t.image_transform(_image(4))[None])
    torch.testing.assert_close(got_i, ref_i)
    torch.testing.assert_close(t.encode_text(t.tokenize(texts)), ref_t)
    assert t.preprocess_cfg.mean == (0.4, 0.4, 0.4) and t.preprocess_cfg.std == (0.2, 0.3, 0.2)  # the tag's
    with pytest.warns(UserWarning, match="QuickGELU mismatch"):  # what open_clip says without the flag
        plain, _, _ = open_clip.create_model_and_transforms("Tiny-OC-test", pretrained="fake_tag")
    with torch.no_grad():  # without QuickGELU the same weights give other embeddings: the flag matters
        other = F.normalize(plain.eval().encode_image(preprocess(_image(4))[None]), dim=-1)
    assert (other - got_i).abs().max() > 1e-4


def test_aliases_are_the_issues_table():
    assert {n: TEACHER_ALIASES.get(n) for n in list_teachers()} == {
        "biomedclip": "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224",
        "quiltnet-b32": "hf-hub:wisdomik/QuiltNet-B-32",
        "quiltnet-b16": "hf-hub:wisdomik/QuiltNet-B-16",
        "genmedclip": "hf-hub:wisdomik/GenMedClip",
        "plip": "hf-clip:vinid/plip",
        "pubmedclip": "hf-clip:flaviagiammarino/pubmed-clip-vit-base-patch32",
        "medsiglip": "hf:google/medsiglip-448",
        "conceptclip": "hf:JerrryNie/ConceptCLIP",
    }
    for name in list_teachers():
        assert resolve_spec(name).backend == (
            "open_clip"
            if name in ("biomedclip", "genmedclip") or name.startswith("quiltnet")
            else "hf"
            if name in ("medsiglip", "conceptclip")
            else "hf-clip"
        )


# -- device, no gradients, autocast ----------------------------------------------------------------------
def test_teacher_encodes_on_cpu_without_autocast_or_graph(tiny_teachers):
    t = load_teacher(tiny_teachers["hf"], device="cpu")
    assert t.device == torch.device("cpu") and t.autocast_dtype is None
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    out = t.encode_image(x)  # even an input that asks for gradients builds no graph
    assert out.grad_fn is None and not out.requires_grad and out.device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("which", ["oc", "hf"])
def test_teacher_on_gpu_uses_autocast_and_matches_cpu(tiny_teachers, which):
    cpu = load_teacher(tiny_teachers[which], device="cpu")
    gpu = load_teacher(tiny_teachers[which], device="cuda")
    assert gpu.device.type == "cuda" and gpu.autocast_dtype in (torch.bfloat16, torch.float16)
    assert all(p.device.type == "cuda" and not p.requires_grad for p in gpu.parameters()) and not gpu.training
    x = torch.stack([cpu.image_transform(_image(i)) for i in range(4)])
    tokens = cpu.tokenize(["a ct scan of the chest", "an mri of the brain"])
    seen = []
    hook = gpu.trunk.register_forward_hook(lambda m, a, o: seen.append(torch.is_autocast_enabled("cuda")))
    got_i, got_t = gpu.encode_image(x), gpu.encode_text(tokens)
    hook.remove()
    assert got_i.device.type == "cuda" and got_i.dtype == torch.float32 and not got_i.requires_grad
    torch.testing.assert_close(got_i.norm(dim=-1), torch.ones(4, device="cuda"))
    torch.testing.assert_close(got_i.cpu(), cpu.encode_image(x), atol=3e-2, rtol=0)  # bf16 vs fp32
    torch.testing.assert_close(got_t.cpu(), cpu.encode_text(tokens), atol=3e-2, rtol=0)
