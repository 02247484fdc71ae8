"""The `hf:` back-end on tiny models of each class it loads (SiglipModel, a repo's own code in both call styles),
against the library called directly; trust_remote_code from flag to cache attrs; what it refuses, in one line."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import h5py
import httpx2
import huggingface_hub
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers.dynamic_module_utils as dmu
from huggingface_hub import constants
from huggingface_hub.errors import GatedRepoError
from PIL import Image
from test_cli_errors import eval_argv, task  # noqa: F401  (the 4-image retrieval task fixture)
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer, SiglipModel

from cache import CacheJob, build_cache, open_corpus
from cache.store.layout import feature
from cache.store.layout import teacher as teacher_group
from distill.cli import main
from distill.errors import BAD_INPUT
from distill.tiny_models import make_tiny_hf_siglip, make_tiny_hf_siglip2_naflex, make_tiny_remote_code
from teachers import TeacherLoadError, load_teacher
from teachers.kernel.modality import Modality

ATOL = 2e-3  # float16 storage of unit vectors
TEXTS = ["dermoscopy of a melanoma", "an mri of the brain showing a large tumour"]


def _image(seed: int = 0, size=(50, 60)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((*size, 3)) * 255).astype("uint8"))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf_models")
    return {
        "siglip": make_tiny_hf_siglip(root / "siglip", seed=3),
        "naflex": make_tiny_hf_siglip2_naflex(root / "naflex"),
        "remote": make_tiny_remote_code(root / "remote", seed=4),
        "oc_style": make_tiny_remote_code(root / "oc_style", style="open_clip", seed=5),
    }


@pytest.fixture(autouse=True)
def modules_cache(tmp_path, monkeypatch):
    """Remote code is copied into transformers' modules cache: a temporary one, not the user's."""
    monkeypatch.setattr(dmu, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))


def _library_siglip(folder: Path, img: Image.Image, texts, **tok_kw):
    """SigLIP as transformers documents it: the image processor, the tokenizer padded to max_length."""
    model = SiglipModel.from_pretrained(str(folder)).eval()
    tok = AutoTokenizer.from_pretrained(str(folder))
    t = tok(texts, truncation=True, return_tensors="pt", **tok_kw)
    with torch.no_grad():
        i = model.get_image_features(**AutoImageProcessor.from_pretrained(str(folder))(images=img, return_tensors="pt"))
        t = model.get_text_features(input_ids=t["input_ids"], attention_mask=t["attention_mask"])
    return F.normalize(i.pooler_output, dim=-1), F.normalize(t.pooler_output, dim=-1)


def test_siglip_matches_transformers(models):
    t = load_teacher(f"hf:{models['siglip']}")
    img = _image(1)
    ref_i, ref_t = _library_siglip(models["siglip"], img, TEXTS, padding="max_length", max_length=16)
    torch.testing.assert_close(t.encode_image(t.image_transform(img)[None]), ref_i)
    got_t = t.encode_text(t.tokenize(TEXTS))
    torch.testing.assert_close(got_t, ref_t, atol=1e-5, rtol=1e-5)
    # SigLIP pools the last position: padding short captions to the longest instead gives other embeddings
    short = ["a ct scan", "an mri of the brain"]
    _, longest = _library_siglip(models["siglip"], img, short, padding="longest")
    assert (longest - t.encode_text(t.tokenize(short))).abs().max() > 1e-3
    # no projection_dim in SigLIP's config: the dimension is the towers' width; scale and bias are the model's
    assert t.embed_dim == 32 and t.context_length == 16
    assert t.logit_scale == pytest.approx(7.0, rel=1e-5) and t.logit_bias == pytest.approx(-3.5)
    cfg = t.preprocess_cfg  # views are resized as the processor resizes: squash to 32 x 32, mean/std 0.5
    assert (cfg.image_size, cfg.resize_mode, cfg.mean, cfg.interpolation) == ((32, 32), "squash", (0.5,) * 3, "bicubic")
    assert t.describe()["logit_bias"] == pytest.approx(-3.5)
    assert "logit_bias" not in load_teacher(f"hf:{models['remote']}", trust_remote_code=True).describe()


def test_hf_clip_prefix_is_the_same_backend(models):
    a, b = load_teacher(f"hf:{models['siglip']}"), load_teacher(f"hf-clip:{models['siglip']}")
    x = a.image_transform(_image(2))[None]
    torch.testing.assert_close(a.encode_image(x), b.encode_image(x))
    assert b.spec == f"hf-clip:{models['siglip']}" and b.logit_bias == a.logit_bias


def test_naflex_siglip2_is_refused_in_one_line(models):
    with pytest.raises(TeacherLoadError, match=r"Siglip2Model is a NaFlex model .*fixed-resolution") as e:
        load_teacher(f"hf:{models['naflex']}")
    assert "\n" not in str(e.value)


def test_remote_code_loads_only_with_the_flag(models):
    spec = f"hf:{models['remote']}"
    with pytest.raises(TeacherLoadError, match=r"contains its own model code .*pass --trust-remote-code") as e:
        load_teacher(spec)
    assert "\n" not in str(e.value)
    t = load_teacher(spec, trust_remote_code=True)
    folder = str(models["remote"])
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    img = _image(3)
    proc = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
    enc = tok(TEXTS, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        ri = model.get_image_features(**proc(images=img, return_tensors="pt"))
        rt = model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    torch.testing.assert_close(t.encode_image(t.image_transform(img)[None]), F.normalize(ri, dim=-1))
    torch.testing.assert_close(t.encode_text(t.tokenize(TEXTS)), F.normalize(rt, dim=-1), atol=1e-5, rtol=1e-5)
    assert type(t.trunk).__name__ == "TinyDualModel" and t.embed_dim == 20
    assert t.logit_scale == pytest.approx(float(np.exp(2.5)))


def test_open_clip_style_remote_model_uses_encode_calls(models):
    """Models built on open_clip with their own code (ConceptCLIP) expose encode_image / encode_text, returning a
    tuple or a dict; the back-end reads them as the models' own evaluation code does."""
    folder = str(models["oc_style"])
    t = load_teacher(f"hf:{folder}", trust_remote_code=True)
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    ids = tok(TEXTS, padding="max_length", max_length=16, truncation=True, return_tensors="pt")["input_ids"]
    img = _image(4)
    with torch.no_grad():
        ri = model.encode_image(
            AutoImageProcessor.from_pretrained(folder)(images=img, return_tensors="pt")["pixel_values"]
        )[0]
        rt = model.encode_text(ids)["text_features"]
    torch.testing.assert_close(t.encode_image(t.image_transform(img)[None]), F.normalize(ri, dim=-1))
    torch.testing.assert_close(t.encode_text(t.tokenize(TEXTS)), F.normalize(rt, dim=-1), atol=1e-5, rtol=1e-5)


