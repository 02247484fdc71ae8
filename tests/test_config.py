"""Config parsing and the optimizer recipe: strict keys and types, overrides, schedules, weight-decay groups."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from distill.config.train_config import Config, ConfigError
from distill.training.build_run import resolve_threads
from distill.training.optim import accum_for_epoch, global_batch_for_epoch, lr_factor, param_groups, total_steps
from student.presets import get_preset

ROOT = Path(__file__).resolve().parents[1]
BASE = {"mode": "contrastive", "data": {"corpus": "c.csv"}}


def test_every_shipped_config_parses_and_round_trips():
    files = sorted((ROOT / "configs").glob("*.yaml"))
    assert {f.name for f in files} >= {
        "tiny-contrastive.yaml",
        "tiny-hybrid.yaml",
        "biomedclip-scratch.yaml",
        "mmkd.yaml",
    }
    for f in files:
        cfg = Config.from_yaml(f, ["data.corpus=x.csv", "data.features=f.h5"])
        assert Config.from_dict(cfg.to_dict()) == cfg, f.name


def test_biomedclip_recipe_values():
    cfg = Config.from_yaml(ROOT / "configs" / "biomedclip-scratch.yaml", ["data.corpus=x.csv"])
    assert cfg.mode == "contrastive" and cfg.student.preset == "biomedclip"
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.betas, cfg.optim.warmup_steps) == (
        5e-4,
        0.2,
        (0.9, 0.98),
        2000,
    )
    assert cfg.optim.schedule == "cosine"
    assert cfg.train.batch_schedule == ((0, 4096),)  # global batch 4k whatever the number of GPUs
    assert [global_batch_for_epoch(cfg.train, cfg.data.batch_size, n, 0) for n in (1, 8, 16)] == [4096] * 3
    assert [accum_for_epoch(cfg.train, cfg.data.batch_size, n, 0) for n in (1, 8, 16)] == [16, 2, 1]
    model_cfg = get_preset(cfg.student.preset).model_cfg
    assert model_cfg["embed_dim"] == 512 and model_cfg["text_cfg"]["context_length"] == 256
    assert model_cfg["vision_cfg"]["timm_model_name"] == "vit_base_patch16_224"


def test_mmkd_recipe_values():
    cfg = Config.from_yaml(ROOT / "configs" / "mmkd.yaml", ["data.corpus=x.csv", "data.features=f.h5"])
    assert cfg.mode == "hybrid" and cfg.loss.teachers is None  # every cached teacher, equal weights
    terms = [(t.kind, t.weight, dict(t.kwargs)) for t in cfg.loss.terms]
    assert terms == [("infonce", 1.0, {}), ("feature", 50.0, {"metric": "mse"}), ("icl", 1.0, {})]
    assert cfg.loss.combine.mode == "random_teacher" and cfg.loss.combine.drop_prob == 0.0
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.betas) == (5e-4, 0.2, (0.9, 0.98))


def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("mode: contrastive\ndata:\n  corpus: c.csv\n  batchsize: 3\n")
    with pytest.raises(ConfigError, match=r"c\.yaml.*'data\.batchsize'.*did you mean 'batch_size'"):
        Config.from_yaml(p)
    with pytest.raises(ConfigError, match=r"unknown key 'optimizer'.*did you mean 'optim'"):
        Config.from_dict({**BASE, "optimizer": {}})
    with pytest.raises(ConfigError, match=r"'loss\.terms\[0\]\.wieght'.*'weight'"):
        Config.from_dict(
            {
                **BASE,
                "mode": "hybrid",
                "data": {"corpus": "c", "features": "f"},
                "loss": {"terms": [{"kind": "infonce", "wieght": 1}]},
            }
        )


def test_wrong_types_are_errors_naming_the_key():
    with pytest.raises(ConfigError, match=r"data\.batch_size must be int"):
        Config.from_dict({**BASE, "data": {"corpus": "c", "batch_size": "eight"}})
    with pytest.raises(ConfigError, match=r"train\.max_steps must be int \| None, got 1\.5"):
        Config.from_dict({**BASE, "train": {"max_steps": 1.5}})
    with pytest.raises(ConfigError, match=r"data\.flip must be bool"):
        Config.from_dict({**BASE, "data": {"corpus": "c", "flip": 1}})
    with pytest.raises(ConfigError, match=r"optim\.betas must have 2 items"):
        Config.from_dict({**BASE, "optim": {"betas": [0.9]}})


def test_overrides_are_type_checked_and_applied():
    cfg = Config.from_dict(
        BASE,
        [
            "optim.lr=1e-3",
            "train.max_steps=7",
            "train.output_dir=123",
            "data.crop_scale=[0.5, 1]",
            "student.overrides.embed_dim=32",
            "train.batch_schedule=[[0, 8], [2, 16]]",
        ],
    )
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)  # YAML 1.1 reads 1e-3 as a string
    assert cfg.train.max_steps == 7 and cfg.train.output_dir == "123"  # str fields take the raw text
    assert cfg.data.crop_scale == (0.5, 1.0)
    assert cfg.student.overrides == {"embed_dim": 32}
    assert cfg.train.batch_schedule == ((0, 8), (2, 16))
    for bad, msg in [
        ("optim.lr=fast", r"override 'optim\.lr=fast': optim\.lr must be float"),
        ("optim.warmpu=3", r"override 'optim\.warmpu=3'.*did you mean 'warmup_steps'"),
        ("train.max_steps", r"must look like section\.key=value"),
        ("train.max_steps.x=1", r"train\.max_steps is not a section.*no key 'x'"),
        ("data.crop_scale=[1", r"not valid YAML"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            Config.from_dict(BASE, [bad])


def test_from_argv_without_argparse(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("mode: contrastive\ndata:\n  corpus: c.csv\n")
    cfg = Config.from_argv(["--config", str(p), "train.seed=3"])
    assert cfg.train.seed == 3 and cfg.data.corpus == "c.csv"
    with pytest.raises(ConfigError, match="missing --config"):
        Config.from_argv(["train.seed=3"])
    with pytest.raises(ConfigError, match="unknown option '--cfg'"):
        Config.from_argv(["--cfg", str(p)])


def test_modes_and_cache_requirements():
    with pytest.raises(ConfigError, match=r"mode=hybrid needs data\.features.*distill cache"):
        Config.from_dict({"mode": "hybrid", "data": {"corpus": "c.csv"}})
    with pytest.raises(ConfigError, match=r"mode=distill needs data\.features"):
        Config.from_dict({"mode": "distill", "data": {"corpus": "c.csv"}})
    assert Config.from_dict(BASE).data.features is None  # contrastive needs no cache
    with pytest.raises(ConfigError, match=r"mode=contrastive trains with InfoNCE only.*\['feature'\]"):
        Config.from_dict({**BASE, "loss": {"terms": [{"kind": "infonce"}, {"kind": "feature"}]}})
    hybrid = {"mode": "distill", "data": {"corpus": "c", "features": "f"}}
    with pytest.raises(ConfigError, match=r"mode=distill uses teacher terms only.*\['infonce'\]"):
        Config.from_dict({**hybrid, "loss": {"terms": [{"kind": "infonce"}, {"kind": "icl"}]}})
    with pytest.raises(ConfigError, match=r"unknown loss 'feat'.*did you mean feature"):
        Config.from_dict({**hybrid, "loss": {"terms": [{"kind": "feat"}]}})
    with pytest.raises(ConfigError, match=r"mode must be one of"):
        Config.from_dict({**BASE, "mode": "distil"})
    with pytest.raises(ConfigError, match=r"loss\.teachers\.oc must be >= 0"):
        Config.from_dict({**hybrid, "loss": {"teachers": {"oc": -1}}})


def test_caption_positives_in_every_mode_and_bad_values():
    cached = {"data": {"corpus": "c", "features": "f"}}
    for mode, terms in (
        ("contrastive", "[{kind: infonce, kwargs: {positives: caption}}]"),
        ("distill", "[{kind: feature}, {kind: icl, kwargs: {positives: caption}}]"),
        ("hybrid", "[{kind: infonce, kwargs: {positives: caption}}, {kind: icl, kwargs: {positives: caption}}]"),
    ):
        cfg = Config.from_dict({"mode": mode, **(BASE if mode == "contrastive" else cached)}, [f"loss.terms={terms}"])
        assert [t.kwargs.get("positives") for t in cfg.loss.terms if t.kind != "feature"] == ["caption"] * (
            2 if mode == "hybrid" else 1
        )
        assert Config.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(
        ConfigError,
        match=r"loss\.terms\[0\]: infonce positives 'captions' is unknown; use one of "
        r"diagonal, caption",
    ):
        Config.from_dict(BASE, ["loss.terms=[{kind: infonce, kwargs: {positives: captions}}]"])
    with pytest.raises(ConfigError, match=r"icl positives 'label' is unknown; use one of diagonal, caption"):
        Config.from_dict({"mode": "distill", **cached}, ["loss.terms=[{kind: icl, kwargs: {positives: label}}]"])
    with pytest.raises(ConfigError, match=r"loss term 'feature' \(kind 'feature'\): bad options \['positives'\]"):
        Config.from_dict({"mode": "distill", **cached}, ["loss.terms=[{kind: feature, kwargs: {positives: caption}}]"])


def test_batch_schedule_sets_accumulation_per_epoch():
    cfg = Config.from_dict(BASE, ["train.batch_schedule=[[0, 4096], [2, 16384], [5, 65536]]"]).train
    # 64 per device x 16 processes = 1024 per micro-step
    assert [accum_for_epoch(cfg, 64, 16, e) for e in range(7)] == [4, 4, 16, 16, 16, 64, 64]
    assert global_batch_for_epoch(cfg, 64, 16, 3) == 16384
    with pytest.raises(ConfigError, match=r"global batch of 4096 at epoch 0.*not a multiple of.*3 x 16 = 48"):
        accum_for_epoch(cfg, 3, 16, 0)
    plain = Config.from_dict(BASE, ["train.grad_accum=3"]).train
    assert accum_for_epoch(plain, 8, 2, 9) == 3 and global_batch_for_epoch(plain, 8, 2, 0) == 48
    # steps per epoch shrink as the batch grows: 10000 rows -> 2 + 2 epochs at 4096, then 0 at 16384
    epochs = Config.from_dict(BASE, ["train.batch_schedule=[[0, 4096], [2, 8192]]", "train.epochs=4"]).train
    assert total_steps(epochs, 10000, 64, 16) == 2 + 2 + 1 + 1
    with pytest.raises(ConfigError, match="must start at epoch 0"):
        Config.from_dict(BASE, ["train.batch_schedule=[[1, 8]]"])


def test_warmup_then_cosine_to_min_lr():
    o = Config.from_dict(BASE, ["optim.warmup_steps=10", "optim.lr=1.0", "optim.min_lr=0.1"]).optim
    f = [lr_factor(s, 110, o) for s in range(111)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)  # linear warmup reaches the peak
    assert f[10] == pytest.approx(1.0) and f[60] == pytest.approx(0.1 + 0.9 * 0.5)  # half-way down the cosine
    assert f[110] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))  # monotone decay after warmup


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 3)
        self.ln = nn.LayerNorm(3)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10)))
        self.pos = nn.Parameter(torch.zeros(5, 3))
        self.frozen = nn.Linear(3, 3)
        self.frozen.requires_grad_(False)


def test_no_weight_decay_on_gains_biases_and_logit_scale():
    m = _Toy()
    groups = {g["name"]: g for g in param_groups(m, 0.2)}
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(groups["decay"]["params"]) == ids([m.proj.weight, m.pos])
    assert ids(groups["no_decay"]["params"]) == ids([m.proj.bias, m.ln.weight, m.ln.bias, m.logit_scale])
    assert groups["decay"]["weight_decay"] == 0.2 and groups["no_decay"]["weight_decay"] == 0.0


HYBRID = {"mode": "hybrid", "data": {"corpus": "c.csv", "features": "f.h5"}}


def test_routing_and_confidence_parse_from_yaml_and_overrides(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(
        "mode: hybrid\ndata: {corpus: c.csv, features: f.h5}\nloss:\n  routing:\n    column: domain\n"
        "    teachers: {dermoscopy: [derm], radiology: [rad, general]}\n    default: [general]\n"
        "  combine: {mode: confidence, temperature: 0.5}\n"
    )
    cfg = Config.from_yaml(p)
    r = cfg.loss.routing
    assert (r.column, r.teachers, r.default, r.separator) == (
        "domain",
        {"dermoscopy": ("derm",), "radiology": ("rad", "general")},
        ("general",),
        "|",
    )
    assert r.named_teachers() == ["derm", "rad", "general"]
    assert (cfg.loss.combine.mode, cfg.loss.combine.temperature) == ("confidence", 0.5)
    assert Config.from_dict(cfg.to_dict()) == cfg  # round-trips
    assert Config.from_dict(HYBRID).loss.routing is None  # off by default
    cfg = Config.from_dict(HYBRID, ["loss.routing.column=teachers", "loss.routing.separator=;"])
    assert cfg.loss.routing.teachers is None and cfg.loss.routing.separator == ";" and cfg.loss.routing.default == ()


def test_routing_confidence_and_threads_errors():
    def bad(loss=None, train=None, mode="hybrid"):
        d = {**HYBRID, "mode": mode, "loss": loss or {}}
        if train:
            d["train"] = train
        return Config.from_dict(d)

    with pytest.raises(ConfigError, match=r"loss\.routing needs column \(a corpus column\) or auto"):
        bad({"routing": {"teachers": {"x": ["a"]}}})
    with pytest.raises(ConfigError, match=r"unknown key 'loss\.routing\.teacher'.*did you mean 'teachers'"):
        bad({"routing": {"column": "d", "teacher": {"x": ["a"]}}})
    with pytest.raises(ConfigError, match=r"loss\.routing\.teachers\.x must be tuple"):
        bad({"routing": {"column": "d", "teachers": {"x": "a"}}})
    with pytest.raises(ConfigError, match=r"loss\.routing\.teachers must map column values"):
        bad({"routing": {"column": "d", "teachers": {}}})
    with pytest.raises(ConfigError, match=r"loss\.routing\.column must name a corpus column"):
        bad({"routing": {"column": " "}})
    with pytest.raises(ConfigError, match=r"mode=contrastive uses no teachers, but loss\.routing is set"):
        bad({"routing": {"column": "d"}}, mode="contrastive")
    with pytest.raises(ConfigError, match=r"loss\.combine\.temperature must be a finite number > 0, got 0\.0"):
        bad({"combine": {"mode": "confidence", "temperature": 0}})
    with pytest.raises(
        ConfigError, match=r"loss\.combine\.mode: combine mode 'confident' is unknown; use one of .*confidence"
    ):
        bad({"combine": {"mode": "confident"}})
    with pytest.raises(ConfigError, match=r"train\.threads must be > 0"):
        bad(train={"threads": 0})


def test_thread_count_obeys_the_config_key_then_omp_num_threads():
    assert resolve_threads(3, env={"OMP_NUM_THREADS": "5"}, cores=16) == (3, "train.threads")
    assert resolve_threads(None, env={"OMP_NUM_THREADS": "5"}, cores=16) == (5, "OMP_NUM_THREADS")
    assert resolve_threads(None, env={}, cores=16, num_local_processes=4)[0] == 4
    assert resolve_threads(None, env={"LOCAL_WORLD_SIZE": "3"}, cores=16)[0] == 5
    assert resolve_threads(None, env={}, cores=2, num_local_processes=8)[0] == 1  # at least 1
    assert resolve_threads(None, env={"OMP_NUM_THREADS": "lots"}, cores=6)[0] == 6  # unusable: ignored
    assert Config.from_dict(BASE, ["train.threads=2"]).train.threads == 2
