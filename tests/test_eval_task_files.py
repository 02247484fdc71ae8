"""Task files: every key validated when loaded (one line naming the file and key), the loose inputs YAML needs,
the built-in and demo tasks' values, and task kinds taken from the EVALUATORS registry."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from test_eval_tasks import write_csv

from cache.sources.synthetic import SHAPES
from distill.cli import main
from distill.demo import _write_demo_tasks
from distill.eval import EVALUATORS, DatasetCfg, FinetuneCfg, ProbeCfg, TaskError, TaskKind, list_tasks, load_task
from distill.eval.retrieval import evaluate_retrieval
from distill.eval.zeroshot import evaluate_zeroshot
from teachers.kernel.config_model import ConfigError

BUILT_INS = {
    "pneumoniamnist-zeroshot",
    "breastmnist-zeroshot",
    "ham10000-zeroshot",
    "medpix-retrieval",
    "pneumoniamnist-linear-probe",
    "ham10000-linear-probe",
    "pneumoniamnist-finetune",
}


def write_task(path: Path, **task) -> Path:
    path.write_text(yaml.safe_dump(task))
    return path


# -- task files --------------------------------------------------------------------------------------------
def test_builtin_tasks_validate():
    assert BUILT_INS <= set(list_tasks())
    for name in list_tasks():
        t = load_task(name, max_samples=10)
        assert t.name == name and t.dataset.max_samples == 10
    ham = load_task("ham10000-zeroshot")
    assert len(ham.classes) == 7 and all("{}" in tp for tp in ham.templates)


def test_unknown_task_suggests():
    with pytest.raises(TaskError, match="did you mean pneumoniamnist-zeroshot"):
        load_task("pneumoniamnist-zeroshoot")


def test_unknown_key_names_file_and_key(tmp_path):
    f = write_task(
        tmp_path / "t.yaml", name="t", kind="zeroshot", classes=["a", "b"], dataset={"path": "x.csv", "max_sample": 3}
    )
    with pytest.raises(TaskError, match=r"t\.yaml: unknown key 'dataset\.max_sample'; did you mean 'max_samples'"):
        load_task(str(f))
    f = write_task(
        tmp_path / "u.yaml", name="u", kind="zeroshot", classes=["a", "b"], dataset={"path": "x.csv"}, prompts=["{}"]
    )
    with pytest.raises(
        TaskError,
        match=r"u\.yaml: unknown key 'prompts'; did you mean 'templates'\? "
        r"\(known keys here: name, kind, dataset, classes, label_values, templates, ",
    ):
        load_task(str(f))


@pytest.mark.parametrize(
    "bad, msg",
    [
        (
            {"kind": "zero-shot"},
            r"kind: unknown task kind 'zero-shot'; did you mean zeroshot\? \(known: finetune, "
            r"linear_probe, retrieval, zeroshot\)",
        ),
        ({"templates": ["a photo"]}, r"templates must each contain one '\{\}' for the class name; bad: \['a photo'\]"),
        ({"classes": ["a"]}, r"a zeroshot task needs 'classes' \(at least two class names\)"),
        ({"classes": ["a", "b", "a"]}, r"classes: duplicate class names \['a'\]"),
        ({"classes": [True, False]}, r"classes\[0\] must be str, got True \(bool\)"),
        ({"label_values": [0, 1, 2]}, "label_values has 3 entries but classes has 2"),
        ({"multilabel": "yes"}, r"multilabel must be bool, got 'yes' \(str\)"),
        ({"dataset": {"path": "x.csv", "max_samples": "ten"}}, r"dataset\.max_samples must be int \| None, got 'ten'"),
        ({"dataset": {"path": "x.csv", "max_samples": 0}}, r"dataset\.max_samples must be >= 1, got 0"),
        (
            {"dataset": {"path": "x.csv", "format": "tvs"}},
            r"dataset\.format must be one of auto, csv, folder, jsonl, "
            r"npz, stream, tsv, webdataset, got 'tvs'",
        ),
        (
            {"dataset": {"path": "x.csv", "splits": {"dev": "dev"}}},
            r"dataset\.splits: unknown role\(s\) \['dev'\]; "
            "roles are train, val, test",
        ),
        (
            {"dataset": {"path": "x.csv", "split_fractions": [0.5, 0.5]}},
            r"dataset\.split_fractions must be three "
            r"non-negative fractions .* got \[0\.5, 0\.5\]",
        ),
        ({"dataset": {"format": "csv"}}, r"dataset is missing required key\(s\): path"),
        ({"dataset": "x.csv"}, "dataset must be a mapping of DatasetCfg fields, got 'x.csv'"),
        ({"linear_probe": {"shots": [0, 2]}}, r"linear_probe\.shots must each be >= 1, got \[0, 2\]"),
        ({"linear_probe": {"l2_grid": []}}, r"linear_probe\.l2_grid must be a non-empty list of values >= 0, got \[\]"),
        ({"finetune": {"lr_head": 0}}, r"finetune\.lr_head must be > 0, got 0\.0"),
        ({"finetune": {"epochs": 1.5}}, r"finetune\.epochs must be int, got 1\.5 \(float\)"),
    ],
)
def test_invalid_values_are_named(tmp_path, bad, msg):
    task = {"name": "t", "kind": "zeroshot", "classes": ["a", "b"], "dataset": {"path": "x.csv"}, **bad}
    with pytest.raises(TaskError, match=r"t\.yaml: " + msg):
        load_task(str(write_task(tmp_path / "t.yaml", **task)))


def test_task_errors_are_config_errors_of_one_line(tmp_path):
    f = write_task(tmp_path / "t.yaml", name="t", classes=["a", "b"], dataset={"path": "x.csv"})
    with pytest.raises(ConfigError) as e:
        load_task(str(f))
    assert str(e.value) == f"{f}: the task is missing required key(s): kind"
    (tmp_path / "l.yaml").write_text("- a\n- b\n")
    with pytest.raises(TaskError, match=r"l\.yaml: a task file must be a YAML mapping, got list"):
        load_task(str(tmp_path / "l.yaml"))
    with pytest.raises(TaskError, match=r"pneumoniamnist-zeroshot .*dataset\.max_samples must be >= 1, got 0"):
        load_task("pneumoniamnist-zeroshot", max_samples=0)


def test_cli_eval_prints_a_bad_task_file_in_one_line(tmp_path, capsys):
    f = write_task(
        tmp_path / "t.yaml", name="t", kind="zeroshot", classes=["a", "b"], dataset={"path": "x.csv", "fromat": "csv"}
    )
    assert main(["eval", "--model", "m=biomedclip", "--task", str(f), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"distill eval: error: {f}: unknown key 'dataset.fromat'; did you mean 'format'? (known keys here: "
        "path, format, image_column, label_column, label_columns, label_separator, caption_column, "
        "split_column, splits, split_fractions, max_samples, seed)"
    )
    assert not (tmp_path / "r").exists()


def test_loose_inputs_task_files_rely_on(tmp_path):
    """Numbers where text is expected, one value where a list is expected, a float written as YAML 1.1 text."""
    f = write_task(
        tmp_path / "t.yaml",
        name=7,
        kind="linear_probe",
        classes=[0, 1],
        label_values=[10, 2.5],
        templates="a photo of {}.",
        dataset={"path": "x.csv", "image_column": 3, "splits": {"test": 3}, "split_fractions": [0.5, 0.25, "0.25"]},
        linear_probe={"shots": 4, "l2_grid": 1},
        finetune={"lr_head": "1e-3", "max_steps": None},
    )
    t = load_task(str(f))
    assert (t.name, t.classes, t.label_values, t.templates) == ("7", ("0", "1"), ("10", "2.5"), ("a photo of {}.",))
    assert t.dataset.image_column == "3" and t.dataset.splits == {"test": "3"}
    assert t.dataset.split_fractions == (0.5, 0.25, 0.25)
    assert t.linear_probe.shots == (4,) and t.linear_probe.l2_grid == (1.0,)
    assert type(t.linear_probe.l2_grid[0]) is float
    assert t.finetune.lr_head == 0.001 and t.finetune.max_steps is None
    assert t.source == str(f) and t.root == str(tmp_path.resolve()) and t.dataset_path == tmp_path.resolve() / "x.csv"


def test_builtin_tasks_load_to_their_values(monkeypatch, tmp_path):
    """The built-in files' values, typed as before the move to pydantic (tuples, floats, defaults)."""
    monkeypatch.setenv("BIOMED_DISTILL_DATA", str(tmp_path))
    ft = load_task("pneumoniamnist-finetune")
    assert (ft.kind, ft.classes, ft.templates, ft.multilabel) == (
        "finetune",
        ("normal lungs", "pneumonia"),
        ("{}",),
        False,
    )
    assert ft.finetune == FinetuneCfg(
        epochs=3,
        batch_size=64,
        lr_encoder=1e-5,
        lr_head=1e-3,
        weight_decay=0.01,
        warmup_steps=20,
        amp=True,
        flip=True,
        max_steps=None,
    )
    assert ft.linear_probe == ProbeCfg(
        shots=(1, 2, 4, 8, 16), full=True, l2_grid=(1e-6, 1e-4, 1e-3, 1e-2, 1e-1), max_iter=200
    )
    assert ft.dataset == DatasetCfg(path="medmnist/pneumoniamnist.npz")
    assert ft.dataset.splits == {"train": "train", "val": "val", "test": "test"} and ft.dataset.format == "auto"
    assert ft.dataset_path == tmp_path / "medmnist/pneumoniamnist.npz" and ft.root == str(tmp_path)
    assert ft.needs_roles() == ("train", "val", "test") and ft.label_names == ft.classes
    assert ft.source.startswith("built-in task pneumoniamnist-finetune (") and ft.source.endswith(".yaml)")
    ham = load_task("ham10000-linear-probe", max_samples=7)
    assert ham.dataset.split_fractions == (0.6, 0.1, 0.3) and ham.dataset.seed == 0
    assert ham.dataset.label_column == "label" and ham.dataset.max_samples == 7 and len(ham.classes) == 7
    assert ham.classes[0] == "actinic keratosis" and ham.classes[-1] == "vascular lesion"
    zs = load_task("ham10000-zeroshot")
    assert zs.dataset == ham.dataset.model_copy(update={"max_samples": None}) and zs.classes == ham.classes
    assert zs.templates[0] == "a dermoscopy image of {}." and len(zs.templates) == 4
    assert zs.needs_roles() == ("test",)
    rt = load_task("medpix-retrieval")
    assert (rt.kind, rt.classes, rt.dataset.caption_column, rt.needs_roles()) == ("retrieval", (), "caption", ("test",))
    assert load_task("breastmnist-zeroshot").description.startswith("Zero-shot malignant vs normal/benign")


