"""`distill train` reads its command line and config file once: the CLI's static check (before torch) hands its
Config to `distill.train.main`, which checks it in full from its values (`full_config`)."""

from __future__ import annotations

from pathlib import Path

import pytest

import distill.config.train_config as train_config
import distill.train as train_mod
from distill.cli import main
from distill.config.train_config import Config, ConfigError

HYBRID = Path(__file__).resolve().parents[1] / "configs" / "tiny-hybrid.yaml"


def test_the_config_file_is_read_once_and_a_full_check_error_names_it(monkeypatch, capsys):
    reads = []
    real = train_config.read_config_text
    monkeypatch.setattr(train_config, "read_config_text", lambda p: reads.append(p) or real(p))
    # a term option only the full check sees (it builds the term): the run stops there, before any training
    assert main(["train", "--config", str(HYBRID), "loss.terms.1.kwargs.kll=true"]) == 2
    assert reads == [HYBRID]
    err = capsys.readouterr().err
    assert f"{HYBRID}: " in err and "kll" in err


def test_full_config_equals_a_full_parse():
    argv = ["--config", str(HYBRID), "loss.terms.1.kwargs.kl=true", "train.max_steps=3"]
    assert train_mod.full_config(Config.from_argv(argv, static=True)) == Config.from_argv(argv)
    with pytest.raises(ConfigError, match=r"^x\.yaml: "):
        train_mod.full_config(Config.from_argv([*argv[:2], "loss.terms.1.kwargs.kll=true"], static=True), "x.yaml")
