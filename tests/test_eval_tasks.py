"""Task files, dataset readers, zero-shot, linear probe and fine-tuning on small data with known answers."""

from __future__ import annotations

import copy
import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch import nn

from distill.eval import TaskError, load_splits, load_task
from distill.eval.context import EvalContext
from distill.eval.finetune import finetune, inverse_frequency_pos_weight, predict
from distill.eval.linear_probe import evaluate_linear_probe, few_shot_indices, fit_logistic, select_and_fit
from distill.eval.retrieval import evaluate_retrieval
from distill.eval.zeroshot import evaluate_zeroshot
from teachers import Teacher, load_teacher
from teachers.transforms import PreprocessCfg


# -- helpers ---------------------------------------------------------------------------------------------
def write_images(folder: Path, n: int, seed: int = 0, size: int = 16) -> list[tuple[str, int]]:
    """n PNGs, alternately dark (label 0) and bright (label 1), with noise; returns (relative path, label)."""
    rng = np.random.default_rng(seed)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        label = i % 2
        base = 190 if label else 60
        arr = np.clip(base + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / "img" / f"{i}.png")
        rows.append((f"img/{i}.png", label))
    return rows


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def write_task(path: Path, **task) -> Path:
    path.write_text(yaml.safe_dump(task))
    return path


class BrightnessCLIP(Teacher):
    """A perfect toy CLIP: images embed by brightness, texts by the word 'bright' (known zero-shot answers)."""

    def __init__(self):
        super().__init__(
            nn.Linear(1, 1),
            spec="toy",
            embed_dim=2,
            logit_scale=100.0,
            preprocess_cfg=PreprocessCfg(image_size=(8, 8), mean=(0.5,) * 3, std=(0.5,) * 3),
            context_length=1,
        )

    def tokenize(self, texts):
        return torch.tensor([[1 if "bright" in t else 0] for t in texts])

    def _image_features(self, images):
        m = images.mean((1, 2, 3))
        return torch.stack([m, -m], -1)

    def _text_features(self, tokens):
        t = tokens[:, 0].float() * 2 - 1
        return torch.stack([t, -t], -1)


class ConstantCLIP(BrightnessCLIP):
    """A useless toy CLIP: every image and every text embeds to the same vector (scores must be chance)."""

    def _image_features(self, images):
        return torch.tensor([[1.0, 0.0]]).expand(len(images), 2)

    def _text_features(self, tokens):
        return torch.tensor([[1.0, 0.0]]).expand(len(tokens), 2)


@pytest.fixture()
def bright_csv(tmp_path) -> Path:
    rows = write_images(tmp_path, 24)
    return write_csv(
        tmp_path / "data.csv",
        ["image", "label", "caption", "split"],
        [
            [p, ["dark", "bright"][y], f"a {['dark', 'bright'][y]} image", ["train", "val", "test"][i % 3]]
            for i, (p, y) in enumerate(rows)
        ],
    )


