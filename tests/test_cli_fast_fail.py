"""Issue 18, item 7 and the first hour: a typo answers fast and in one line.

- `distill train` checks the config and the command line before importing torch (checked in a fresh interpreter:
  `torch` is not in sys.modules after the error);
- `--config` naming a device, a folder or a huge file says what it is, not "does not exist";
- a mistyped `py:` teacher is bad input (exit 2) naming the module or function that was not found;
- a failing `train` or `cache` prints exactly its error line on stderr (our INFO lines go to stdout), unless -v;
- `distill train --help` points only to files that are in the repository.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from distill.cli import main
from distill.config.file import MAX_CONFIG_BYTES
from distill.config.loss_names import BUILTIN_TERMS
from distill.config.train_config import Config
from distill.errors import BAD_INPUT
from distill.losses import LOSSES
from teachers import TeacherLoadError, load_teacher

ROOT = Path(__file__).resolve().parents[1]
HYBRID = ROOT / "configs" / "tiny-hybrid.yaml"
CONTRASTIVE = ROOT / "configs" / "tiny-contrastive.yaml"


def _run(code: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env
    )


def _cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "distill.cli", *argv], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


# -- the config is checked before torch is imported --------------------------------------------------------------
@pytest.mark.parametrize(
    "override,words",
    [
        ("optim.warmpu=500", "unknown key 'optim.warmpu'; did you mean 'warmup_steps'?"),
        ("loss.terms.0.kind=infonse", "unknown loss 'infonse'; did you mean infonce?"),
        ("train.max_steps=0", "train.max_steps must be > 0"),
        ("mode=contrastive", "mode=contrastive trains with InfoNCE only, but loss.terms has teacher terms"),
    ],
)
def test_a_config_typo_answers_without_importing_torch(override, words):
    code = (
        "import sys; from distill.cli import main; rc = main(sys.argv[1:]); "
        "print(rc, 'torch' in sys.modules, 'distill.losses' in sys.modules)"
    )
    done = _run(code, "train", "--config", str(HYBRID), "data.corpus=c.csv", override)
    assert done.stdout.split() == ["2", "False", "False"], done
    [line] = done.stderr.splitlines()
    assert line.startswith("distill train: error: ") and words in line, line


def test_a_yaml_key_typo_answers_without_importing_torch(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("mode: contrastive\ndata:\n  corpus: c.csv\n  batchsize: 8\n")
    done = _run(
        "import sys; from distill.cli import main; rc = main(sys.argv[1:]); print(rc, 'torch' in sys.modules)",
        "train",
        "--config",
        str(cfg),
    )
    assert done.stdout.split() == ["2", "False"], done
    assert "unknown key 'data.batchsize'; did you mean 'batch_size' or 'micro_batch_size'?" in done.stderr


@pytest.mark.parametrize(
    "argv,words",
    [
        (
            ["cache", "--data", "c.csv", "--teacher", "a=biomedclp", "--out", "f.h5"],
            "distill cache: error: unknown teacher alias 'biomedclp'; did you mean biomedclip",
        ),
        (
            ["cache", "--data", "c.csv", "--teacher", "a=local-dir:no/such/dir", "--out", "f.h5"],
            "distill cache: error: SPEC 'local-dir:no/such/dir': folder no/such/dir does not exist",
        ),
        (
            ["eval", "--model", "s=hf-hub:just-a-name", "--task", "t.yaml", "--out", "r"],
            "distill eval: error: SPEC 'hf-hub:just-a-name': expected hf-hub:ORG/REPO",
        ),
    ],
)
def test_a_spec_typo_answers_without_importing_torch(argv, words, tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from distill.cli import main; rc = main(sys.argv[1:]); print(rc, 'torch' in sys.modules)",
            *argv,
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.stdout.split() == ["2", "False"], done
    [line] = done.stderr.splitlines()
    assert line.startswith(words), line
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_static_and_full_checks_agree_on_a_good_config(tiny_corpus):
    argv = ["--config", str(HYBRID), f"data.corpus={tiny_corpus}", "loss.terms.1.kwargs.kl=true"]
    assert Config.from_argv(argv, static=True) == Config.from_argv(argv)
    # the options of a term are checked when torch is there (building the term), not before
    bad = ["--config", str(HYBRID), f"data.corpus={tiny_corpus}", "loss.terms.1.kwargs.kll=true"]
    Config.from_argv(bad, static=True)
    with pytest.raises(ValueError, match="kll"):
        Config.from_argv(bad)


def test_builtin_term_names_match_the_registry():
    """distill.config.loss_names.BUILTIN_TERMS (read before torch) says what the registered term classes say."""
    assert {k: bool(LOSSES.get(k).uses_teachers) for k in BUILTIN_TERMS} == BUILTIN_TERMS
    assert set(BUILTIN_TERMS) <= set(LOSSES.list())


# -- --config that is not a config file ------------------------------------------------------------------------------
def test_config_path_that_is_not_a_regular_file_says_what_it_is(tmp_path, capsys):
    big = tmp_path / "big.yaml"
    big.write_bytes(b"#" * (MAX_CONFIG_BYTES + 1))
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"mode: \xff\xfe\n")
    cases = [
        ("/dev/zero", "config file /dev/zero is a character device, not a regular file; give a YAML file"),
        (str(tmp_path), f"config file {tmp_path} is a folder"),
        (str(big), f"is {MAX_CONFIG_BYTES + 1:,} bytes, over the {MAX_CONFIG_BYTES:,}-byte limit"),
        (str(binary), "is not UTF-8 text (byte 6)"),
        (str(tmp_path / "missing.yaml"), f"config file {tmp_path / 'missing.yaml'} does not exist"),
    ]
    for path, words in cases:
        assert main(["train", "--config", path]) == BAD_INPUT
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err, (path, err)
        assert "does not exist" not in err or path.endswith("missing.yaml"), err


# -- a mistyped py: teacher -----------------------------------------------------------------------------------------
def test_mistyped_py_teacher_is_bad_input_naming_what_was_not_found(tiny_corpus, tmp_path, capsys, monkeypatch):
    (tmp_path / "lab_teachers.py").write_text(
        textwrap.dedent("""
        import not_installed_dependency_xyz
    """)
    )
    (tmp_path / "lab_ok.py").write_text("def make_teacher(device='cpu'):\n    return 1\nSIZE = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cases = [
        ("py:lab_teacherz:make", "no module named 'lab_teacherz': check the spelling, or put the folder"),
        ("py:lab.teachers:make", "no module named 'lab': check the spelling"),
        (
            "py:lab_teachers:make",
            "module 'lab_teachers' was found, but importing it failed: No module named "
            "'not_installed_dependency_xyz'; install what it needs",
        ),
        (
            "py:lab_ok:make_teachr",
            f"module 'lab_ok' ({tmp_path / 'lab_ok.py'}) has no callable 'make_teachr'; did you mean make_teacher?",
        ),
        ("py:lab_ok:SIZE", "'SIZE' in module 'lab_ok'"),
        ("py:lab_ok:make_teacher", "make_teacher() returned int, expected a teachers.Teacher"),
    ]
    for i, (spec, words) in enumerate(cases):
        with pytest.raises(TeacherLoadError, match=re.escape(words)):
            load_teacher(spec)
        argv = [
            "cache",
            "--data",
            str(tiny_corpus),
            "--teacher",
            f"t={spec}",
            "--out",
            str(tmp_path / f"f{i}.h5"),
            "--device",
            "cpu",
            "--num-workers",
            "0",
        ]
        assert main(argv) == BAD_INPUT, spec
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"distill cache: error: SPEC '{spec}': ") and words in err, err
    for name in ("lab_teachers", "lab_ok"):
        sys.modules.pop(name, None)


# -- a failing command: exactly its error line on stderr ---------------------------------------------------------
def test_failing_train_prints_only_its_error_on_stderr(tiny_corpus, tmp_path):
    """The run gets far (tokenizer trained, student built: INFO lines) before it fails; those lines go to stdout."""
    done = _cli(
        "train",
        "--config",
        str(CONTRASTIVE),
        f"data.corpus={tiny_corpus}",
        "data.batch_size=64",
        "student.vocab_size=200",
        f"train.output_dir={tmp_path / 'run'}",
    )
    assert done.returncode == BAD_INPUT, done
    assert re.fullmatch(
        r"distill train: error: 32 usable rows are fewer than one global batch of 64 [^\n]*\n", done.stderr
    ), done.stderr
    assert "INFO student.build: built student tiny" in done.stdout and "torch intra-op threads" in done.stdout


def test_failing_cache_prints_only_its_error_on_stderr(tiny_corpus, tiny_teachers, tmp_path):
    """The cache logs its choices (INFO, now on stdout), starts embedding, then stops at a missing image: stderr holds
    the error line and nothing else but the progress bar."""
    rows = tiny_corpus.read_text().splitlines()
    header, first = rows[0].split(","), rows[1].split(",")
    first[header.index("image")] = "/no/such/image.png"
    bad = tmp_path / "corpus.csv"
    bad.write_text("\n".join([rows[0], ",".join(first), *rows[2:]]) + "\n")
    done = _cli(
        "cache",
        "--data",
        str(bad),
        "--teacher",
        f"oc={tiny_teachers['oc']}",
        "--out",
        str(tmp_path / "f.h5"),
        "--device",
        "cpu",
        "--on-bad-sample",
        "fail",
    )
    assert done.returncode == BAD_INPUT, done
    lines = [line for line in done.stderr.replace("\r", "\n").splitlines() if line.strip() and "%|" not in line]
    assert len(lines) == 1 and lines[0].startswith("distill cache: error: ") and "/no/such/image.png" in lines[0], (
        done.stderr
    )
    assert "INFO cache.build.run: distill cache: batch size" in done.stdout


# -- --help points to what is there -------------------------------------------------------------------------------
def test_train_help_names_only_files_in_the_repository(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    named = set(re.findall(r"[\w./-]+\.(?:md|yaml)\b", text))
    assert any(n.endswith(".md") for n in named), named  # it points to a document (README.md or docs/*.md)
    missing = [
        n
        for n in named
        if not (ROOT / n).exists() and not (ROOT / "configs" / n).exists() and n not in ("CONFIG.yaml", "C.yaml")
    ]
    assert not missing, missing