def _cached(out: Path, name: str) -> tuple[np.ndarray, np.ndarray, dict]:
    with h5py.File(out, "r") as f:
        return (
            f[feature(name, Modality.IMAGE)][:].astype(np.float32),
            f[feature(name, Modality.TEXT)][:].astype(np.float32),
            dict(f[teacher_group(name)].attrs),
        )


def test_siglip_cache_equals_the_library_and_stores_its_logit_bias(models, tiny_corpus, tmp_path):
    out = tmp_path / "features.h5"
    build_cache(
        CacheJob(
            data=str(tiny_corpus),
            teachers={"sig": f"hf:{models['siglip']}"},
            out=str(out),
            num_workers=0,
            batch_size=8,
            chunk_rows=16,
            progress=False,
        )
    )
    img, txt, attrs = _cached(out, "sig")
    corpus = open_corpus(tiny_corpus)
    for row in (0, 17):
        ref_i, ref_t = _library_siglip(
            models["siglip"], corpus.load_image(row), [corpus.captions[row]], padding="max_length", max_length=16
        )
        np.testing.assert_allclose(img[row], ref_i[0].numpy(), atol=ATOL)
        np.testing.assert_allclose(txt[row], ref_t[0].numpy(), atol=ATOL)
    assert float(attrs["logit_bias"]) == pytest.approx(-3.5) and float(attrs["logit_scale"]) == pytest.approx(7.0)
    assert not bool(attrs["trust_remote_code"]) and attrs["resize_mode"] == "squash"