# -- datasets (task-file validation: test_eval_task_files.py) ------------------------------------------
def test_missing_dataset_names_path_and_env(tmp_path, monkeypatch):
    monkeypatch.setenv("BIOMED_DISTILL_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(TaskError, match=r"nowhere/medmnist/pneumoniamnist\.npz not found.*BIOMED_DISTILL_DATA"):
        load_splits(load_task("pneumoniamnist-zeroshot"))


def test_csv_errors_name_file_row_and_column(tmp_path, bright_csv):
    base = {
        "name": "t",
        "kind": "zeroshot",
        "classes": ["dark", "bright"],
        "dataset": {"path": "data.csv", "split_column": "split"},
    }
    missing = write_task(tmp_path / "m.yaml", **{**base, "dataset": {"path": "data.csv", "label_column": "dx"}})
    with pytest.raises(TaskError, match=r"data\.csv: column 'dx' not found \(columns: image, label, caption"):
        load_splits(load_task(str(missing)))
    unknown = write_task(tmp_path / "c.yaml", **{**base, "classes": ["dark", "light"]})
    with pytest.raises(TaskError, match=r"data\.csv row \d+ \(line \d+\): label 'bright' is not a known class"):
        load_splits(load_task(str(unknown)))
    empty = write_task(tmp_path / "e.yaml", **{**base, "dataset": {**base["dataset"], "splits": {"test": "dev"}}})
    with pytest.raises(TaskError, match=r"e\.yaml: the test split of .*data\.csv.* is empty"):
        load_splits(load_task(str(empty)))
    nosplit = write_task(tmp_path / "p.yaml", **{**base, "kind": "linear_probe", "dataset": {"path": "data.csv"}})
    with pytest.raises(TaskError, match="needs train, val and test splits.*split_fractions"):
        load_splits(load_task(str(nosplit)))
    write_csv(tmp_path / "none.csv", ["image", "label"], [])
    none = write_task(tmp_path / "n.yaml", **{**base, "dataset": {"path": "none.csv"}})
    with pytest.raises(TaskError, match=r"none\.csv: the dataset is empty \(a header and no rows\).*n\.yaml"):
        load_splits(load_task(str(none)))
    (tmp_path / "nofiles" / "dark").mkdir(parents=True)
    nofiles = write_task(tmp_path / "nf.yaml", **{**base, "dataset": {"path": "nofiles"}})
    with pytest.raises(TaskError, match=r"nofiles: the dataset is empty \(no .*images in class folders"):
        load_splits(load_task(str(nofiles)))
    write_csv(tmp_path / "gone.csv", ["image", "label"], [["img/0.png", 0], ["img/missing.png", 1]])
    gone = write_task(tmp_path / "g.yaml", **{**base, "dataset": {"path": "gone.csv"}})
    with pytest.raises(TaskError, match=r"gone\.csv row 2 \(line 3\): image .*missing\.png not found"):
        load_splits(load_task(str(gone)))


def test_csv_splits_labels_and_max_samples(tmp_path, bright_csv):
    f = write_task(
        tmp_path / "t.yaml",
        name="t",
        kind="linear_probe",
        classes=["dark", "bright"],
        dataset={"path": "data.csv", "split_column": "split"},
    )
    s = load_splits(load_task(str(f)))
    assert {k: len(v) for k, v in s.items()} == {"train": 8, "val": 8, "test": 8}
    assert s["train"].labels.tolist() == [0, 1] * 4  # rows 0, 3, 6, ...: alternate dark/bright
    assert s["test"].image(0).mode == "RGB"
    frac = write_task(
        tmp_path / "f.yaml",
        name="f",
        kind="linear_probe",
        classes=["dark", "bright"],
        dataset={"path": "data.csv", "split_fractions": [0.5, 0.25, 0.25], "max_samples": 5},
    )
    s = load_splits(load_task(str(frac)))
    assert [len(s[r]) for r in ("train", "val", "test")] == [5, 5, 5]
    assert load_task(str(frac), max_samples=100).dataset.max_samples == 5  # a cap never raises the file's
    frac = write_task(
        tmp_path / "f.yaml",
        name="f",
        kind="linear_probe",
        classes=["dark", "bright"],
        dataset={"path": "data.csv", "split_fractions": [0.5, 0.25, 0.25]},
    )
    full = load_splits(load_task(str(frac), max_samples=100))
    assert [len(full[r]) for r in ("train", "val", "test")] == [12, 6, 6]
    seen = [set(map(str, full[r].images)) for r in ("train", "val", "test")]
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])


def test_multilabel_csv_and_multihot_columns(tmp_path):
    rows = write_images(tmp_path, 4)
    write_csv(
        tmp_path / "ml.csv",
        ["image", "findings", "effusion", "nodule"],
        [
            [rows[0][0], "effusion|nodule", 1, 1],
            [rows[1][0], "nodule", 0, 1],
            [rows[2][0], "", 0, 0],
            [rows[3][0], "effusion", 1, 0],
        ],
    )
    base = {"name": "ml", "kind": "zeroshot", "multilabel": True, "classes": ["effusion", "nodule"]}
    a = write_task(tmp_path / "a.yaml", **base, dataset={"path": "ml.csv", "label_column": "findings"})
    b = write_task(tmp_path / "b.yaml", **base, dataset={"path": "ml.csv", "label_columns": ["effusion", "nodule"]})
    want = [[1, 1], [0, 1], [0, 0], [1, 0]]
    assert load_splits(load_task(str(a)))["test"].labels.tolist() == want
    assert load_splits(load_task(str(b)))["test"].labels.tolist() == want


