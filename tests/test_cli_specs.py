"""Issue 18: model SPECs a user gets wrong in the first hour, and a folder that ships code.

- a model folder whose config.json has `auto_map` is refused without --trust-remote-code whatever its model_type
  (a known `clip` included), and the planted file does not run;
- a training run folder (or a checkpoint, or the run's config-only student folder) given as a model says it is a
  training run and how to export it, not "cannot load teacher SPEC";
- a `local-dir:` path that does not exist says so, not "open_clip_config.json not found";
- `accelerate launch --cpu --num_processes 2` (one process) warns and shows the CPU recipe that works.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import transformers.dynamic_module_utils as dmu
from test_cli_errors import eval_argv, one_error_line, run, task  # noqa: F401  (fixtures)

import distill.launch_check as launch_check
from distill.cli import main
from distill.config.train_config import Config
from distill.errors import BAD_INPUT
from distill.launch_check import process_mismatch, requested_processes
from distill.tiny_models import make_tiny_hf_clip
from distill.train import train
from teachers import TeacherLoadError, load_teacher

PLANTED = "open({marker!r}, 'w').write('the planted code ran')\n"


@pytest.fixture(autouse=True)
def modules_cache(tmp_path, monkeypatch):
    """Remote code is copied into transformers' modules cache: a temporary one, not the user's."""
    monkeypatch.setattr(dmu, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> Path:
    return make_tiny_hf_clip(tmp_path_factory.mktemp("clip") / "clip", seed=7)


def _with_code(clip_folder: Path, dst: Path, file: str = "config.json") -> tuple[Path, Path]:
    """A copy of a transformers CLIP folder (model_type: clip) whose `file` names planted code in `auto_map`."""
    folder = shutil.copytree(clip_folder, dst)
    marker = dst.parent / f"{dst.name}-planted-code-ran"
    (folder / "planted.py").write_text(PLANTED.format(marker=str(marker)))
    cfg = json.loads((folder / file).read_text())
    cfg["auto_map"] = {
        "AutoModel": "planted.Model",
        "AutoConfig": "planted.Config",
        "AutoTokenizer": ["planted.Tok", None],
        "AutoImageProcessor": "planted.Proc",
    }
    (folder / file).write_text(json.dumps(cfg))
    return folder, marker


@pytest.mark.parametrize("file", ["config.json", "tokenizer_config.json", "preprocessor_config.json"])
def test_a_known_model_type_with_auto_map_is_refused_without_the_flag(clip_folder, tmp_path, file):
    folder, marker = _with_code(clip_folder, tmp_path / "clip", file)
    assert json.loads((folder / "config.json").read_text())["model_type"] == "clip"
    with pytest.raises(
        TeacherLoadError,
        match=rf"contains its own model code \(auto_map in {file}\), which runs "
        r"only when asked: pass --trust-remote-code",
    ):
        load_teacher(f"hf:{folder}")
    assert not marker.exists()


def test_auto_map_refused_at_the_command_line_and_the_flag_is_the_only_gate(clip_folder, tiny_corpus, tmp_path, capsys):
    folder, marker = _with_code(clip_folder, tmp_path / "clip")
    argv = [
        "cache",
        "--data",
        str(tiny_corpus),
        "--teacher",
        f"c=hf:{folder}",
        "--out",
        str(tmp_path / "f.h5"),
        "--device",
        "cpu",
        "--num-workers",
        "0",
    ]
    assert main(argv) == BAD_INPUT
    line = one_error_line(capsys, "cache")
    assert f"SPEC 'hf:{folder}'" in line and "pass --trust-remote-code" in line and not marker.exists()
    # with the flag, transformers follows the auto_map: the folder's own code is what runs (here: the planted file)
    with pytest.raises(Exception):  # noqa: B017 (the planted stub fails somewhere in transformers; the marker is the check)
        load_teacher(f"hf:{folder}", trust_remote_code=True)
    assert marker.read_text() == "the planted code ran"


def test_the_same_folder_without_auto_map_loads(clip_folder):
    assert load_teacher(f"hf:{clip_folder}").embed_dim == 40


# -- a training run given as a model ---------------------------------------------------------------------------
def test_a_run_folder_as_a_model_says_export_it(run, task, tmp_path, capsys):  # noqa: F811
    ckpt = sorted(run.glob("checkpoint-*"))[-1]
    config_only = next(p for p in (run / "student-config", run / "student") if p.is_dir())
    cases = [
        (str(run), run, "a training run folder"),
        (f"local-dir:{run}", run, "a training run folder"),
        (f"hf:{run}", run, "a training run folder"),
        (f"local-dir:{ckpt}", ckpt, "a training checkpoint"),
        (f"local-dir:{config_only}", run, "the config-only student folder of a training run (no weights)"),
    ]
    for spec, export_from, what in cases:
        assert main(eval_argv(spec, task, tmp_path / "r")) == BAD_INPUT, spec
        line = one_error_line(capsys, "eval")
        assert (
            f"is {what}, not an exported model; export it first with `distill export {export_from} --out "
            "STUDENT_DIR`, then give local-dir:STUDENT_DIR" in line
        ), line
        assert "teacher SPEC" not in line


def test_a_local_dir_typo_says_the_folder_does_not_exist(tmp_path, capsys, task):  # noqa: F811
    missing = tmp_path / "exprot"
    (tmp_path / "file").write_text("x")
    for path, what in ((missing, "does not exist"), (tmp_path / "file", "is a file, not a folder")):
        with pytest.raises(TeacherLoadError, match=f"folder {path} {what}; check the path"):
            load_teacher(f"local-dir:{path}")
        assert main(eval_argv(f"local-dir:{path}", task, tmp_path / "r")) == BAD_INPUT
        line = one_error_line(capsys, "eval")
        assert f"folder {path} {what}" in line and "open_clip_config.json not found" not in line


# -- accelerate launch --cpu --num_processes 2 -----------------------------------------------------------------
ACCELERATE_ARGV = [
    "/usr/bin/python3",
    "/venv/bin/accelerate",
    "launch",
    "--cpu",
    "--num_processes",
    "2",
    "-m",
    "distill.train",
    "--config",
    "c.yaml",
]
SIMPLE_LAUNCHER_ENV = {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


def test_requested_processes_from_the_launchers_environment():
    assert requested_processes(SIMPLE_LAUNCHER_ENV, ACCELERATE_ARGV) == 2
    assert requested_processes(SIMPLE_LAUNCHER_ENV, [*ACCELERATE_ARGV[:4], "--num_processes=4"]) == 4
    assert requested_processes(SIMPLE_LAUNCHER_ENV, ["python"]) == 2  # several, number unknown
    assert requested_processes({"ACCELERATE_USE_CPU": "True"}, ACCELERATE_ARGV[:4]) is None  # 1 process asked
    assert requested_processes({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}, []) == 2  # torchrun
    assert requested_processes({}, []) is None
    assert process_mismatch(2, {"WORLD_SIZE": "2", "RANK": "1"}, []) is None  # a real 2-process run


def test_one_process_where_two_were_asked_for_warns_with_the_cpu_recipe(tiny_corpus, tmp_path, monkeypatch, caplog):
    for k, v in SIMPLE_LAUNCHER_ENV.items():  # what `accelerate launch --cpu --num_processes 2` exports
        monkeypatch.setenv(k, v)
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(launch_check, "parent_cmdline", lambda: ACCELERATE_ARGV)
    cfg = Config.from_argv(
        [
            "--config",
            str(Path(__file__).resolve().parents[1] / "configs" / "tiny-contrastive.yaml"),
            f"data.corpus={tiny_corpus}",
            f"train.output_dir={tmp_path / 'run'}",
            "train.max_steps=1",
            "student.vocab_size=200",
            "train.tensorboard=false",
        ]
    )
    with caplog.at_level("WARNING", logger="distill.train"):
        assert train(cfg)["step"] == 1
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and r.name == "distill.train"]
    assert warning.startswith(
        "2 processes were asked for, but this trainer sees 1 (`accelerate launch --cpu` always starts one)"
    )
    assert "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N -m distill.train" in warning
    assert "ACCELERATE_USE_CPU=1 torchrun --nproc_per_node N -m distill.train" in warning
    assert (Path(__file__).resolve().parents[1] / "docs" / "multi-gpu.md").is_file()  # the page it names
