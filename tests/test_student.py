"""Student presets, build, projection heads and freezing (tiny models on CPU; the big presets on the meta device)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from open_clip.transformer import PatchDropout as OpenClipPatchDropout
from safetensors.torch import load_file
from timm.layers import PatchDropout as TimmPatchDropout
from transformers import AutoTokenizer

from distill.training.heads import ProjectionHeads
from student import (
    build_student,
    freeze_image_blocks,
    get_preset,
    instantiate,
    list_presets,
    lock_text_layers,
    parameter_summary,
    set_grad_checkpointing,
    set_patch_dropout,
    write_text_config,
)
from student.build import _point_text_at
from student.tokenizer import train_wordpiece


def _captions(corpus: Path) -> list[str]:
    with open(corpus, newline="") as f:
        return [row["caption"] for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def wordpiece(tiny_corpus, tmp_path_factory) -> Path:
    """A WordPiece tokenizer trained on the tiny corpus captions."""
    return train_wordpiece(_captions(tiny_corpus), tmp_path_factory.mktemp("tok"), vocab_size=300, model_max_length=32)


@pytest.fixture(scope="module")
def tiny(wordpiece, tmp_path_factory):
    torch.manual_seed(0)
    return build_student("tiny", tmp_path_factory.mktemp("run") / "student", tokenizer_dir=wordpiece)


def _meta_model(name: str, folder: Path, **vision):
    """A preset's model on the meta device (no memory, no init time), its BERT config written to `folder`."""
    preset = get_preset(name)
    write_text_config(preset.text_config, folder)
    cfg = _point_text_at(preset.model_cfg, folder)
    cfg["vision_cfg"].update(vision)
    with torch.device("meta"):
        return instantiate(cfg, preset.preprocess_cfg)


# ---------------------------------------------------------------- presets


def test_presets_registered_and_unknown_suggests():
    assert list_presets() == ["biomedclip", "biomedclip-small", "tiny"]
    with pytest.raises(KeyError, match="did you mean tiny"):
        get_preset("tinny")


def test_biomedclip_preset_is_biomedclips_open_clip_config():
    p = get_preset("biomedclip")
    bert = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"
    assert p.model_cfg == {
        "embed_dim": 512,
        "vision_cfg": {
            "timm_model_name": "vit_base_patch16_224",
            "timm_model_pretrained": False,
            "timm_pool": "",
            "timm_proj": "linear",
            "image_size": 224,
        },
        "text_cfg": {
            "hf_model_name": bert,
            "hf_tokenizer_name": bert,
            "hf_proj_type": "mlp",
            "hf_pooler_type": "cls_last_hidden_state_pooler",
            "context_length": 256,
        },
    }
    assert p.preprocess_cfg == {
        "mean": [0.48145466, 0.4578275, 0.40821073],
        "std": [0.26862954, 0.26130258, 0.27577711],
    }
    t = p.text_config
    assert (
        t["vocab_size"],
        t["hidden_size"],
        t["num_hidden_layers"],
        t["num_attention_heads"],
        t["intermediate_size"],
        t["max_position_embeddings"],
        t["type_vocab_size"],
    ) == (30522, 768, 12, 12, 3072, 512, 2)
    p.model_cfg["embed_dim"] = 1  # presets hand out copies
    assert p.model_cfg["embed_dim"] == 512