def test_npz_and_folder_readers(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        f"{s}_images": rng.integers(0, 255, (n, 28, 28), dtype=np.uint8)
        for s, n in (("train", 6), ("val", 4), ("test", 5))
    }
    arrays.update(
        {f"{s}_labels": rng.integers(0, 3, (len(arrays[f"{s}_images"]), 1)) for s in ("train", "val", "test")}
    )
    np.savez(tmp_path / "toy.npz", **arrays)
    f = write_task(
        tmp_path / "n.yaml", name="n", kind="linear_probe", classes=["a", "b", "c"], dataset={"path": "toy.npz"}
    )
    s = load_splits(load_task(str(f)))
    assert s["test"].labels.tolist() == arrays["test_labels"][:, 0].tolist()
    img = s["train"].image(2)
    assert img.mode == "RGB" and img.size == (28, 28)
    assert np.array_equal(np.asarray(img)[..., 0], arrays["train_images"][2])
    two = write_task(tmp_path / "two.yaml", name="n", kind="zeroshot", classes=["a", "b"], dataset={"path": "toy.npz"})
    with pytest.raises(TaskError, match=r"toy\.npz: test_labels\[\d+\] = 2 is not a class index 0\.\.1"):
        load_splits(load_task(str(two)))
    badsplit = write_task(
        tmp_path / "bs.yaml",
        name="n",
        kind="zeroshot",
        classes=["a", "b", "c"],
        dataset={"path": "toy.npz", "splits": {"test": "dev"}},
    )
    with pytest.raises(TaskError, match=r"key 'dev_images' not found \(keys: test_images"):
        load_splits(load_task(str(badsplit)))

    for cls, n in (("cat", 3), ("dog", 2)):
        (tmp_path / "folder" / cls).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (8, 8)).save(tmp_path / "folder" / cls / f"{i}.png")
    f = write_task(tmp_path / "d.yaml", name="d", kind="zeroshot", classes=["cat", "dog"], dataset={"path": "folder"})
    assert load_splits(load_task(str(f)))["test"].labels.tolist() == [0, 0, 0, 1, 1]
    (tmp_path / "folder" / "cow").mkdir()
    with pytest.raises(TaskError, match="folder 'cow' is not a known class"):
        load_splits(load_task(str(f)))


# -- task kinds with known answers -----------------------------------------------------------------------
def test_zeroshot_and_retrieval_of_a_perfect_model(tmp_path, bright_csv):
    zs = write_task(
        tmp_path / "z.yaml",
        name="z",
        kind="zeroshot",
        classes=["dark", "bright"],
        templates=["a {} image", "a {} photo"],
        dataset={"path": "data.csv"},
    )
    task = load_task(str(zs))
    ctx = EvalContext(bootstrap=20)
    res = evaluate_zeroshot(task, BrightnessCLIP(), "toy", load_splits(task), ctx)
    assert {k: v.point for k, v in res.items()} == {
        "accuracy": 1.0,
        "balanced_accuracy": 1.0,
        "macro_f1": 1.0,
        "macro_auroc": 1.0,
    }
    flipped = write_task(
        tmp_path / "f.yaml",
        name="f",
        kind="zeroshot",
        classes=["bright", "dark"],
        label_values=["dark", "bright"],
        dataset={"path": "data.csv"},
    )
    task = load_task(str(flipped))  # prompts swapped against the labels: everything wrong
    res = evaluate_zeroshot(task, BrightnessCLIP(), "toy", load_splits(task), ctx)
    assert res["accuracy"].point == 0.0 and res["macro_auroc"].point == 0.0
    ml = write_task(
        tmp_path / "ml.yaml",
        name="ml",
        kind="zeroshot",
        multilabel=True,
        classes=["dark", "bright"],
        dataset={"path": "data.csv"},
    )
    task = load_task(str(ml))
    res = evaluate_zeroshot(task, BrightnessCLIP(), "toy", load_splits(task), ctx)
    assert set(res) == {"mean_auroc", "auroc/dark", "auroc/bright"} and res["mean_auroc"].point == 1.0
    rt = write_task(tmp_path / "r.yaml", name="r", kind="retrieval", dataset={"path": "data.csv"})
    task = load_task(str(rt))
    res = evaluate_retrieval(task, BrightnessCLIP(), "toy", load_splits(task), ctx)
    # 24 images share 2 captions: each caption finds one of its 12 images first, each image its caption
    assert res["text_to_image_R@1"].point == 1.0 and res["text_to_image_R@1"].n == 2
    assert res["image_to_text_R@1"].point == 1.0 and res["image_to_text_R@1"].n == 24