def test_cli_cache_needs_trust_remote_code_and_records_it(models, tiny_corpus, tmp_path, capsys):
    argv = [
        "cache",
        "--data",
        str(tiny_corpus),
        "--teacher",
        f"r=hf:{models['remote']}",
        "--device",
        "cpu",
        "--num-workers",
        "0",
        "--out",
        str(tmp_path / "f.h5"),
    ]
    assert main(argv) == BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pass --trust-remote-code" in err and "'hf:" in err
    assert main([*argv, "--trust-remote-code"]) == 0
    img, txt, attrs = _cached(tmp_path / "f.h5", "r")
    assert bool(attrs["trust_remote_code"]) is True and "logit_bias" not in attrs
    t = load_teacher(f"hf:{models['remote']}", trust_remote_code=True)
    corpus = open_corpus(tiny_corpus)
    np.testing.assert_allclose(img[5], t.encode_image(t.image_transform(corpus.load_image(5))[None])[0], atol=ATOL)
    np.testing.assert_allclose(txt[5], t.encode_text(t.tokenize([corpus.captions[5]]))[0], atol=ATOL)


def test_cli_eval_passes_trust_remote_code(models, task, tmp_path, capsys):  # noqa: F811
    argv = eval_argv(f"hf:{models['remote']}", task, tmp_path / "r")
    assert main(argv) == BAD_INPUT
    assert "pass --trust-remote-code" in capsys.readouterr().err
    assert main([*argv, "--trust-remote-code"]) == 0 and (tmp_path / "r" / "report.json").is_file()


def test_py_teacher_receives_trust_remote_code(tmp_path, monkeypatch, models):
    """An adapter for a model with its own code runs it only when the user passed the flag."""
    spec = "hf:" + str(models["remote"])
    (tmp_path / "my_remote_adapter.py").write_text(
        textwrap.dedent(f"""
        from teachers import load_teacher
        SEEN = []
        def make(device="cpu", trust_remote_code=False):
            SEEN.append(trust_remote_code)
            return load_teacher({spec!r}, device, trust_remote_code=trust_remote_code)
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(TeacherLoadError, match="pass --trust-remote-code"):
        load_teacher("py:my_remote_adapter:make")
    assert load_teacher("py:my_remote_adapter:make", trust_remote_code=True).embed_dim == 20
    assert sys.modules["my_remote_adapter"].SEEN == [False, True]
    sys.modules.pop("my_remote_adapter", None)


def test_gated_hub_model_is_named_with_what_to_do(tmp_path, monkeypatch):
    """MedSigLIP and ConceptCLIP are gated: without accepted terms the Hub answers 401/403; say what to do."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # nothing cached
    monkeypatch.setattr(huggingface_hub, "is_offline_mode", lambda: False)

    def gated(url, **kw):
        raise GatedRepoError(
            "401 Client Error: access to model google/medsiglip-448 is restricted",
            response=httpx2.Response(401, request=httpx2.Request("HEAD", url)),
        )

    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", gated)
    with pytest.raises(
        TeacherLoadError,
        match=r"'medsiglip' \(alias of hf:google/medsiglip-448\).*is gated.*"
        r"accept its terms on https://huggingface.co/google/medsiglip-448"
        r".*hf auth login",
    ):
        load_teacher("medsiglip")
