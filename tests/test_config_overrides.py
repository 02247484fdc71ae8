"""The one config layer: refusals at load time (one line naming the key), list items by name or index, --help."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from distill.cli import main
from distill.config.train_config import Config, ConfigError, LossTermCfg
from distill.losses import CombineCfg, DistillLoss
from teachers.kernel.config_model import UnknownNameError

ROOT = Path(__file__).resolve().parents[1]
HYBRID = {"mode": "hybrid", "data": {"corpus": "c.csv", "features": "f.h5"}}
TERMS = {**HYBRID, "loss": {"terms": [{"kind": "infonce"}, {"kind": "feature", "weight": 50.0}, {"kind": "icl"}]}}


@pytest.mark.parametrize(
    "override, msg",
    [
        (
            "loss.combine.mode=bogus",
            r"^loss\.combine\.mode: combine mode 'bogus' is unknown; use one of weighted_sum, "
            r"random_teacher, confidence$",
        ),
        ("loss.combine.drop_prob=5", r"^loss\.combine\.drop_prob must be in \[0, 1\), got 5\.0$"),
        ("loss.combine.balance=phis", r"^loss\.combine\.balance: balance 'phis' is unknown; use one of none, phi_s$"),
        ("loss.terms.1.kind=feat", r"^loss\.terms\[1\]: unknown loss 'feat'; did you mean feature\?"),
        ("loss.terms.feature.kwargs={metric: l3}", r"^loss\.terms\[1\]: feature metric 'l3' is unknown"),
        ("loss.terms.feature.teachers={a: 0}", r"^loss\.terms\[1\]: loss term 'feature': every teacher weight is 0"),
        (
            "loss.terms.infonce.teachers={a: 1}",
            r"^loss\.terms\[0\]: loss term 'infonce' \(kind 'infonce'\) uses no "
            r"teachers; remove `teachers`$",
        ),
        ("loss.teachers={a: 0, b: 0}", r"^loss\.teachers: every weight is 0; give one teacher a weight > 0$"),
        (
            "loss.combine={mode: confidence, temprature: 2}",
            r"unknown key 'loss\.combine\.temprature'; did you mean "
            r"'temperature'\?",
        ),
        ("data.batch_size=eight", r"^override 'data\.batch_size=eight': data\.batch_size must be int, got 'eight'"),
        (
            "student.overrides.image_size=48",
            r"^student\.overrides\.image_size is not an override; set "
            r"student\.image_size instead$",
        ),
    ],
)
def test_refused_at_load_with_one_line_naming_the_key(override, msg):
    with pytest.raises(ConfigError, match=msg) as e:
        Config.from_dict(TERMS, [override])
    assert "\n" not in str(e.value)


def test_unknown_kind_is_a_config_error_and_the_registry_key_error():
    with pytest.raises(UnknownNameError) as e:
        Config.from_dict({**HYBRID, "loss": {"terms": [{"kind": "infonse"}, {"kind": "icl"}]}})
    assert isinstance(e.value, ValueError) and isinstance(e.value, KeyError)
    assert str(e.value).startswith("loss.terms[0]: unknown loss 'infonse'; did you mean infonce?")


def test_refused_before_any_file_is_opened(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("mode: hybrid\ndata: {corpus: /nowhere/c.csv, features: /nowhere/f.h5}\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: loss\.combine\.drop_prob must be in \[0, 1\), got 5\.0"):
        Config.from_yaml(p, ["loss.combine.drop_prob=5"])
    assert Config.from_yaml(p).data.corpus == "/nowhere/c.csv"  # the corpus is not opened by loading


def test_list_items_by_kind_name_and_index():
    cfg = Config.from_dict(
        TERMS, ["loss.terms.feature.weight=3", "loss.terms.2.weight=0.5", "loss.terms.infonce.kwargs.positives=caption"]
    )
    assert [(t.kind, t.weight) for t in cfg.loss.terms] == [("infonce", 1.0), ("feature", 3.0), ("icl", 0.5)]
    assert cfg.loss.terms[0].kwargs == {"positives": "caption"}
    named = {
        **HYBRID,
        "loss": {
            "terms": [
                {"kind": "infonce"},
                {"kind": "feature", "name": "feat_img"},
                {"kind": "feature", "name": "feat_txt"},
            ]
        },
    }
    cfg = Config.from_dict(named, ["loss.terms.feat_txt.weight=7", "loss.terms.1.weight=2"])
    assert [t.weight for t in cfg.loss.terms] == [1.0, 2.0, 7.0]
    with pytest.raises(
        ConfigError,
        match=r"2 items of loss\.terms have kind 'feature' \(1: feat_img, 2: feat_txt\); "
        r"address one by index, e.g\. loss\.terms\.1\.weight=3",
    ):
        Config.from_dict(named, ["loss.terms.feature.weight=3"])
    with pytest.raises(ConfigError, match=r"loss\.terms has no item named or of kind 'affinity'"):
        Config.from_dict(named, ["loss.terms.affinity.weight=3"])
    with pytest.raises(ConfigError, match=r"loss\.terms has 3 items .*there is no item 5"):
        Config.from_dict(named, ["loss.terms.5.weight=3"])


def test_empty_terms_take_the_modes_defaults_before_an_item_override():
    cfg = Config.from_dict(HYBRID, ["loss.terms.feature.weight=3"])
    assert [(t.kind, t.weight, t.kwargs) for t in cfg.loss.terms] == [
        ("infonce", 1.0, {}),
        ("feature", 3.0, {"metric": "cosine"}),
        ("icl", 1.0, {}),
    ]
    assert (
        Config.from_dict(HYBRID).terms
        == cfg.model_copy(update={"loss": cfg.loss.model_copy(update={"terms": ()})}).terms
    )  # the same defaults the run uses
    assert Config.from_dict({"mode": "contrastive", "data": {"corpus": "c"}}, ["loss.terms.0.weight=2"]).loss.terms == (
        LossTermCfg(kind="infonce", weight=2.0),
    )


def test_the_config_models_are_what_the_loss_reads():
    cfg = Config.from_dict(TERMS, ["loss.combine.mode=random_teacher", "loss.combine.drop_prob=0.25"])
    assert isinstance(cfg.loss.combine, CombineCfg) and isinstance(cfg.loss.terms[0], LossTermCfg)
    loss = DistillLoss(list(cfg.loss.terms), ["a", "b"], combine=cfg.loss.combine)
    assert str(loss) == "Loss = 1.0 * infonce + 50.0 * feature + 1.0 * icl"
    assert loss.combine_cfg is cfg.loss.combine


def test_student_image_size_is_the_key():
    assert Config.from_dict(HYBRID, ["student.image_size=48"]).student.image_size == 48


def test_train_help_lists_every_key_through_both_entry_points():
    for argv in (["train", "--help"], ["train", "-h"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
    done = subprocess.run(
        [sys.executable, "-m", "distill.train", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    out = done.stdout
    assert out.startswith("usage: distill train --config CONFIG.yaml")
    assert "  loss.combine.mode = 'weighted_sum'" in out and "  train.max_steps = None" in out
    assert "[int | None] optimizer steps" in out
    for key in (
        "student.image_size",
        "data.sampler",
        "loss.terms.<name|kind|index>.weight",
        "loss.routing.column",
        "optim.lr",
        "train.threads",
    ):
        assert f"  {key} = " in out, key


def test_cli_help_prints_the_keys(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "  loss.combine.drop_prob = 0.0" in out and "  train.max_steps = None" in out