def test_biomedclip_parameter_count(tmp_path):
    m = _meta_model("biomedclip", tmp_path)
    vit_b16 = (
        768 * 3 * 16 * 16
        + 768
        + 768
        + 197 * 768
        + 12 * (4 * 768 + 3 * 768 * 768 + 3 * 768 + 768 * 768 + 768 + 2 * 768 * 3072 + 3072 + 768)
        + 2 * 768
    )
    bert_base = (
        (30522 + 512 + 2) * 768
        + 2 * 768
        + 12 * (4 * (768 * 768 + 768) + 2 * 768 + 768 * 3072 + 3072 + 3072 * 768 + 768 + 2 * 768)
    )
    assert sum(p.numel() for p in m.visual.trunk.parameters()) == vit_b16 == 85_798_656
    assert sum(p.numel() for p in m.text.transformer.parameters()) == bert_base == 108_891_648
    heads = 768 * 512 + 768 * 640 + 640 * 512  # linear image proj; mlp text proj (768 -> 640 -> 512)
    assert sum(p.numel() for p in m.parameters()) == vit_b16 + bert_base + heads + 1 == 195_902_721
    assert len(m.visual.trunk.blocks) == 12 and m.visual.trunk.patch_embed.img_size == (224, 224)


def test_biomedclip_small_shapes(tmp_path):
    m = _meta_model("biomedclip-small", tmp_path)
    assert m.visual.trunk.embed_dim == 384 and len(m.visual.trunk.blocks) == 12
    assert m.text.config.hidden_size == 512 and len(m.text.transformer.encoder.layer) == 6
    assert m.visual.head.proj.out_features == 512 and m.text.proj[-1].out_features == 512


def test_timm_tower_at_another_size_is_refused(tmp_path):
    with pytest.raises(ValueError, match="ignores image_size for timm"):
        _meta_model("biomedclip-small", tmp_path, image_size=96)


# ---------------------------------------------------------------- build


def test_tiny_build_folder_tokenizer_and_forward(tiny, wordpiece):
    d = tiny.student_dir
    cfg = json.loads((d / "open_clip_config.json").read_text())
    assert cfg["model_cfg"]["text_cfg"]["hf_model_name"] == str(d.resolve())
    assert cfg["model_cfg"]["text_cfg"]["hf_tokenizer_name"] == str(d.resolve())
    vocab = len(AutoTokenizer.from_pretrained(str(wordpiece)))
    assert json.loads((d / "config.json").read_text())["vocab_size"] == vocab == tiny.model.vocab_size
    assert not list(d.glob("*.safetensors"))  # a weightless export
    assert tiny.preprocess_cfg["size"] == (32, 32) and tiny.embed_dim == 64 and tiny.context_length == 32

    tokens = tiny.tokenizer(["a ct scan of a red circle", "mri"])
    assert tokens.dtype == torch.long and tokens.shape == (2, 32)
    assert tokens[0, 0].item() != tokens[0, -1].item()  # [CLS] first, padding last
    tiny.model.eval()
    with torch.no_grad():
        img = tiny.model.encode_image(torch.randn(3, 3, 32, 32), normalize=True)
        txt = tiny.model.encode_text(tokens, normalize=True)
        out = tiny.model(torch.randn(3, 3, 32, 32), tokens)
    assert img.shape == (3, 64) and txt.shape == (2, 64)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(out[2], torch.tensor(1 / 0.07))  # (image, text, logit_scale.exp())


def test_build_is_deterministic_under_seed(wordpiece, tmp_path):
    def state(seed, name):
        torch.manual_seed(seed)
        return build_student("tiny", tmp_path / name, tokenizer_dir=wordpiece).model.state_dict()

    a, b, c = state(0, "a"), state(0, "b"), state(1, "c")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["visual.conv1.weight"], c["visual.conv1.weight"])
    assert not torch.equal(
        a["text.transformer.encoder.layer.0.attention.self.query.weight"],
        c["text.transformer.encoder.layer.0.attention.self.query.weight"],
    )


def test_build_overrides(wordpiece, tmp_path):
    b = build_student(
        "tiny",
        tmp_path / "s",
        tokenizer_dir=wordpiece,
        embed_dim=32,
        patch_dropout=0.5,
        text_config={"num_hidden_layers": 1},
    )
    assert isinstance(b.model.visual.patch_dropout, OpenClipPatchDropout) and b.model.visual.patch_dropout.prob == 0.5
    assert len(b.model.text.transformer.encoder.layer) == 1
    with torch.no_grad():
        assert b.model.eval().encode_text(b.tokenizer(["ct"])).shape == (1, 32)
    with pytest.raises(ValueError, match="unknown student override 'embed_dims'"):
        build_student("tiny", tmp_path / "t", tokenizer_dir=wordpiece, embed_dims=32)


