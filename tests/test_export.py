"""Student export: stock open_clip loads it offline in a fresh process, load_student after a move, checkpoints."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import huggingface_hub
import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from distill.training.heads import ProjectionHeads
from student import build_student, export_checkpoint, export_student, load_student
from student.build import instantiate
from student.card import ModelCard, metrics_table
from student.export import push_to_hub
from student.tokenizer import train_wordpiece
from teachers import load_teacher
from teachers.open_clip_teacher import local_dir_overrides

TEXTS = ["a ct scan of a red circle in the upper left", "an mri of a blue square", "ultrasound"]


@pytest.fixture(scope="module")
def wordpiece(tiny_corpus, tmp_path_factory) -> Path:
    with open(tiny_corpus, newline="") as f:
        captions = [row["caption"] for row in csv.DictReader(f)]
    return train_wordpiece(captions, tmp_path_factory.mktemp("tok"), vocab_size=300, model_max_length=32)


@pytest.fixture(scope="module")
def run_dir(wordpiece, tmp_path_factory) -> Path:
    """A run folder with student/ from build_student, as the trainer leaves it."""
    run = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    build_student("tiny", run / "student", tokenizer_dir=wordpiece)
    return run


@pytest.fixture(scope="module")
def trained(run_dir):
    """The tiny student with non-initial weights (so a load that ignored the file could not pass)."""
    cfg = json.loads((run_dir / "student" / "open_clip_config.json").read_text())
    model = instantiate({**cfg["model_cfg"], **local_dir_overrides(run_dir / "student")}, cfg["preprocess_cfg"])
    torch.manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def _inputs() -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.rand(4, 3, 32, 32, generator=g)


def _embed(model, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return (model.encode_image(_inputs(), normalize=True), model.encode_text(tokenizer(TEXTS), normalize=True))


STOCK_LOAD = textwrap.dedent("""
    import json, sys
    import open_clip, torch
    from safetensors.torch import load_file, save_file
    d, io = sys.argv[1], sys.argv[2]
    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + d)
    tokenizer = open_clip.get_tokenizer("local-dir:" + d)
    model.eval()
    texts = json.load(open(io + "/texts.json"))
    tokens = tokenizer(texts)
    with torch.no_grad():
        img = model.encode_image(load_file(io + "/in.safetensors")["images"], normalize=True)
        txt = model.encode_text(tokens, normalize=True)
    save_file({"img": img, "txt": txt, "tokens": tokens}, io + "/out.safetensors")
    pp = model.visual.preprocess_cfg
    json.dump({"size": list(pp["size"]), "mean": list(pp["mean"]), "std": list(pp["std"]),
               "modules": sorted(m for m in sys.modules if m.split(".")[0] in ("student", "teachers", "distill"))},
              open(io + "/pp.json", "w"))
