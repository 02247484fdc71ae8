"""Export a trained student as an open_clip `local-dir:` folder, load it back anywhere, publish it.

Layout (docs/architecture.md "File formats"): `open_clip_config.json`, `open_clip_model.safetensors` (student only,
never the projection heads or optimizer state), the tokenizer files, the text tower's `config.json` and a
`README.md` model card. Stock open_clip loads it from where it was written; `load_student` loads it after
the folder was moved, by pointing the text tower at the `config.json` inside it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import huggingface_hub
import safetensors.torch
import torch
from torch import nn
from transformers import AutoConfig

from student.build import instantiate, name_text_tower
from student.card import CardTeacher, ModelCard, card_for_hub, make_model_card, read_report
from student.checkpoint_read import (
    CONFIG_NAME,
    average_states,
    checkpoint_step,
    load_ema_state,
    load_training_state,
    resolve_checkpoint,
    weights_file,
)
from student.run_files import (
    RunMeta,
    read_run_meta,
    read_train_state,
    student_config_dir,
)
from teachers.open_clip_teacher import create_open_clip, local_dir_overrides
from teachers.spec import parse_spec

log = logging.getLogger(__name__)

WEIGHTS_NAME = "open_clip_model.safetensors"
TRAINING_NAME = "training.json"  # the corpus (path, fingerprint) and feature cache the student was trained on
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {folder} is not a student folder (made by build_student or export)")
    try:
        cfg = json.loads(path.read_text())
        cfg["model_cfg"]["text_cfg"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a valid open_clip config ({e!r})") from e
    return cfg


def _text_config(folder: Path) -> dict[str, Any] | None:
    path = folder / "config.json"
    return json.loads(path.read_text()) if path.is_file() else None


_TEXT_SHAPE_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "max_position_embeddings",
    "type_vocab_size",
)


def check_hub_text_config(hub_id: str, student_dir: Path) -> None:
    """Refuse a `text_config_from_hub` whose config would build a different text tower than the student's.

    Stock open_clip builds the text tower from that id's config, so it must match the student's `config.json`
    (BiomedBERT for a student initialised from BiomedCLIP; not for one with its own WordPiece vocabulary). The id
    is checked when its config is reachable offline (HF cache or a folder); otherwise a warning says what to check.
    """
    ours_file = student_dir / "config.json"
    if not ours_file.is_file():
        return
    try:
        theirs = AutoConfig.from_pretrained(hub_id, local_files_only=True).to_dict()
    except (OSError, ValueError):
        log.warning(
            "text_config_from_hub %s: its config is not available offline, so it cannot be checked here; "
            "make sure it equals %s (same architecture and vocabulary), or stock open_clip will fail to "
            "load the published student",
            hub_id,
            ours_file,
        )
        return
    ours = json.loads(ours_file.read_text())
    diff = {k: (ours.get(k), theirs.get(k)) for k in _TEXT_SHAPE_KEYS if ours.get(k) != theirs.get(k)}
    if diff:
        raise ValueError(
            f"text_config_from_hub {hub_id!r} describes a different text tower than the student's "
            f"{ours_file} (student vs hub: {diff}); stock open_clip would build the wrong model. Name "
            f"the hub model the student's text tower came from, or leave the option out"
        )


def _student_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    model = getattr(model, "module", model)  # DDP / accelerate wrappers
    sd = model.state_dict()
    bad = [k for k in sd if k.startswith(("heads.", "student."))]
    if bad:
        raise ValueError(
            f"export_student needs the open_clip student itself, got a module with {bad[0]!r}; "
            f"pass the training module's .student"
        )
    out, seen = {}, set()
    for k, v in sd.items():
        v = v.detach().cpu().contiguous()
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen else v  # safetensors refuses shared storage
        seen.add(ptr)
    return out


def export_student(
    model: nn.Module,
    student_dir: str | Path,
    out_dir: str | Path,
    card: ModelCard | None = None,
    text_config_from_hub: str | None = None,
    training: dict | None = None,
) -> Path:
    """Write the export folder for `model` (the open_clip student) built by `build_student` into `student_dir`.

    The folder is written beside `out_dir` under a temporary name and renamed into place once complete, so a
    full disk or a kill leaves the old folder (or nothing), never a partial one. The text tower's config and
    tokenizer are named by the folder's absolute path, because stock open_clip reads them by that name from any
    working directory (a relative name would resolve against the caller's); `load_student` and `local-dir:` SPECs
    still load a moved folder. `text_config_from_hub` names a hub id (e.g. BiomedBERT's) instead, for publishing:
    then no path of this machine is shipped. `training` (the run's corpus and cache) is written as training.json.
    """
    src, out = Path(student_dir), Path(out_dir)
    cfg = _read_config(src)
    if text_config_from_hub:
        check_hub_text_config(text_config_from_hub, src)
    cfg = {**cfg, "model_cfg": name_text_tower(cfg["model_cfg"], text_config_from_hub or str(out.resolve()))}
    sd = _student_state_dict(model)
    n_params = sum(p.numel() for p in getattr(model, "module", model).parameters())
    name = out.resolve().name
    card = card or ModelCard(name=name)  # the folder's name is what the user called the model
    with staged_folder(out) as stage:
        for f in src.iterdir():
            if f.is_file() and not f.name.endswith(_WEIGHT_SUFFIXES) and f.name not in ("README.md", CONFIG_NAME):
                _write(stage / f.name, f.read_bytes(), out)
        _save_weights(sd, stage / WEIGHTS_NAME, out)
        _write(stage / CONFIG_NAME, (json.dumps(cfg, indent=2) + "\n").encode(), out)
        if training is not None:  # what it was trained on: `distill eval` looks up the corpus's audits with it
            _write(stage / TRAINING_NAME, (json.dumps(training, indent=2) + "\n").encode(), out)
        _write(
            stage / "README.md",
            make_model_card(card, cfg["model_cfg"], _text_config(stage), n_params, folder_name=name).encode(),
            out,
        )
    log.info("exported student (%d tensors) to %s", len(sd), out)
    return out


@contextlib.contextmanager
def staged_folder(out: Path):
    """A fresh folder beside `out` to fill; on success it replaces `out` (an older export there is removed only
    after the new one is in place), on any error it is removed and `out` is left as it was."""
    parent = out.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    stage = parent / f".tmp-export-{out.resolve().name}-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    try:
        stage.mkdir()
        yield stage
        _fsync(stage)
        old = parent / f".old-export-{out.resolve().name}-{os.getpid()}"
        if out.exists():
            os.rename(out, old)
            try:
                os.rename(stage, out)
            except BaseException:
                os.rename(old, out)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def _fsync(folder: Path) -> None:
    for p in [*folder.iterdir(), folder]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write(path: Path, data: bytes, out: Path) -> None:
    """Write one file of the export; a full disk names the file as it will be called in `out`."""
    try:
        path.write_bytes(data)
    except OSError as e:
        raise OSError(e.errno, e.strerror or str(e), str(out / path.name)) from e


_OS_ERROR = re.compile(r"os error (\d+)")


def _save_weights(sd: dict[str, torch.Tensor], path: Path, out: Path) -> None:
    """safetensors' save_file; its I/O failures (a SafetensorError "... (os error 28)") become the OSError they
    are, naming the weights file, so that a full disk reads as one (exit 1), not as a damaged file."""
    try:  # looked up at the call: tests/test_disk_full.py and test_cli_errors.py patch it at its source
        safetensors.torch.save_file(sd, str(path), metadata={"format": "pt"})
    except OSError as e:
        raise OSError(e.errno, e.strerror or str(e), str(out / path.name)) from e
    except Exception as e:
        found = _OS_ERROR.search(str(e))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), str(out / path.name)) from e


def training_record(run: Path) -> dict | None:
    """training.json of an export: the corpus and cache its run recorded (None for a run without run_meta.json)."""
    meta = read_run_meta(run)
    if meta is None:
        return None
    corpus = meta.corpus
    features = str(Path(meta.features).resolve()) if meta.features else None  # as the audits beside it are named
    return {"corpus": corpus.path, "corpus_fingerprint": corpus.fingerprint, "features": features}


def card_from_run(run: Path, ckpt: Path, report: str | Path | None = None, name: str | None = None) -> ModelCard:
    """Model card facts from `run_meta.json`, the checkpoint's `train_state.json` and an eval report."""
    meta = read_run_meta(run) or RunMeta()
    try:
        state = read_train_state(ckpt)
    except FileNotFoundError:  # an unfinished checkpoint: its folder name gives the step
        state = None
    return ModelCard(
        name=name or "biomed-distill student",
        source=meta.student,
        teachers=tuple(CardTeacher(t, r.spec, r.weight) for t, r in meta.teachers.items()),
        corpus=meta.corpus.path,
        corpus_size=meta.corpus.size,
        steps=state.step if state else checkpoint_step(ckpt),
        samples_seen=state.samples_seen if state else None,
        final_losses=dict(state.last_losses) if state else {},
        eval=read_report(report) if report is not None else None,
    )


def export_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path,
    report: str | Path | None = None,
    text_config_from_hub: str | None = None,
    name: str | None = None,
    ema: bool = False,
    average: Sequence[str | Path] = (),
) -> Path:
    """`distill export`: the student of a training checkpoint (heads dropped) as an export folder.

    `name` titles the model card; by default the export folder's name (what the user called the model). `ema`:
    the checkpoint's EMA of the weights (train.ema) instead of the weights; `average`: more checkpoints whose
    weights (or EMAs) are averaged with this one's (a model soup of one run's checkpoints).
    """
    ckpt, run = resolve_checkpoint(checkpoint)
    student_dir = student_config_dir(run)
    read = load_ema_state if ema else load_training_state
    sd = read(ckpt)
    notes = [f"Weights: the exponential moving average (train.ema) of {ckpt.name}."] if ema else []
    if average:
        others = [resolve_checkpoint(c)[0] for c in average]
        sd = average_states([(ckpt, sd), *((c, read(c)) for c in others)])
        what = "EMAs" if ema else "weights"
        notes = [f"Weights: the mean of the {what} of {', '.join(str(c) for c in [ckpt, *others])}."]
    student_sd = {k[len("student.") :]: v for k, v in sd.items() if k.startswith("student.")}
    if not student_sd:
        raise ValueError(
            f"{weights_file(ckpt)}: no 'student.' keys (found e.g. {next(iter(sd), None)!r}); "
            f"expected the training module's state dict with student.* and heads.* keys"
        )
    cfg = _read_config(student_dir)
    model_cfg = {**cfg["model_cfg"], **local_dir_overrides(student_dir)}
    model = instantiate(model_cfg, cfg.get("preprocess_cfg"))
    try:
        missing, unexpected = model.load_state_dict(student_sd, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ValueError(f"{weights_file(ckpt)} does not match the student in {student_dir}: {e}") from e
    if missing or unexpected:
        raise ValueError(
            f"{weights_file(ckpt)} does not match the student in {student_dir}: missing "
            f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{'...' if len(unexpected) > 5 else ''}"
        )
    ignored = sorted({k.split(".")[0] for k in sd if not k.startswith("student.")})
    log.info("exporting %s (step %s); not exported: %s", ckpt, checkpoint_step(ckpt), ", ".join(ignored) or "-")
    return export_student(
        model,
        student_dir,
        out_dir,
        card=dataclasses.replace(
            card_from_run(run, ckpt, report, name or Path(out_dir).resolve().name), notes=" ".join(notes) or None
        ),
        training=None if text_config_from_hub else training_record(run),  # publishing ships no local path
        text_config_from_hub=text_config_from_hub,
    )


def load_student(path: str | Path, device: str | torch.device = "cpu"):
    """(model, preprocess, tokenizer) of an exported student, wherever the folder now lives; model in eval mode."""
    folder = Path(path)
    _read_config(folder)
    if not (folder / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(
            f"{folder / WEIGHTS_NAME} not found: {folder} has no weights (a run's student/ "
            f"folder is not an export; run `distill export CHECKPOINT --out DIR`)"
        )
    model, preprocess, tokenizer = create_open_clip(parse_spec(f"local-dir:{folder}"), device)
    model.eval()
    return model, preprocess, tokenizer


def stage_for_hub(path: str | Path, repo: str, staged: str | Path) -> Path:
    """Copy an export into `staged` as it should appear on the Hub under REPO.

    `open_clip_config.json` names REPO itself as the text tower's config and tokenizer (the repo holds both at
    its top level) unless the export already names a hub id (`--text-config-from-hub`); the model card's usage
    says `hf-hub:REPO`.
    """
    folder, staged = Path(path), Path(staged)
    cfg = _read_config(folder)
    if not (folder / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"{folder / WEIGHTS_NAME} not found: push an export made by `distill export`")
    shutil.copytree(folder, staged)
    (staged / TRAINING_NAME).unlink(missing_ok=True)  # this machine's paths: not for the hub
    name = cfg["model_cfg"]["text_cfg"].get("hf_model_name")
    if name is not None and (name == "." or Path(name).is_absolute() or Path(name).exists()):  # not a hub id
        (staged / CONFIG_NAME).write_text(
            json.dumps({**cfg, "model_cfg": name_text_tower(cfg["model_cfg"], repo)}, indent=2) + "\n"
        )
    card = staged / "README.md"
    if card.is_file():
        card.write_text(card_for_hub(card.read_text(), repo))
    return staged


def push_to_hub(
    path: str | Path, repo: str, private: bool = False, commit_message: str = "Upload biomed-distill student"
) -> str:
    """Upload an export to the Hugging Face Hub so `open_clip.create_model("hf-hub:REPO")` works for anyone.

    Needs a network and a token (`huggingface-cli login` or HF_TOKEN); see `stage_for_hub` for what is uploaded.
    """
    with tempfile.TemporaryDirectory() as tmp:
        staged = stage_for_hub(path, repo, Path(tmp) / "export")
        api = huggingface_hub.HfApi()  # looked up at the call: tests/test_export.py patches it at its source
        api.create_repo(repo, private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo, folder_path=str(staged), commit_message=commit_message)
    return str(getattr(info, "commit_url", info))