def test_build_errors_are_clear(wordpiece, tmp_path):
    with pytest.raises(ValueError, match="distill tokenizer"):
        build_student("tiny", tmp_path / "a")
    with pytest.raises(ValueError, match="did you mean tiny.*hf-hub:"):
        build_student("tinyy", tmp_path / "b", tokenizer_dir=wordpiece)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_student("tiny", tmp_path / "c", tokenizer_dir=tmp_path / "nowhere")
    with pytest.raises(ValueError, match="max_position_embeddings"):
        build_student("tiny", tmp_path / "d", tokenizer_dir=wordpiece, context_length=128)


def test_build_from_pretrained_spec_keeps_weights(tiny_teachers, tmp_path):
    """A SPEC initialises the student from its weights (here a plain open_clip CLIP with its own tokenizer)."""
    spec = tiny_teachers["oc"]
    b = build_student(spec, tmp_path / "student")
    src = load_file(str(Path(spec[len("local-dir:") :]) / "open_clip_model.safetensors"))
    sd = b.model.state_dict()
    assert src.keys() <= sd.keys() and all(torch.equal(sd[k], v) for k, v in src.items())
    assert (tmp_path / "student" / "open_clip_config.json").is_file()
    assert b.tokenizer(["x"]).shape == (1, 32)


# ---------------------------------------------------------------- heads


def test_projection_heads_shapes_and_gradients():
    torch.manual_seed(0)
    heads = ProjectionHeads(64, {"oc": 24, "hf": 40})
    img, txt = torch.randn(5, 64, requires_grad=True), torch.randn(5, 64)
    out = heads(img, txt)
    assert set(out) == {"oc", "hf"}
    assert out["oc"].image.shape == (5, 24) and out["oc"].text.shape == (5, 24)
    assert out["hf"].image.shape == (5, 40) and out["hf"].text.shape == (5, 40)
    torch.testing.assert_close(out["hf"].text, txt @ heads.text["hf"].weight.T)
    torch.testing.assert_close(out["oc"].image, img @ heads.of("image")["oc"].weight.T)
    assert not torch.equal(heads.image["oc"].weight, heads.text["oc"].weight)  # separate per modality
    names = [n for n, _ in heads.named_parameters()]  # this order: checkpoints' and the initialisation's
    assert names == ["image.oc.weight", "image.hf.weight", "text.oc.weight", "text.hf.weight"]
    out["oc"].image.sum().backward()
    assert img.grad is not None and heads.image["oc"].weight.grad is not None
    assert heads.image["hf"].weight.grad is None
    with pytest.raises(ValueError, match="'a.b'"):
        ProjectionHeads(8, {"a.b": 4})


# ---------------------------------------------------------------- freezing


def _frozen(model) -> set[str]:
    return {n for n, p in model.named_parameters() if not p.requires_grad}


