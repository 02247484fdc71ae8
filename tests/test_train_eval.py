"""`train.eval`: distill eval's tasks during training, on the student and its EMA. The logged numbers are those of
`distill export` + a direct computation on the exported weights, and a killed, resumed run logs the same ones."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_cli_export_eval import _student_recalls, tasks  # noqa: F401  (fixture)
from train_fixtures import tiny_cache, tiny_config, tiny_tokenizer, train_killed_after  # noqa: F401  (fixtures)

import distill.train as train_mod
from distill.cli import main
from distill.config.train_config import Config, ConfigError
from distill.data.loader import DataError
from distill.training.eval_hook import EVAL_LOG


def _cfg(corpus, cache, out, tok, tasks, **kw):  # noqa: F811
    kw = {
        "train__max_steps": 4,
        "train__checkpoint_every": 2,
        "train__keep_last": 5,
        "train__tensorboard": "false",
        "train__ema": "{decay: 0.5, start: 1}",
        "train__eval": f"{{tasks: [{tasks['rt']}, {tasks['zs']}], every: 2}}",
        **kw,
    }
    return tiny_config(corpus, out, cache, tokenizer=tok, **kw)


def _evals(run) -> list[dict]:
    return [json.loads(line) for line in (run / EVAL_LOG).read_text().splitlines()]


def test_the_logged_metrics_are_those_of_the_exported_student_and_ema_and_survive_a_kill(
    tiny_corpus,
    tiny_cache,  # noqa: F811
    tiny_tokenizer,  # noqa: F811
    tasks,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    run = tmp_path / "run"
    train_mod.train(_cfg(tiny_corpus, tiny_cache, run, tiny_tokenizer, tasks))
    evals = _evals(run)
    assert [e["step"] for e in evals] == [2, 4]
    assert set(evals[-1]) == {"step", "student/rt", "student/zs", "student-ema/rt", "student-ema/zs"}
    assert (run / "eval" / "step-4" / "report.json").is_file() and not (run / "eval" / "step-4" / "models").exists()
    for flag, name in (([], "student"), (["--ema"], "student-ema")):  # the same numbers from an export
        export = tmp_path / f"export-{name}"
        assert main(["export", str(run / "checkpoint-4"), "--out", str(export), *flag]) == 0
        recalls = _student_recalls(export, tasks["rt"].parent / "data.csv")
        assert evals[-1][f"{name}/rt"] == pytest.approx(np.mean(list(recalls.values())), abs=1e-9)
    assert evals[0]["student/rt"] != evals[-1]["student/rt"] or evals[0]["student/zs"] != evals[-1]["student/zs"]

    resumed = tmp_path / "resumed"
    train_killed_after(monkeypatch, _cfg(tiny_corpus, tiny_cache, resumed, tiny_tokenizer, tasks), 2)
    assert [e["step"] for e in _evals(resumed)] == [2]
    train_mod.train(_cfg(tiny_corpus, tiny_cache, resumed, tiny_tokenizer, tasks))
    assert _evals(resumed) == evals  # step 2 evaluated once, step 4 after the resume: the same numbers


def test_bad_eval_config_is_one_line(tiny_corpus, tiny_cache, tiny_tokenizer, tmp_path):  # noqa: F811
    with pytest.raises(ConfigError, match=r"train\.eval\.tasks must name at least one task"):
        Config.from_dict({"train": {"eval": {"tasks": []}}}, static=True)
    with pytest.raises(ConfigError, match=r"train\.eval\.every must be >= 0"):
        Config.from_dict({"train": {"eval": {"tasks": ["x.yaml"], "every": -1}}}, static=True)
    missing = tmp_path / "nope.yaml"
    cfg = tiny_config(
        tiny_corpus, tmp_path / "run", tiny_cache, tokenizer=tiny_tokenizer, train__eval=f"{{tasks: [{missing}]}}"
    )
    with pytest.raises((FileNotFoundError, ValueError, DataError), match="nope"):
        train_mod.train(cfg)  # before the first step
    assert not list((tmp_path / "run").glob("checkpoint-*"))
