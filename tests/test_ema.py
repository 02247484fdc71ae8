"""Issue 21, part 3: weight averaging. `train.ema` keeps an EMA of the student's weights (equal to the average
computed by hand from each step's weights), saved with every checkpoint and resumed bit for bit; `distill export
--ema` exports it and `--average` makes a soup of checkpoints."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from train_fixtures import (  # noqa: F401  (fixtures)
    read_log,
    tiny_cache,
    tiny_config,
    tiny_tokenizer,
    train_killed_after,
)

import distill.train as train_mod
from distill.cli import main
from distill.config.ema import EmaCfg
from distill.config.train_config import Config, ConfigError
from distill.errors import BAD_INPUT
from distill.training.ema import Ema
from student.checkpoint_read import EMA_FILE

U = 2.0**-24  # float32 unit roundoff


def _weights_after(steps: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [{"w": torch.randn(5, 3, generator=g), "b": torch.randn(3, generator=g)} for _ in range(steps + 1)]


@pytest.mark.parametrize(("decay", "every", "start"), [(0.5, 1, 0), (0.9, 1, 1), (0.75, 2, 1)])
def test_ema_equals_the_average_computed_by_hand(decay, every, start):
    """Weights w_0 (at construction), w_1, w_2, w_3 after three optimizer steps. Before `start` the average is the
    weights; then a_t = decay a_(t-1) + (1 - decay) w_t at steps start + every, start + 2 every, ... Computed here
    in float64; float32's lerp rounds each of its 3 operations once on values <= M, and the average contracts the
    errors, so 3 steps stay within 4 x 3 x U x M."""
    ws = _weights_after(3)
    module = torch.nn.Module()
    module.w = torch.nn.Parameter(ws[0]["w"].clone())
    module.b = torch.nn.Parameter(ws[0]["b"].clone())
    ema = Ema(EmaCfg(decay=decay, every=every, start=start), module)
    want = {k: v.double() for k, v in ws[0].items()}
    for step in (1, 2, 3):
        with torch.no_grad():
            module.w.copy_(ws[step]["w"])
            module.b.copy_(ws[step]["b"])
        ema.update(step)
        for k in want:
            if step <= start:
                want[k] = ws[step][k].double()
            elif (step - start) % every == 0:
                want[k] = decay * want[k] + (1 - decay) * ws[step][k].double()
    m = max(max(w[k].abs().max().item() for k in w) for w in ws)
    for k in want:
        torch.testing.assert_close(ema.average[k].double(), want[k], rtol=0, atol=12 * U * m)
    assert not torch.equal(ema.average["w"], ws[3]["w"])  # every case averages at least once by step 3


@pytest.mark.parametrize(
    ("ema", "needle"),
    [
        ({"decay": 1.0}, "train.ema.decay must be between 0 and 1 (exclusive), got 1.0"),
        ({"decay": 0}, "train.ema.decay must be between 0 and 1"),
        ({"every": 0}, "train.ema.every must be at least 1, got 0"),
        ({"start": -1}, "train.ema.start must be >= 0, got -1"),
        ({"device": "gpu"}, "train.ema.device 'gpu' is unknown; use one of model, cpu"),
    ],
)
def test_bad_ema_config_is_one_line(ema, needle):
    with pytest.raises(ConfigError) as e:
        Config.from_dict({"train": {"ema": ema}}, static=True)
    assert needle in str(e.value) and "\n" not in str(e.value).strip()


def _cfg(corpus, cache, out, tok, **kw):  # noqa: F811
    kw = {
        "train__max_steps": 7,
        "train__checkpoint_every": 1,
        "train__keep_last": 10,
        "train__tensorboard": "false",
        "train__ema": "{decay: 0.8, start: 2}",
        **kw,
    }
    return tiny_config(corpus, out, cache, tokenizer=tok, **kw)


def test_a_run_keeps_the_hand_ema_of_its_weights_and_a_killed_run_resumes_it_bit_for_bit(
    tiny_corpus,
    tiny_cache,  # noqa: F811
    tiny_tokenizer,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    straight = tmp_path / "straight"
    train_mod.train(_cfg(tiny_corpus, tiny_cache, straight, tiny_tokenizer))
    # by hand from each checkpoint's weights: copies up to step 2, then a = 0.8 a + 0.2 w (float64 here)
    weights = [load_file(str(straight / f"checkpoint-{s}" / "model.safetensors")) for s in range(1, 8)]
    ema = load_file(str(straight / "checkpoint-7" / EMA_FILE))
    assert ema and all(k.startswith("student.") for k in ema)
    want = {k: weights[1][k].double() for k in ema}  # step 2
    for w in weights[2:]:
        want = {k: 0.8 * want[k] + 0.2 * w[k].double() for k in ema}
    m = max(w[k].abs().max().item() for w in weights for k in ema)
    for k in ema:
        torch.testing.assert_close(ema[k].double(), want[k], rtol=0, atol=20 * U * m)
    assert any(not torch.equal(ema[k], weights[-1][k]) for k in ema)  # it is not the last weights

    resumed = tmp_path / "resumed"
    train_killed_after(monkeypatch, _cfg(tiny_corpus, tiny_cache, resumed, tiny_tokenizer), 5)
    train_mod.train(_cfg(tiny_corpus, tiny_cache, resumed, tiny_tokenizer))
    again = load_file(str(resumed / "checkpoint-7" / EMA_FILE))
    assert again.keys() == ema.keys() and all(torch.equal(again[k], ema[k]) for k in ema)
    assert [r["loss"] for r in read_log(resumed)] == [r["loss"] for r in read_log(straight)]

    # distill export --ema: the EMA in place of the weights; --average: the mean of checkpoints' weights
    out = tmp_path / "ema-export"
    assert main(["export", str(straight), "--out", str(out), "--ema"]) == 0
    exported = load_file(str(out / "open_clip_model.safetensors"))
    assert all(torch.equal(exported[k.removeprefix("student.")], ema[k]) for k in ema)
    assert "exponential moving average" in (out / "README.md").read_text()
    soup = tmp_path / "soup"
    ckpts = [str(straight / f"checkpoint-{s}") for s in (5, 6, 7)]
    assert main(["export", ckpts[0], "--out", str(soup), "--average", *ckpts[1:]]) == 0
    souped = load_file(str(soup / "open_clip_model.safetensors"))
    k = "student.visual.proj" if "student.visual.proj" in ema else next(iter(ema))
    mean = sum(weights[s - 1][k].double() for s in (5, 6, 7)) / 3
    torch.testing.assert_close(souped[k.removeprefix("student.")].double(), mean, rtol=0, atol=4 * U * m)


def test_export_refusals_are_one_line(tiny_corpus, tiny_cache, tiny_tokenizer, tmp_path, capsys):  # noqa: F811
    plain = tmp_path / "plain"
    train_mod.train(_cfg(tiny_corpus, tiny_cache, plain, tiny_tokenizer, train__ema="null", train__max_steps=2))
    capsys.readouterr()  # the run's progress bar
    assert main(["export", str(plain), "--out", str(tmp_path / "x"), "--ema"]) == BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "was trained without train.ema; export it without --ema" in err
    odd = tmp_path / "odd"  # the same run with one weight missing: not averageable with it
    shutil.copytree(plain, odd)
    sd = load_file(str(odd / "checkpoint-2" / "model.safetensors"))
    dropped = sorted(sd)[0]
    save_file({k: v for k, v in sd.items() if k != dropped}, str(odd / "checkpoint-2" / "model.safetensors"))
    argv = ["export", str(plain / "checkpoint-2"), "--out", str(tmp_path / "y"), "--average", str(odd / "checkpoint-2")]
    assert main(argv) == BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not match" in err and repr(dropped) in err
    assert json.loads((plain / "run_meta.json").read_text())["config"]["train"]["ema"] is None