def test_demo_task_files_load(tmp_path):
    held = write_csv(
        tmp_path / "heldout.csv", ["image", "caption"], [[f"img/{i}.png", f"a {s} here"] for i, s in enumerate(SHAPES)]
    )
    zs, rt = (load_task(p) for p in _write_demo_tasks(tmp_path, held))
    assert (zs.name, zs.kind, zs.classes) == ("demo-shapes-zeroshot", "zeroshot", tuple(SHAPES))
    assert zs.templates == ("an image of a {} ", "a {} in the centre", "ct image of a {}")
    assert (zs.dataset.path, zs.dataset.format) == ("heldout_shapes.csv", "csv")
    assert (rt.name, rt.kind, rt.dataset.path, rt.dataset.format) == (
        "demo-retrieval",
        "retrieval",
        "heldout.csv",
        "csv",
    )
    assert rt.dataset_path == tmp_path.resolve() / "heldout.csv"


def test_task_kinds_come_from_the_evaluators_registry(tmp_path, monkeypatch):
    assert EVALUATORS.list() == ["finetune", "linear_probe", "retrieval", "zeroshot"]
    assert EVALUATORS.get("zeroshot").evaluate is evaluate_zeroshot
    assert EVALUATORS.get("retrieval") == TaskKind(evaluate_retrieval, roles=("test",), needs_classes=False)
    seen = []
    monkeypatch.setitem(
        EVALUATORS._items, "toy_kind", TaskKind(lambda *a: seen.append(a) or {}, roles=("val",), needs_classes=False)
    )
    t = load_task(str(write_task(tmp_path / "t.yaml", name="t", kind="toy_kind", dataset={"path": "x.csv"})))
    assert t.needs_roles() == ("val",) and t.spec.evaluate("task", "model", "name", {}, None) == {}
    assert seen == [("task", "model", "name", {}, None)]
