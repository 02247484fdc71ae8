"""What a new user meets first: a demo folder that still works after it is moved, a model card titled with the
model's name and listing metrics in the report's order with no absolute path in its usage block, run files read
through one schema, and hub models that fail at once when the Hub is off or unreachable."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import httpx2
import huggingface_hub
import open_clip.pretrained
import pytest
import transformers.utils.hub
from huggingface_hub import constants

from cache.sources.synthetic import make_synthetic_corpus
from distill.cli import main
from distill.demo import _quiet_info, _write_demo_tasks
from distill.logs import setup_logging
from student.card import CardTeacher, ModelCard, make_model_card
from student.export import card_from_run
from student.run_files import (
    CorpusRecord,
    RunMeta,
    TeacherRecord,
    TrainState,
    read_run_meta,
    read_train_state,
    write_run_meta,
    write_train_state,
)
from teachers import TeacherLoadError, load_teacher

MODEL_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2},
    "text_cfg": {"context_length": 32, "width": 64, "layers": 2},
}


def test_demo_tasks_hold_relative_paths_and_run_after_the_folder_moves(tmp_path, tiny_teachers):
    demo = tmp_path / "demo-out"
    heldout = make_synthetic_corpus(demo / "heldout", n=12, image_size=32, seed=1)
    tasks = _write_demo_tasks(demo, heldout)
    zeroshot = (demo / "demo-shapes-zeroshot.yaml").read_text()
    assert "dataset: {path: heldout_shapes.csv, format: csv}" in zeroshot
    assert "dataset: {path: heldout/corpus.csv, format: csv}" in (demo / "demo-retrieval.yaml").read_text()
    labelled = (demo / "heldout_shapes.csv").read_text().splitlines()
    assert labelled[0] == "image,label" and labelled[1].startswith("heldout/images/00000.png,")
    for f in [*tasks, demo / "heldout_shapes.csv"]:
        assert str(tmp_path) not in Path(f).read_text(), f

    moved = shutil.move(str(demo), str(tmp_path / "elsewhere" / "my-demo"))
    out = tmp_path / "report"
    assert (
        main(
            [
                "eval",
                "--model",
                f"oc={tiny_teachers['oc']}",
                "--task",
                f"{moved}/demo-shapes-zeroshot.yaml",
                "--task",
                f"{moved}/demo-retrieval.yaml",
                "--out",
                str(out),
                "--bootstrap",
                "0",
            ]
        )
        == 0
    )
    results = json.loads((out / "report.json").read_text())["results"]["oc"]
    assert list(results) == ["demo-shapes-zeroshot", "demo-retrieval"]
    assert 0.0 <= results["demo-shapes-zeroshot"]["accuracy"] <= 1.0
    assert 0.0 <= results["demo-retrieval"]["image_to_text_R@1"] <= results["demo-retrieval"]["image_to_text_R@10"]


def test_card_title_metric_order_and_relative_usage():
    report = {
        "results": {
            "student": {"retrieval": {"R@1": 0.25, "R@5": 0.5, "R@10": 0.75}},
            "teacher": {"retrieval": {"R@1": 0.125, "R@5": 0.375, "R@10": 1.0}},
        }
    }
    card = make_model_card(
        ModelCard(name="pmc-hybrid-b16", teachers=(CardTeacher("biomedclip", "biomedclip", 1.0),), eval=report),
        MODEL_CFG,
        folder_name="pmc-hybrid-b16",
    )
    lines = card.splitlines()
    assert lines[lines.index("---", 1) + 2] == "# pmc-hybrid-b16"
    rows = [line for line in lines if line.startswith("| retrieval/")]
    assert rows == [
        "| retrieval/R@1 | 0.25 | 0.125 |",
        "| retrieval/R@5 | 0.5 | 0.375 |",
        "| retrieval/R@10 | 0.75 | 1 |",
    ]
    usage = card[card.index("## Usage") :]
    assert 'student_dir = "pmc-hybrid-b16"' in usage
    assert 'open_clip.create_model_and_transforms(f"local-dir:{student_dir}")' in usage
    assert "load_student(student_dir)" in usage and "/" not in usage.split('student_dir = "')[1].split('"')[0]


def test_run_files_round_trip_and_feed_the_card(tmp_path):
    run, ckpt = tmp_path / "run", tmp_path / "run" / "checkpoint-12"
    ckpt.mkdir(parents=True)
    meta = RunMeta(
        mode="hybrid",
        student="tiny",
        teachers={
            "biomedclip": TeacherRecord(weight=1.0, embed_dim=512, spec="biomedclip"),
            "plip": TeacherRecord(weight=0.5, embed_dim=512, spec="hf-clip:vinid/plip"),
        },
        corpus=CorpusRecord(path="pmc.csv", size=32, rows_used=30, fingerprint="abc"),
        routing={"rows_per_teacher": {"plip": 3}},
        config={"train": {"max_steps": 12}},
    )
    write_run_meta(run, meta)
    write_train_state(ckpt, TrainState(step=12, samples_seen=96, last_losses={"loss": 1.25, "infonce": 0.75}))
    assert read_run_meta(run) == meta
    assert read_train_state(ckpt) == TrainState(step=12, samples_seen=96, last_losses={"loss": 1.25, "infonce": 0.75})

    card = card_from_run(run, ckpt, name="pmc-student")
    assert card == ModelCard(
        name="pmc-student",
        source="tiny",
        teachers=(CardTeacher("biomedclip", "biomedclip", 1.0), CardTeacher("plip", "hf-clip:vinid/plip", 0.5)),
        corpus="pmc.csv",
        corpus_size=32,
        steps=12,
        samples_seen=96,
        final_losses={"loss": 1.25, "infonce": 0.75},
    )
    # a field the schema does not know (another version's file) is refused, naming the file
    (ckpt / "train_state.json").write_text(json.dumps({"step": 3, "global_step": 3}))
    with pytest.raises(ValueError, match=r"train_state.json: unknown field\(s\) 'global_step' for TrainState"):
        read_train_state(ckpt)
    assert read_run_meta(tmp_path / "no-run") is None


def test_the_demo_hides_our_info_lines_unless_verbose():
    ours = logging.getLogger("distill.train")
    setup_logging(verbose=False)
    assert ours.isEnabledFor(logging.INFO)
    with _quiet_info():
        assert not ours.isEnabledFor(logging.INFO) and ours.isEnabledFor(logging.WARNING)
    assert ours.isEnabledFor(logging.INFO)
    logging.getLogger().setLevel(logging.DEBUG)  # `distill -v`
    logging.getLogger("distill").setLevel(logging.NOTSET)
    try:
        with _quiet_info():
            assert ours.isEnabledFor(logging.INFO)
    finally:
        setup_logging(verbose=False)


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    """An empty hub cache; every download function counts its calls (none may happen) and fails."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    calls = []

    def download(*args, **kwargs):
        calls.append(kwargs.get("filename"))
        raise OSError("a download was attempted")

    monkeypatch.setattr(open_clip.pretrained, "hf_hub_download", download)
    monkeypatch.setattr(transformers.utils.hub, "hf_hub_download", download)
    return calls


@pytest.mark.parametrize(
    "spec, repo",
    [
        ("biomedclip", "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"),
        ("hf-clip:vinid/plip", "vinid/plip"),
        ("ViT-B-32/openai", "timm/vit_base_patch32_clip_224.openai"),
    ],
)
def test_uncached_hub_model_fails_at_once_when_offline(spec, repo, empty_hub, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(TeacherLoadError, match=rf"(?s){repo} is not in the Hugging Face cache .*HF_HUB_OFFLINE=1"):
        load_teacher(spec)
    assert empty_hub == []  # no download, so no retries


def test_unreachable_hub_is_asked_once_without_retries(empty_hub, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    probes = []

    def no_network(url, **kwargs):
        probes.append(url)
        raise httpx2.ConnectError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", no_network)
    with pytest.raises(
        TeacherLoadError,
        match=r"'biomedclip'.*the Hugging Face Hub cannot be reached \(ConnectError: "
        r"\[Errno -2\] Name or service not known\) and microsoft/BiomedCLIP",
    ):
        load_teacher("biomedclip")
    assert len(probes) == 1  # one request, no retries
    assert probes[0].endswith(
        "/microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224/resolve/main/open_clip_config.json"
    )
    assert empty_hub == []