""")


def test_export_loads_in_stock_open_clip_fresh_process(run_dir, trained, tmp_path):
    out = export_student(trained, run_dir / "student", tmp_path / "export", card=ModelCard(name="tiny-export", steps=3))
    names = {p.name for p in out.iterdir()}
    assert {
        "open_clip_config.json",
        "open_clip_model.safetensors",
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "README.md",
    } <= names
    cfg = json.loads((out / "open_clip_config.json").read_text())
    assert cfg["model_cfg"]["text_cfg"]["hf_model_name"] == str(out.resolve())
    assert cfg["model_cfg"]["text_cfg"]["hf_tokenizer_name"] == str(out.resolve())

    io = tmp_path / "io"
    io.mkdir()
    save_file({"images": _inputs()}, str(io / "in.safetensors"))
    (io / "texts.json").write_text(json.dumps(TEXTS))
    (tmp_path / "script.py").write_text(STOCK_LOAD)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": ""}
    r = subprocess.run(
        [sys.executable, str(tmp_path / "script.py"), str(out), str(io)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    got = load_file(str(io / "out.safetensors"))
    tokenizer = open_clip.get_tokenizer(f"local-dir:{run_dir / 'student'}")
    img, txt = _embed(trained, tokenizer)
    assert torch.equal(got["tokens"], tokenizer(TEXTS))
    assert (got["img"] - img).abs().max().item() <= 1e-5
    assert (got["txt"] - txt).abs().max().item() <= 1e-5
    pp = json.loads((io / "pp.json").read_text())
    assert pp["size"] == [32, 32] and pp["mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    assert pp["modules"] == []  # stock open_clip only: none of our packages was needed


def test_load_student_after_move(run_dir, trained, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = export_student(trained, run_dir / "student", Path("a") / "export")  # a relative --out
    text = json.loads((out / "open_clip_config.json").read_text())["model_cfg"]["text_cfg"]
    assert text["hf_model_name"] == str(tmp_path.resolve() / "a" / "export")  # absolute: loads from any cwd
    out = tmp_path / out
    moved = tmp_path / "b" / "moved"
    moved.parent.mkdir()
    shutil.move(str(out), str(moved))
    assert not out.exists()
    with pytest.raises(Exception):  # noqa: B017 (stock open_clip follows the stale absolute path; its error is its own)
        open_clip.create_model_and_transforms(f"local-dir:{moved}")
    model, preprocess, tokenizer = load_student(moved)
    assert not model.training
    img, txt = _embed(model, tokenizer)
    ref_img, ref_txt = _embed(trained, open_clip.get_tokenizer(f"local-dir:{run_dir / 'student'}"))
    assert (img - ref_img).abs().max().item() <= 1e-5 and (txt - ref_txt).abs().max().item() <= 1e-5
    teacher = load_teacher(f"local-dir:{moved}")  # the same folder as a SPEC, through teachers/
    with torch.no_grad():
        t_img, t_txt = teacher.encode_image(_inputs()), teacher.encode_text(teacher.tokenize(TEXTS))
    assert (t_img - ref_img).abs().max().item() <= 1e-5 and (t_txt - ref_txt).abs().max().item() <= 1e-5
    x = preprocess(Image.new("RGB", (48, 40), (200, 10, 10)))
    assert x.shape == (3, 32, 32)
    with pytest.raises(FileNotFoundError, match="no weights"):
        load_student(run_dir / "student")


def test_export_names_hub_text_config(run_dir, trained, tmp_path):
    hub = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"
    out = export_student(trained, run_dir / "student", tmp_path / "e", text_config_from_hub=hub)
    text = json.loads((out / "open_clip_config.json").read_text())["model_cfg"]["text_cfg"]
    assert text["hf_model_name"] == hub == text["hf_tokenizer_name"]
    model, _, tokenizer = load_student(out)  # still loads offline from the folder's own config.json
    img, _ = _embed(model, tokenizer)
    assert (img - _embed(trained, tokenizer)[0]).abs().max().item() <= 1e-5
    # a text config that is reachable offline is checked against the student's own text tower
    same, other = tmp_path / "same-bert", tmp_path / "other-bert"
    for folder, hidden in ((same, None), (other, 128)):
        folder.mkdir()
        text_cfg = json.loads((run_dir / "student" / "config.json").read_text())
        text_cfg["hidden_size"] = hidden or text_cfg["hidden_size"]
        (folder / "config.json").write_text(json.dumps(text_cfg))
    export_student(trained, run_dir / "student", tmp_path / "ok", text_config_from_hub=str(same))
    with pytest.raises(ValueError, match=r"different text tower.*hidden_size': \(64, 128\)"):
        export_student(trained, run_dir / "student", tmp_path / "bad", text_config_from_hub=str(other))
    assert not (tmp_path / "bad").exists()  # refused before anything was written


def _fake_checkpoint(
    run: Path, step: int, student_sd: dict, heads: ProjectionHeads, losses: dict | None, name: str | None = None
) -> Path:
    """What distill.train leaves: accelerate's save_state files plus train_state.json (TrainState) when finished."""
    ckpt = run / (name or f"checkpoint-{step}")
    ckpt.mkdir()
    sd = {f"student.{k}": v.contiguous() for k, v in student_sd.items()}
    sd.update({f"heads.{k}": v.contiguous() for k, v in heads.state_dict().items()})
    save_file(sd, str(ckpt / "model.safetensors"))
    torch.save({"param_groups": []}, ckpt / "optimizer.bin")
    if losses is not None:
        (ckpt / "train_state.json").write_text(
            json.dumps(
                {"step": step, "epoch": 0, "batches_in_epoch": step, "samples_seen": 8 * step, "last_losses": losses}
            )
        )
    return ckpt


