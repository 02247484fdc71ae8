"""`py:` adapters for models that need their own code: `OpenClipTeacher.from_parts` (what they return) and the
UniMed-CLIP example's checkpoint conversion (docs/examples/unimed_clip_teacher.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from teachers import load_teacher
from teachers.open_clip_teacher import OpenClipTeacher
from teachers.transforms import PreprocessCfg, make_eval_transform

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"


@pytest.fixture
def unimed_example(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    import unimed_clip_teacher  # noqa: PLC0415 (lazy: importable only after the syspath_prepend above; popped after)

    yield unimed_clip_teacher
    sys.modules.pop("unimed_clip_teacher", None)


def _tiny_clip(folder: Path, **kw):
    """The tiny open_clip model of distill/tiny_models.py rebuilt from its config, with extra CLIP kwargs."""
    cfg = json.loads((folder / "open_clip_config.json").read_text())["model_cfg"]
    model = open_clip.CLIP(**cfg, **kw)
    model.load_state_dict(load_file(folder / "open_clip_model.safetensors"), strict=False)
    return model.eval()


def test_from_parts_wraps_a_model_built_elsewhere(tiny_teachers):
    """A fork's model, transform and tokenizer (here stock open_clip's) become a Teacher equal to the model."""
    folder = Path(tiny_teachers["oc"].removeprefix("local-dir:"))
    model = _tiny_clip(folder, init_logit_bias=-5.0)  # a sigmoid (SigLIP-style) open_clip model
    cfg = PreprocessCfg(image_size=(32, 32), mean=(0.5,) * 3, std=(0.25,) * 3)
    tok = open_clip.get_tokenizer(tiny_teachers["oc"])
    t = OpenClipTeacher.from_parts(model, make_eval_transform(cfg), tok, spec="unimed-clip:tiny", preprocess_cfg=cfg)
    img = Image.fromarray((np.random.default_rng(0).random((40, 50, 3)) * 255).astype("uint8"))
    with torch.no_grad():
        ref_i = F.normalize(model.encode_image(make_eval_transform(cfg)(img)[None]), dim=-1)
        ref_t = F.normalize(model.encode_text(tok(["a ct scan of the chest"])), dim=-1)
    torch.testing.assert_close(t.encode_image(t.image_transform(img)[None]), ref_i)
    torch.testing.assert_close(t.encode_text(t.tokenize(["a ct scan of the chest"])), ref_t)
    assert t.embed_dim == 24 and t.logit_bias == pytest.approx(-5.0) and t.spec == "unimed-clip:tiny"
    assert t.describe()["logit_bias"] == pytest.approx(-5.0) and t.context_length == tok.context_length
    assert load_teacher(tiny_teachers["oc"]).logit_bias is None  # a softmax CLIP has none


def test_unimed_convert_keeps_the_tensors_and_unpickles_nothing_else(unimed_example, tmp_path):
    """The release's checkpoints hold a DDP `module.`-prefixed state_dict beside numpy training metadata."""
    state = {"module.visual.proj": torch.randn(4, 3), "module.logit_scale": torch.tensor(4.6)}
    torch.save({"state_dict": state, "epoch": np.int64(31), "best_acc": np.float64(0.61)}, tmp_path / "ckpt.pt")
    unimed_example.convert(str(tmp_path / "ckpt.pt"), str(tmp_path / "w.safetensors"))
    got = load_file(tmp_path / "w.safetensors")
    assert set(got) == {"visual.proj", "logit_scale"}
    torch.testing.assert_close(got["visual.proj"], state["module.visual.proj"])

    class Payload:  # anything else in the pickle is refused, not executed
        def __reduce__(self):
            return (print, ("ran",))

    torch.save({"state_dict": state, "x": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        unimed_example.convert(str(tmp_path / "evil.pt"), str(tmp_path / "evil.safetensors"))
    assert not (tmp_path / "evil.safetensors").exists()


def test_unimed_fork_missing_is_one_clear_line(unimed_example, tmp_path):
    with pytest.raises(FileNotFoundError, match="set UNIMED_CLIP_SRC to the src folder of a UniMed-CLIP clone"):
        unimed_example.fork(str(tmp_path))
