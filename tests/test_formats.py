"""The format registry (`cache.sources.formats`): one reader per format for training corpora, eval datasets and
`distill corpus` sources; image suffixes written once; a format added from outside the project by registering it."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from cache.corpus_build import CorpusSource, build_corpus
from cache.sources.base import Corpus, CorpusError
from cache.sources.corpus import DATA_FORMATS, Format, LabelledData, open_corpus, read_labelled
from cache.sources.formats import find_format, format_named
from cache.sources.image_decode import decode_image
from distill.eval import TaskError, load_splits, load_task

ROOT = Path(__file__).resolve().parents[1]


def _images(folder: Path, n: int) -> list[str]:
    (folder / "img").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(folder / "img" / f"{i}.png")
    return [f"img/{i}.png" for i in range(n)]


def _task(path: Path, **task) -> str:
    path.write_text(yaml.safe_dump(task))
    return str(path)


# -- one list of image suffixes ---------------------------------------------------------------------------
def test_image_suffixes_are_written_once():
    """Class folders (eval and `distill corpus`) and WebDataset members use the one list in image_decode."""
    assigned, literal = [], []
    for room in ("cache", "distill", "student", "teachers"):
        for p in sorted((ROOT / room).rglob("*.py")):
            text, name = p.read_text(encoding="utf-8"), p.relative_to(ROOT).as_posix()
            assigned += [name for _ in re.finditer(r"^\s*IMAGE_(?:SUFFIXES|EXTS)\s*=", text, re.M)]
            if re.search(r"""\(\s*["']\.?jpe?g["']\s*,\s*["']\.?(?:png|jpe?g)["']""", text):
                literal.append(name)
    assert literal == ["cache/sources/image_decode.py"], literal
    assert sorted(assigned) == ["cache/sources/base.py", "cache/sources/image_decode.py"], assigned  # EXTS derived


# -- eval CSVs read by the corpus reader ------------------------------------------------------------------
def test_an_eval_csv_with_a_bom_reads(tmp_path):
    rows = _images(tmp_path, 2)
    (tmp_path / "d.csv").write_text(
        "image,label\n" + "".join(f"{r},{i}\n" for i, r in enumerate(rows)), encoding="utf-8-sig"
    )  # Excel's "CSV UTF-8": the header starts with a BOM
    task = load_task(
        _task(tmp_path / "t.yaml", name="t", kind="zeroshot", classes=["a", "b"], dataset={"path": "d.csv"})
    )
    test = load_splits(task)["test"]
    assert test.labels.tolist() == [0, 1] and test.image(1).size == (8, 8)


def test_an_eval_csv_in_latin1_gives_the_corpus_message(tmp_path):
    rows = _images(tmp_path, 2)
    (tmp_path / "d.csv").write_bytes(
        ("image,caption,label\n" + "".join(f"{r},caf\u00e9 {i},{i}\n" for i, r in enumerate(rows))).encode("latin-1")
    )
    with pytest.raises(CorpusError) as corpus_error:
        open_corpus(tmp_path / "d.csv")
    task = load_task(
        _task(tmp_path / "t.yaml", name="t", kind="zeroshot", classes=["a", "b"], dataset={"path": "d.csv"})
    )
    with pytest.raises(TaskError) as eval_error:
        load_splits(task)
    message = str(corpus_error.value)
    assert re.fullmatch(r".*d\.csv line 2: not UTF-8 \(byte 0xe9 at column 14\); save the file as UTF-8", message)
    assert str(eval_error.value) == message and "\n" not in message
    with pytest.raises(CorpusError, match=re.escape(message)):  # and `distill corpus` sources say the same
        build_corpus([CorpusSource(str(tmp_path / "d.csv"), ("{caption}",))], tmp_path / "out")


def test_formats_are_found_by_what_the_caller_needs(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    assert find_format(str(folder), "labelled").name == "folder"  # eval, distill corpus: class folders
    assert find_format(str(folder), "corpus").name == "webdataset"  # training: a folder of shards
    assert find_format("s3://b/{0..3}.tar", "corpus").name == "stream"
    assert find_format(str(tmp_path / "x.TSV"), "labelled").name == "tsv"
    with pytest.raises(CorpusError, match=r"x\.jsonl: unknown format; expected a \.csv file, .*\.npz or a \.tsv"):
        (tmp_path / "x.jsonl").write_text("{}\n")
        read_labelled(tmp_path / "x.jsonl")
    with pytest.raises(CorpusError, match=r"unknown data format 'nzp'; did you mean npz"):
        format_named("nzp", "labelled")
    with pytest.raises(CorpusError, match=r"format 'npz' cannot be read as image-caption pairs"):
        open_corpus(tmp_path / "x.npz", format="npz")


def test_npz_and_class_folders_read_alike_for_both_callers(tmp_path):
    np.savez(
        tmp_path / "m.npz",
        train_images=np.zeros((3, 4, 4, 1), np.uint8),
        train_labels=np.array([[0], [1], [1]]),
        test_images=np.zeros((2, 4, 4), np.uint8),
        test_labels=np.array([1, 0]),
    )
    data = read_labelled(tmp_path / "m.npz")
    assert data.keys == ["train/0", "train/1", "train/2", "test/0", "test/1"] and data.images.shape == (5, 4, 4)
    assert data.labels[:, 0].tolist() == [0, 1, 1, 1, 0] and data.rows[3] == {"split": "test"}
    with pytest.raises(CorpusError, match=r"no split 'val': key 'val_images' not found .*splits here: train, test"):
        read_labelled(tmp_path / "m.npz", split="val")
    for cls in ("a", "b"):
        (tmp_path / "f" / cls).mkdir(parents=True)
    for name in ("1.PNG", "2.tiff", "3.txt"):
        Image.new("RGB", (4, 4)).save(tmp_path / "f" / "a" / name, format="PNG")
    data = read_labelled(tmp_path / "f")
    assert data.keys == ["a/1.PNG", "a/2.tiff"] and data.labels == ["a", "a"] and data.classes == ["a", "b"]


# -- a format added from outside the project --------------------------------------------------------------
class PairsCorpus(Corpus):
    """`pairs.txt`: one `IMAGE<TAB>CAPTION` per line, images relative to the file (the worked example of
    docs/architecture.md)."""

    def __init__(self, path: str):
        self.source, self._fingerprint = path, None
        self.root = os.path.dirname(os.path.abspath(path))
        self.images, self.keys, self.captions = [], [], []
        for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
            image, tab, caption = line.partition("\t")
            if not tab:
                raise CorpusError(f"{path} line {n}: expected IMAGE<TAB>CAPTION")
            self.images.append(os.path.join(self.root, image))
            self.keys.append(image)
            self.captions.append(caption)

    def describe(self, i: int) -> str:
        return f"{self.source} line {i + 1}, key {self.keys[i]!r}"

    def load_image(self, i: int) -> Image.Image:
        return decode_image(None, self.images[i], self.keys[i], self.describe(i), self.limits)


def _pairs_labelled(path: str, split: str | None) -> LabelledData:
    c = PairsCorpus(path)
    return LabelledData(
        path,
        ["caption"],
        [{"caption": t} for t in c.captions],
        [c.describe(i) for i in range(len(c))],
        c.keys,
        c.images,
    )


@pytest.fixture()
def pairs_format(monkeypatch):
    """`pairs` registered as a plug-in would be, and unregistered afterwards."""
    monkeypatch.setattr(DATA_FORMATS, "_items", dict(DATA_FORMATS._items))
    DATA_FORMATS.add(
        "pairs",
        Format(
            "pairs",
            "a pairs.txt file",
            lambda p: p.lower().endswith("pairs.txt"),
            corpus=lambda path, stream: PairsCorpus(path),
            labelled=_pairs_labelled,
        ),
    )


def test_a_format_registered_by_name_reads_in_training_eval_and_distill_corpus(tmp_path, pairs_format):
    rows = _images(tmp_path, 3)
    (tmp_path / "pairs.txt").write_text("".join(f"{r}\tred level {i}\n" for i, r in enumerate(rows)))
    corpus = open_corpus(tmp_path / "pairs.txt")  # training corpora, distill cache
    assert isinstance(corpus, PairsCorpus) and corpus.captions == ["red level 0", "red level 1", "red level 2"]
    assert corpus.load_image(2).getpixel((0, 0)) == (80, 0, 0)

    task = load_task(_task(tmp_path / "r.yaml", name="r", kind="retrieval", dataset={"path": "pairs.txt"}))
    test = load_splits(task)["test"]  # eval datasets
    assert test.captions == tuple(corpus.captions) and test.image(1).getpixel((0, 0)) == (40, 0, 0)

    result = build_corpus(
        [CorpusSource(str(tmp_path / "pairs.txt"), ("a photo: {caption}",), name="p")], tmp_path / "out", shuffle=False
    )  # distill corpus
    built = open_corpus(result.csv)
    assert built.captions == [f"a photo: red level {i}" for i in range(3)] and built.keys[0] == "p/img/0.png"

    (tmp_path / "data.unknown").write_text("")
    with pytest.raises(CorpusError, match=r"unknown format; expected .*a pairs\.txt file"):
        open_corpus(tmp_path / "data.unknown")