def test_constant_model_scores_chance(tmp_path, bright_csv):
    ctx = EvalContext(bootstrap=0)
    zs = load_task(
        str(
            write_task(
                tmp_path / "z.yaml", name="z", kind="zeroshot", classes=["dark", "bright"], dataset={"path": "data.csv"}
            )
        )
    )
    res = evaluate_zeroshot(zs, ConstantCLIP(), "const", load_splits(zs), ctx)
    assert res["balanced_accuracy"].point == 0.5 and res["macro_auroc"].point == 0.5
    assert res["accuracy"].point == 0.5  # always the first class; the classes are balanced (12 + 12)
    rt = load_task(str(write_task(tmp_path / "r.yaml", name="r", kind="retrieval", dataset={"path": "data.csv"})))
    res = evaluate_retrieval(rt, ConstantCLIP(), "const", load_splits(rt), ctx)
    assert res["image_to_text_R@1"].point == pytest.approx(0.5)  # 2 distinct captions: 1 right of 2
    assert res["text_to_image_R@1"].point == pytest.approx(0.5)  # 12 right images of 24
    lp = load_task(
        str(
            write_task(
                tmp_path / "p.yaml",
                name="p",
                kind="linear_probe",
                classes=["dark", "bright"],
                dataset={"path": "data.csv", "split_column": "split"},
                linear_probe={"shots": [2], "l2_grid": [1e-2]},
            )
        )
    )
    res = evaluate_linear_probe(lp, ConstantCLIP(), "const", load_splits(lp), ctx)
    assert res["full/macro_auroc"].point == 0.5 and res["2-shot/balanced_accuracy"].point == 0.5


def test_logistic_regression_on_separable_features():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 16, generator=g) * 3
    y = torch.arange(90) % 3
    x = centres[y] + torch.randn(90, 16, generator=g) * 0.5
    model = fit_logistic(x[:60], y[:60], 3, l2=1e-4)
    assert (model.scores(x[60:]).argmax(1) == y[60:].numpy()).mean() == 1.0
    # the grid is searched on val: at equal accuracy the lower val log-loss wins over a crushing penalty
    _, l2 = select_and_fit(x[:30], y[:30].numpy(), x[30:60], y[30:60].numpy(), 3, (1e3, 1e-3))
    assert l2 == 1e-3


def test_multilabel_logistic_regression():
    g = torch.Generator().manual_seed(0)
    y = (torch.rand(80, 3, generator=g) < 0.4).float()
    x = torch.cat([y * 4 - 2 + torch.randn(80, 3, generator=g) * 0.3, torch.randn(80, 5, generator=g)], 1)
    model = fit_logistic(x[:50], y[:50], 3, l2=1e-3, multilabel=True)
    s = model.scores(x[50:], multilabel=True)
    assert ((s > 0.5) == (y[50:].numpy() > 0)).all()


def test_few_shot_takes_k_per_class():
    labels = np.array([0] * 10 + [1] * 10 + [2] * 3)
    idx = few_shot_indices(labels, 4, seed=0)
    assert np.bincount(labels[idx]).tolist() == [4, 4, 3]  # a class with fewer rows gives all it has
    assert few_shot_indices(labels, 4, seed=0).tolist() == idx.tolist()
    assert few_shot_indices(labels, 4, seed=1).tolist() != idx.tolist()


def test_linear_probe_task_on_separable_images(tmp_path, bright_csv):
    f = write_task(
        tmp_path / "p.yaml",
        name="p",
        kind="linear_probe",
        classes=["dark", "bright"],
        dataset={"path": "data.csv", "split_column": "split"},
        linear_probe={"shots": [1, 2], "l2_grid": [1e-3, 1e-1]},
    )
    task = load_task(str(f))
    res = evaluate_linear_probe(task, BrightnessCLIP(), "toy", load_splits(task), EvalContext(bootstrap=20))
    assert set(res) == {
        f"{s}/{m}"
        for s in ("1-shot", "2-shot", "full")
        for m in ("accuracy", "balanced_accuracy", "macro_f1", "macro_auroc")
    }
    assert all(res[f"{s}/accuracy"].point == 1.0 for s in ("1-shot", "2-shot", "full"))


def test_inverse_frequency_pos_weight():
    t = np.array([[1, 0, 1], [0, 0, 1], [0, 0, 1], [0, 1, 1]])
    assert inverse_frequency_pos_weight(t).tolist() == [3.0, 3.0, 1.0]  # 3 neg/1 pos; all-positive class -> 1