def test_export_checkpoint_newest_without_heads_and_card(run_dir, trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir / "student", run / "student")
    (run / "run_meta.json").write_text(
        json.dumps(
            {
                "teachers": {
                    "biomedclip": {"spec": "hf-hub:microsoft/BiomedCLIP", "weight": 1.0},
                    "quiltnet": {"spec": "local-dir:/models/quilt", "weight": 0.5},
                },
                "corpus": {"path": "/data/pmc.csv", "size": 32},
                "config": {"student": {"preset": "tiny"}},
            }
        )
    )
    heads = ProjectionHeads(64, {"biomedclip": 24, "quiltnet": 40})
    base = {k: v.clone() for k, v in trained.state_dict().items()}
    late = {k: v + 0.01 for k, v in base.items()}
    _fake_checkpoint(run, 5, base, heads, {"loss": 2.5})
    _fake_checkpoint(run, 12, late, heads, {"loss": 1.25, "contrastive": 0.75})  # newest by step, not by name
    junk = {k: torch.zeros_like(v) for k, v in base.items()}
    _fake_checkpoint(run, 20, junk, heads, None)  # unfinished (no train_state.json): not chosen
    _fake_checkpoint(run, 30, junk, heads, None, name="checkpoint-30.tmp")  # being written: never chosen
    (tmp_path / "report.json").write_text(
        json.dumps({"student": {"pcam": {"zero_shot_acc": 0.8125}}, "biomedclip": {"pcam": {"zero_shot_acc": 0.75}}})
    )

    out = export_checkpoint(run, tmp_path / "export", report=tmp_path / "report.json")
    sd = load_file(str(out / "open_clip_model.safetensors"))
    assert set(sd) == set(late) and not any(k.startswith(("heads.", "student.")) for k in sd)
    assert all(torch.equal(sd[k], late[k]) for k in sd)
    card = (out / "README.md").read_text()
    assert "/data/" not in card and "/models/" not in card and str(tmp_path) not in card  # names, never paths
    for needle in (
        "\n# export\n",
        "biomedclip",
        "quiltnet",
        "hf-hub:microsoft/BiomedCLIP",
        "`local-dir:quilt` | 0.5 |",
        "steps: 12",
        "- corpus: `pmc.csv`",
        "32 image-text pairs",
        "samples seen: 96",
        "| loss | 1.25 |",
        "| contrastive | 0.75 |",
        "| pcam/zero_shot_acc | 0.8125 | 0.75 |",
        "library_name: open_clip",
        "## Architecture",
        "| image tower | open_clip ViT: 2 layers",
        "| text tower | BERT: ",
        "| embedding dim | 64 |",
    ):
        assert needle in card, needle
    model, _, tokenizer = load_student(out)
    assert torch.equal(model.state_dict()["visual.conv1.weight"], late["visual.conv1.weight"])

    out5 = export_checkpoint(run / "checkpoint-5", tmp_path / "export5")
    assert torch.equal(load_file(str(out5 / "open_clip_model.safetensors"))["visual.proj"], base["visual.proj"])
    assert "steps: 5" in (out5 / "README.md").read_text()


