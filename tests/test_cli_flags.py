"""Issue 19, one config mechanism: every job is a validated model, its flags are made from its fields, a typo in a
command line answers before torch is imported, and a loss term's options are typed by its constructor.

- every flag of `distill cache`, `eval`, `demo` and `corpus` maps to a field of its job model with the field's
  default (no default written twice);
- the jobs refuse unknown keys with a did-you-mean and wrong types in one line;
- `distill cache` and `distill eval` answer a bad flag value in a fresh interpreter without importing torch;
- `loss.terms.affinity.kwargs.kl=maybe` is refused naming the key; an int for a float option is accepted.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from cache.build.job import CacheJob
from cache.corpus_build import CorpusBuildError, CorpusJob, RecipeSource
from distill.cli import build_parser
from distill.config.eval_job import EvalJob
from distill.config.teachers_job import TeachersJob
from distill.config.train_config import Config
from distill.demo import DemoJob
from teachers.kernel.config_model import ConfigError, field_default

ROOT = Path(__file__).resolve().parents[1]
HYBRID = ROOT / "configs" / "tiny-hybrid.yaml"

# flags whose value the command turns into a field of another name (or that are not the job's)
RENAMED = {
    "teacher": "teachers",
    "model": "models",
    "task": "tasks",
    "baseline": "baselines",
    "source": "path",
    "template": "templates",
}
NOT_FIELDS = {"help", "func", "recipe"}


def _subparser(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


@pytest.mark.parametrize(
    "command,models",
    [
        ("cache", (CacheJob,)),
        ("eval", (EvalJob,)),
        ("demo", (DemoJob,)),
        ("corpus", (RecipeSource, CorpusJob)),
        ("teachers", (TeachersJob,)),
    ],
)
def test_every_flag_is_a_field_with_its_default(command, models):
    seen = set()
    for action in _subparser(command)._actions:
        if action.dest in NOT_FIELDS:
            continue
        field = RENAMED.get(action.dest, action.dest)
        model = next((m for m in models if field in m.model_fields), None)
        assert model is not None, f"distill {command} {action.option_strings}: no field {field!r} in {models}"
        seen.add(field)
        if action.required or action.dest in RENAMED:  # required, or repeatable (None: the field's default)
            continue
        assert action.default == field_default(model, field), (command, field)
    if command == "demo":  # every demo field but the seed is a flag
        assert set(DemoJob.model_fields) - seen == {"seed"}


def test_jobs_refuse_unknown_keys_and_wrong_types():
    with pytest.raises(ConfigError, match=r"^unknown key 'viewz'; did you mean 'views'"):
        CacheJob(data="c.csv", teachers={"a": "plip"}, out="f.h5", viewz=2)
    with pytest.raises(ConfigError, match=r"^views must be int, got '2' \(str\)$"):
        CacheJob(data="c.csv", teachers={"a": "plip"}, out="f.h5", views="2")
    with pytest.raises(ConfigError, match=r"^unknown key 'bootstarp'; did you mean 'bootstrap'"):
        EvalJob(models={"a": "plip"}, tasks=["pneumoniamnist-zeroshot"], out="r", bootstarp=5)
    with pytest.raises(ConfigError, match=r"^steps must be int, got 1.5 \(float\)$"):
        DemoJob(steps=1.5)
    with pytest.raises(CorpusBuildError, match=r"^fraction must be float, got 'half' \(str\)$"):
        RecipeSource(path="x.csv", templates="{caption}", fraction="half")
    assert CacheJob(data=Path("c.csv"), teachers={"a": "plip"}, out=Path("f.h5")).out == "f.h5"  # paths as text


def _fresh(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    code = "import sys; from distill.cli import main; rc = main(sys.argv[1:]); print(rc, 'torch' in sys.modules)"
    return subprocess.run(
        [sys.executable, "-c", code, *argv],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "PYTHONPATH": str(ROOT)},
    )


@pytest.mark.parametrize(
    "argv,words",
    [
        (
            ["cache", "--data", "c.csv", "--teacher", "a=plip", "--out", "f.h5", "--view-color", "0.5"],
            "distill cache: error: --view-color given without --views K",
        ),
        (
            ["cache", "--data", "c.csv", "--teacher", "a=plip", "--out", "f.h5", "--max-bad-fraction", "1.5"],
            "distill cache: error: --max-bad-fraction 1.5: use a share between 0 and 1",
        ),
        (
            ["eval", "--model", "a=plip", "--task", "pneumoniamnist-zeroshto", "--out", "r"],
            "distill eval: error: unknown task 'pneumoniamnist-zeroshto'; did you mean pneumoniamnist-zeroshot",
        ),
        (
            ["eval", "--model", "a=plip", "--task", "pneumoniamnist-zeroshot", "--out", "r", "--baseline", "b"],
            "distill eval: error: baseline 'b' is not one of the models (a)",
        ),
    ],
)
def test_a_cache_or_eval_typo_answers_without_importing_torch(argv, words, tmp_path):
    done = _fresh(*argv, cwd=tmp_path)
    assert done.stdout.split() == ["2", "False"], done
    [line] = done.stderr.splitlines()
    assert line.startswith(words), line
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_a_mistyped_flag_answers_without_importing_torch(tmp_path):
    done = _fresh("cache", "--data", "c.csv", "--teacher", "a=plip", "--out", "f.h5", "--viewz", "2", cwd=tmp_path)
    assert done.returncode == 2 and "unrecognized arguments: --viewz 2" in done.stderr
    assert "Traceback" not in done.stderr


# -- typed term options ------------------------------------------------------------------------------------------
def test_term_options_are_typed_by_the_constructor(tiny_corpus):
    base = ["--config", str(HYBRID), f"data.corpus={tiny_corpus}"]
    with pytest.raises(ConfigError, match=r": loss\.terms\.affinity\.kwargs\.kl must be bool, got 'maybe' \(str\)$"):
        Config.from_argv([*base, "loss.terms.affinity.kwargs.kl=maybe"])
    with pytest.raises(ConfigError, match=r"loss\.terms\.affinity\.kwargs\.kl must be bool, got 1 \(int\)"):
        Config.from_argv([*base, "loss.terms.affinity.kwargs.kl=1"])
    # a choice is a Literal: refused in the terms' own words
    with pytest.raises(ConfigError, match=r"affinity scope 'bach' is unknown; use one of batch, domain"):
        Config.from_argv([*base, "loss.terms.affinity.kwargs.scope=bach"])
    cfg = Config.from_argv([*base, "loss.terms.affinity.kwargs.kl=true"])  # a valid config still loads
    assert cfg.loss.terms[1].kwargs == {"kl": True}
    # an int where a float is expected is accepted
    cfg = Config.from_argv([*base, "loss.terms=[{kind: infonce}, {kind: feature, kwargs: {beta: 2}}]"])
    assert cfg.loss.terms[1].kwargs == {"beta": 2}