def test_finetune_learns_and_leaves_teacher_untouched(tmp_path, tiny_teachers, bright_csv):
    f = write_task(
        tmp_path / "ft.yaml",
        name="ft",
        kind="finetune",
        classes=["dark", "bright"],
        dataset={"path": "data.csv", "split_column": "split"},
        finetune={"epochs": 6, "batch_size": 8, "lr_encoder": 1e-4, "lr_head": 5e-2, "flip": True},
    )
    task = load_task(str(f))
    splits = load_splits(task)
    teacher = load_teacher(tiny_teachers["oc"])
    before = copy.deepcopy(teacher.state_dict())
    model, history = finetune(teacher, splits, 2, False, task.finetune, seed=0)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert max(h["val_score"] for h in history) == 1.0
    scores = predict(model, splits["test"], teacher.image_transform, False, torch.device("cpu"), 8)
    assert (scores.argmax(1) == splits["test"].labels).mean() == 1.0
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())  # fine-tuned a copy
    assert not any(p.requires_grad for p in teacher.parameters())
    assert any(
        not torch.equal(a, b)
        for a, b in zip(model.tower.state_dict().values(), teacher.trunk.visual.state_dict().values())
    )


def test_finetune_learning_rates_are_per_group(tmp_path, tiny_teachers, bright_csv):
    """lr_encoder = 0 leaves the copied tower exactly as the teacher's while the head (lr_head) learns."""
    f = write_task(
        tmp_path / "ft.yaml",
        name="ft",
        kind="finetune",
        classes=["dark", "bright"],
        dataset={"path": "data.csv", "split_column": "split"},
        finetune={"epochs": 2, "batch_size": 8, "lr_encoder": 0.0, "lr_head": 5e-2},
    )
    task = load_task(str(f))
    teacher = load_teacher(tiny_teachers["oc"])
    model, _ = finetune(teacher, load_splits(task), 2, False, task.finetune, seed=0)
    tower, ref = model.tower.state_dict(), teacher.trunk.visual.state_dict()
    assert tower.keys() == ref.keys() and all(torch.equal(tower[k], ref[k]) for k in ref)
    torch.manual_seed(0)
    initial = nn.Linear(teacher.embed_dim, 2)  # finetune seeds 0, copies the tower, then makes the head: same init
    assert not torch.equal(model.head.weight, initial.weight)


def test_finetune_multilabel_uses_inverse_frequency_bce(tmp_path, tiny_teachers, monkeypatch):
    rows = write_images(tmp_path, 24)
    # class "bright" on odd rows, class "rare" on every 12th row: pos_weight = negatives / positives on train
    write_csv(
        tmp_path / "ml.csv",
        ["image", "findings", "split"],
        [
            [
                p,
                "|".join(c for c, on in (("bright", y == 1), ("rare", i % 12 == 0)) if on),
                ["train", "val", "test"][i % 3],
            ]
            for i, (p, y) in enumerate(rows)
        ],
    )
    f = write_task(
        tmp_path / "ml.yaml",
        name="ml",
        kind="finetune",
        multilabel=True,
        classes=["bright", "rare"],
        dataset={"path": "ml.csv", "label_column": "findings", "split_column": "split"},
        finetune={"epochs": 1, "batch_size": 8, "lr_head": 1e-2},
    )
    task = load_task(str(f))
    splits = load_splits(task)
    seen = []
    real_bce = torch.nn.functional.binary_cross_entropy_with_logits

    def spy(logits, target, *args, pos_weight=None, **kw):
        seen.append(pos_weight)
        return real_bce(logits, target, *args, pos_weight=pos_weight, **kw)

    monkeypatch.setattr(torch.nn.functional, "binary_cross_entropy_with_logits", spy)
    train = splits["train"].labels
    assert train.sum(0).tolist() == [4, 2]  # train rows 0, 3, ..., 21: 3, 9, 15, 21 bright; 0, 12 rare
    model, history = finetune(load_teacher(tiny_teachers["oc"]), splits, 2, True, task.finetune, seed=0)
    assert len(seen) == 1 and seen[0].tolist() == [4 / 4, 6 / 2]  # one step of 8 rows: (8-4)/4, (8-2)/2
    assert math.isfinite(history[0]["val_score"])
