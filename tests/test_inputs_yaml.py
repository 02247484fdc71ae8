"""Issue 18 item 3: every YAML the project reads is loaded by `teachers.kernel.bounded_yaml`, which refuses alias bombs,
cycles, deep nesting and huge files before anything is expanded: one line, at once, in bounded memory."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import pytest
import yaml

from benchmarks.mt_setup import SetupError, load_domain_file, load_variant_file
from cache.corpus_build import CorpusBuildError, load_recipe
from distill.cli import main
from distill.config.train_config import Config, ConfigError
from distill.eval.tasks import TaskError, load_task
from teachers.kernel.bounded_yaml import (
    MAX_YAML_ALIASES,
    MAX_YAML_BYTES,
    MAX_YAML_DEPTH,
    MAX_YAML_VALUES,
    YamlLimitError,
    load_yaml,
)

ROOT = Path(__file__).resolve().parents[1]


def bomb(levels: int = 9, width: int = 10) -> str:
    """The classic "billion laughs": `width ** levels` strings from `levels * width` aliases."""
    lines = ['a0: &a0 "lol"']
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


def narrow_bomb(levels: int = 40) -> str:
    """2 ** 40 values from 80 aliases: under the alias limit, so only the expanded count can refuse it."""
    lines = ["a0: &a0 x"] + [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


def test_a_document_within_the_limits_loads_as_safe_load_does():
    text = "base: &b {lr: 0.1, steps: [1, 2, 3]}\nrun: *b\nother: {<<: *b, lr: 0.2}\nname: x\n"
    assert load_yaml(text) == yaml.safe_load(text)
    for shipped in (ROOT / "configs").glob("*.yaml"):
        assert load_yaml(shipped.read_text()) == yaml.safe_load(shipped.read_text()), shipped
    for task in (ROOT / "distill" / "tasks").glob("*.yaml"):
        assert load_yaml(task.read_text()) == yaml.safe_load(task.read_text()), task


@pytest.mark.parametrize(
    "text, message",
    [
        (
            bomb(),
            r"line 7: this value stands for 1,111,111 values once its aliases are expanded, over the "
            rf"{MAX_YAML_VALUES:,} .* \(an alias bomb\?\)",
        ),
        (narrow_bomb(), r"line 18: this value stands for 262,143 values"),
        ("x: &x 1\ny: [" + "*x, " * MAX_YAML_ALIASES + "*x]\n", rf"line 2: more than {MAX_YAML_ALIASES} aliases"),
        ("a: &a [1, *a]\n", r"line 1: an alias refers to a node that contains it \(a cycle\)"),
        ("[" * (MAX_YAML_DEPTH + 1) + "]" * (MAX_YAML_DEPTH + 1), rf"line 1: nested more than {MAX_YAML_DEPTH} levels"),
        ("x: " + "a" * MAX_YAML_BYTES, rf"over the {MAX_YAML_BYTES:,} YAML read by distill may have"),
    ],
)
def test_bombs_cycles_depth_and_size_are_refused_in_bounded_memory(text, message):
    tracemalloc.start()
    try:
        with pytest.raises(YamlLimitError, match=message):
            load_yaml(text)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20 + 4 * len(text), peak  # the text and its tokens, never the expansion


def test_a_train_config_bomb_is_one_line_exit_2(tmp_path, capsys):
    """`distill train --config bomb.yaml` ran 120 s, 1 GB and growing (issue 18): now one line naming the file."""
    cfg = tmp_path / "bomb.yaml"
    cfg.write_text(bomb())
    assert main(["train", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(cfg) in err[0] and "an alias bomb?" in err[0], err


def test_an_override_value_bomb_is_refused_naming_the_override():
    value = "{" + ", ".join(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)) + "}"
    with pytest.raises(ConfigError, match=r"override 'student.overrides=.*\(an alias bomb\?\)"):
        Config.from_dict({}, [f"student.overrides={{a0: &a0 lol, b: {value}}}"])


def test_task_recipe_variant_and_domain_files_refuse_bombs(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(bomb())
    for load, error in (
        (load_task, TaskError),
        (load_recipe, CorpusBuildError),
        (load_variant_file, SetupError),
        (load_domain_file, SetupError),
    ):
        with pytest.raises(error, match=rf"{path.name}.*\(an alias bomb\?\)"):
            load(str(path))