def test_freeze_open_clip_vit_and_bert_exactly(wordpiece, tmp_path):
    torch.manual_seed(0)
    m = build_student(
        "tiny",
        tmp_path / "s",
        tokenizer_dir=wordpiece,
        text_config={"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
    ).model
    names = [n for n, _ in m.named_parameters()]
    total = parameter_summary(m)
    got = freeze_image_blocks(m, 1)
    want = {n for n in names if n.startswith(("visual.conv1.", "visual.ln_pre.", "visual.transformer.resblocks.0."))}
    want |= {"visual.class_embedding", "visual.positional_embedding"}
    assert set(got) == want == _frozen(m)
    got_text = lock_text_layers(m, 1)
    want_text = {
        n for n in names if n.startswith(("text.transformer.embeddings.", "text.transformer.encoder.layer.0."))
    }
    assert set(got_text) == want_text and _frozen(m) == want | want_text
    s = parameter_summary(m)
    n_frozen = sum(p.numel() for n, p in m.named_parameters() if n in want | want_text)
    assert s.total == total.total and s.trainable == total.total - n_frozen
    assert s.image_total - s.image_trainable == sum(p.numel() for n, p in m.named_parameters() if n in want)

    # one optimiser step moves trainable weights only
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    m.train()
    out = m(torch.randn(4, 3, 32, 32), torch.randint(5, m.text.vocab_size, (4, 32)))
    (out[0] @ out[1].T).diag().sum().neg().backward()
    opt.step()
    for n, p in m.named_parameters():
        if n in want | want_text:
            assert torch.equal(p, before[n]), n
    assert not torch.equal(
        m.visual.transformer.resblocks[1].mlp.c_fc.weight, before["visual.transformer.resblocks.1.mlp.c_fc.weight"]
    )
    assert not torch.equal(
        m.text.transformer.encoder.layer[1].output.dense.weight,
        before["text.transformer.encoder.layer.1.output.dense.weight"],
    )
    with pytest.raises(ValueError, match="has 2"):
        freeze_image_blocks(m, 3)


def test_freeze_timm_vit_exactly(tmp_path):
    m = _meta_model("biomedclip-small", tmp_path)
    names = [n for n, _ in m.named_parameters()]
    got = freeze_image_blocks(m, 3)
    want = {
        n
        for n in names
        if n.startswith(
            ("visual.trunk.patch_embed.", "visual.trunk.blocks.0.", "visual.trunk.blocks.1.", "visual.trunk.blocks.2.")
        )
    }
    want |= {"visual.trunk.cls_token", "visual.trunk.pos_embed"}
    assert set(got) == want == _frozen(m)
    assert freeze_image_blocks(m, 0) == []
    s = parameter_summary(m)
    assert s.image_total - s.image_trainable == 384 * 3 * 16 * 16 + 384 + 384 + 197 * 384 + 3 * (
        4 * 384 + 3 * 384 * 384 + 3 * 384 + 384 * 384 + 384 + 2 * 384 * 1536 + 1536 + 384
    )
    assert s.text_trainable == s.text_total


def test_patch_dropout_trains_only(tiny):
    m = tiny.model
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = m.eval().encode_image(x)
        set_patch_dropout(m, 0.5)
        torch.testing.assert_close(m.eval().encode_image(x), ref)  # eval unchanged
        torch.manual_seed(0)
        a = m.train().encode_image(x)
        torch.manual_seed(1)
        b = m.train().encode_image(x)
    assert not torch.allclose(a, b)
    set_patch_dropout(m, 0.0)
    with torch.no_grad():
        torch.testing.assert_close(m.train().encode_image(x), ref)
    m.eval()
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        set_patch_dropout(m, 1.0)


def test_patch_dropout_timm(tmp_path):
    m = _meta_model("biomedclip-small", tmp_path)
    set_patch_dropout(m, 0.25)
    assert isinstance(m.visual.trunk.patch_drop, TimmPatchDropout) and m.visual.trunk.patch_drop.prob == 0.25


def test_grad_checkpointing_same_gradients(wordpiece, tmp_path):
    def grads(ckpt: bool):
        torch.manual_seed(0)
        m = build_student(
            "tiny",
            tmp_path / f"s{ckpt}",
            tokenizer_dir=wordpiece,
            text_config={"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
        ).model
        if ckpt:
            set_grad_checkpointing(m, True)
            assert m.visual.transformer.grad_checkpointing
            assert any(getattr(x, "gradient_checkpointing", False) for x in m.text.transformer.modules())
        torch.manual_seed(1)
        out = m.train()(torch.randn(3, 3, 32, 32), torch.randint(5, m.text.vocab_size, (3, 32)))
        (out[0] @ out[1].T).logsumexp(-1).sum().backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys() and len(plain) > 40
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], atol=1e-6, rtol=1e-5, msg=n)