def test_export_checkpoint_errors(run_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint-STEP"):
        export_checkpoint(run_dir, tmp_path / "x")
    run = tmp_path / "run"
    shutil.copytree(run_dir / "student", run / "student")
    (run / "checkpoint-1").mkdir()
    save_file({"model.weight": torch.zeros(2)}, str(run / "checkpoint-1" / "model.safetensors"))
    with pytest.raises(ValueError, match="no 'student.' keys"):
        export_checkpoint(run, tmp_path / "y")
    save_file({"student.visual.proj": torch.zeros(2)}, str(run / "checkpoint-1" / "model.safetensors"))
    with pytest.raises(ValueError, match="does not match the student"):
        export_checkpoint(run, tmp_path / "z")


def test_build_student_from_exported_spec(run_dir, trained, tmp_path):
    out = export_student(trained, run_dir / "student", tmp_path / "export")
    b = build_student(f"local-dir:{out}", tmp_path / "run2" / "student", patch_dropout=0.25)
    assert b.model.visual.patch_dropout.prob == 0.25  # overrides apply to a pretrained SPEC too
    assert not list((tmp_path / "run2" / "student").glob("*.safetensors"))
    text = json.loads((tmp_path / "run2" / "student" / "open_clip_config.json").read_text())["model_cfg"]["text_cfg"]
    assert text["hf_model_name"] == str((tmp_path / "run2" / "student").resolve())
    img, txt = _embed(b.model.eval(), b.tokenizer)
    ref_img, ref_txt = _embed(trained, b.tokenizer)
    assert (img - ref_img).abs().max().item() <= 1e-6 and (txt - ref_txt).abs().max().item() <= 1e-6


def test_metrics_table_shapes():
    nested = metrics_table({"results": {"a": {"t": {"r1": 0.5}}, "b": {"t": {"r1": 0.25, "r5": 1}}}})
    assert nested.splitlines() == ["| metric | a | b |", "|---|---|---|", "| t/r1 | 0.5 | 0.25 |", "| t/r5 |  | 1 |"]
    flat = metrics_table({"acc": 0.123456, "name": "x"})
    assert flat.splitlines() == ["| metric | value |", "|---|---|", "| acc | 0.1235 |"]


def test_push_to_hub_stages_a_hub_loadable_folder(run_dir, trained, tmp_path, monkeypatch):
    """No network here: HfApi is replaced by a recorder; what would be uploaded is checked instead."""
    out = export_student(trained, run_dir / "student", tmp_path / "export")
    calls = []

    class FakeApi:
        def create_repo(self, repo, private=False, exist_ok=False):
            calls.append(("create", repo, private, exist_ok))

        def upload_folder(self, repo_id, folder_path, commit_message):
            staged = Path(folder_path)
            calls.append(
                (
                    "upload",
                    repo_id,
                    sorted(p.name for p in staged.iterdir()),
                    json.loads((staged / "open_clip_config.json").read_text())["model_cfg"]["text_cfg"],
                    (staged / "README.md").read_text(),
                )
            )
            return type("Info", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/1"})()

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    url = push_to_hub(out, "me/student", private=True)
    assert url == "https://huggingface.co/me/student/commit/1"
    assert calls[0] == ("create", "me/student", True, True)
    _, repo, names, text, card = calls[1]
    assert repo == "me/student" and {"open_clip_model.safetensors", "config.json", "tokenizer.json"} <= set(names)
    assert text["hf_model_name"] == "me/student" == text["hf_tokenizer_name"]  # the repo holds config + tokenizer
    assert 'create_model_and_transforms("hf-hub:me/student")' in card and str(out.resolve()) not in card
    assert "## Architecture" in card
    # the export itself is unchanged; a hub id chosen at export time is kept
    assert json.loads((out / "open_clip_config.json").read_text())["model_cfg"]["text_cfg"]["hf_model_name"] == str(
        out.resolve()
    )
    hub = export_student(trained, run_dir / "student", tmp_path / "hub", text_config_from_hub="org/bert")
    push_to_hub(hub, "me/student2")
    assert calls[-1][3]["hf_model_name"] == "org/bert"
