"""Corpus readers: CSV/TSV/JSONL tables and WebDataset shards give the same samples; malformed input is named."""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cache.sources.corpus import BadSampleError, CorpusError, fingerprint_of, open_corpus
from cache.sources.synthetic import make_synthetic_corpus
from cache.sources.webdataset import expand_braces


def _rows(csv_path: Path) -> list[dict]:
    with open(csv_path, newline="") as f:
        return list(csv.DictReader(f))


def _write_shards(corpus_csv: Path, out_dir: Path, per_shard: int = 10) -> list[Path]:
    """The same samples as `corpus_csv`, as WebDataset shards 00000.tar, 00001.tar, ..."""
    rows = _rows(corpus_csv)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(0, len(rows), per_shard):
        path = out_dir / f"{s // per_shard:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for r in rows[s : s + per_shard]:
                for ext, data in (
                    ("png", (corpus_csv.parent / r["image"]).read_bytes()),
                    ("txt", r["caption"].encode()),
                ):
                    info = tarfile.TarInfo(f"{r['key']}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl"])
def test_table_formats_read_the_same_samples(tmp_path, fmt):
    path = make_synthetic_corpus(tmp_path, n=6, image_size=16, seed=3, fmt=fmt)
    ref = make_synthetic_corpus(tmp_path / "ref", n=6, image_size=16, seed=3, fmt="csv")
    c = open_corpus(path)
    rows = _rows(ref)
    assert len(c) == 6
    assert c.keys == [r["key"] for r in rows]
    assert c.captions == [r["caption"] for r in rows]
    img = c.load_image(2)
    assert img.mode == "RGB" and img.size == (16, 16)
    expected = np.asarray(Image.open(ref.parent / rows[2]["image"]).convert("RGB"))
    np.testing.assert_array_equal(np.asarray(img), expected)
    assert c.fingerprint() == fingerprint_of(c.keys, c.captions)
    assert "row 3" in c.describe(2) and rows[2]["key"] in c.describe(2)


def test_default_key_is_image_path_and_absolute_paths_work(tmp_path):
    src = make_synthetic_corpus(tmp_path / "src", n=3, image_size=16)
    rows = _rows(src)
    path = tmp_path / "other" / "abs.jsonl"
    path.parent.mkdir()
    path.write_text(
        "".join(json.dumps({"image": str(src.parent / r["image"]), "caption": r["caption"]}) + "\n" for r in rows)
    )
    c = open_corpus(path)
    assert c.keys == [str(src.parent / r["image"]) for r in rows]
    assert c.load_image(1).size == (16, 16)


def test_fingerprint_depends_on_keys_and_captions(tmp_path):
    a = make_synthetic_corpus(tmp_path / "a", n=4, image_size=16, seed=0)
    rows = _rows(a)
    rows[1]["caption"] += "!"
    b = tmp_path / "a" / "changed.csv"
    with open(b, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "caption", "key"])
        w.writeheader()
        w.writerows(rows)
    assert open_corpus(a).fingerprint() != open_corpus(b).fingerprint()
    assert open_corpus(a).fingerprint() == open_corpus(a).fingerprint()
    assert fingerprint_of(["ab", "c"], ["x", "y"]) != fingerprint_of(["a", "bc"], ["x", "y"])


def test_table_errors_name_file_and_row(tmp_path):
    (tmp_path / "nocap.csv").write_text("image,text\na.png,hello\n")
    with pytest.raises(CorpusError, match=r"nocap\.csv.*missing column\(s\) caption"):
        open_corpus(tmp_path / "nocap.csv")
    (tmp_path / "dup.csv").write_text("image,caption,key\na.png,x,k1\nb.png,y,k2\nc.png,z,k1\n")
    with pytest.raises(CorpusError, match=r"dup\.csv row 3 \(line 4\): duplicate key 'k1', first used on row 1"):
        open_corpus(tmp_path / "dup.csv")
    (tmp_path / "bad.jsonl").write_text('{"image": "a.png", "caption": "x"}\n{"image": "b.png"}\n')
    with pytest.raises(CorpusError, match=r"bad\.jsonl line 2: missing column\(s\) caption"):
        open_corpus(tmp_path / "bad.jsonl")
    (tmp_path / "broken.jsonl").write_text('{"image": "a.png", "caption": "x"}\n{not json\n')
    with pytest.raises(CorpusError, match=r"broken\.jsonl line 2: invalid JSON"):
        open_corpus(tmp_path / "broken.jsonl")
    (tmp_path / "noimg.tsv").write_text("image\tcaption\n\tx\n")
    with pytest.raises(CorpusError, match=r"noimg\.tsv row 1 \(line 2\): empty 'image'"):
        open_corpus(tmp_path / "noimg.tsv")
    with pytest.raises(CorpusError, match="not found"):
        open_corpus(tmp_path / "absent.csv")
    (tmp_path / "x.parquet").write_text("")
    with pytest.raises(CorpusError, match="unknown format"):
        open_corpus(tmp_path / "x.parquet")


def test_bad_images_raise_bad_sample_error(tmp_path):
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    (tmp_path / "c.csv").write_text("image,caption,key\nmissing.png,x,m\ncorrupt.png,y,c\n")
    c = open_corpus(tmp_path / "c.csv")
    with pytest.raises(BadSampleError, match="missing image file") as e:
        c.load_image(0)
    assert e.value.key == "m" and "c.csv row 1" in str(e.value)
    with pytest.raises(BadSampleError, match="unreadable image") as e:
        c.load_image(1)
    assert e.value.key == "c"


def test_webdataset_folder_and_brace_pattern_match_the_table(tmp_path):
    src = make_synthetic_corpus(tmp_path / "src", n=25, image_size=16, seed=5)
    _write_shards(src, tmp_path / "shards", per_shard=10)
    table = open_corpus(src)
    for path in (tmp_path / "shards", f"{tmp_path}/shards/{{00000..00002}}.tar"):
        wds = open_corpus(path)
        assert wds.keys == table.keys and wds.captions == table.captions
        assert wds.fingerprint() == table.fingerprint()
        for i in (0, 12, 24):
            np.testing.assert_array_equal(np.asarray(wds.load_image(i)), np.asarray(table.load_image(i)))
    sub = open_corpus(f"{tmp_path}/shards/{{00001..00002}}.tar")
    assert sub.keys == table.keys[10:] and "00002.tar" in sub.describe(len(sub) - 1)


def test_brace_expansion():
    assert expand_braces("s/{00008..00011}.tar") == ["s/00008.tar", "s/00009.tar", "s/00010.tar", "s/00011.tar"]
    assert expand_braces("{a,b}-{1..2}.tar") == ["a-1.tar", "a-2.tar", "b-1.tar", "b-2.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_webdataset_errors_and_bad_samples(tmp_path):
    d = tmp_path / "wds"
    d.mkdir()

    def add(tar, name, data: bytes):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, format="JPEG")
    with tarfile.open(d / "00000.tar", "w") as tar:
        add(tar, "dir/a.jpg", buf.getvalue())
        add(tar, "dir/a.txt", b"caption a")
        add(tar, "dir/b.txt", b"only a caption")
        add(tar, "dir/c.webp", b"garbage")
        add(tar, "dir/c.txt", b"caption c")
    c = open_corpus(d)
    assert c.keys == ["dir/a", "dir/b", "dir/c"]
    assert c.load_image(0).size == (8, 8)
    with pytest.raises(BadSampleError, match="no image member"):
        c.load_image(1)
    with pytest.raises(BadSampleError, match="unreadable image"):
        c.load_image(2)
    with tarfile.open(d / "00001.tar", "w") as tar:
        add(tar, "dir/a.txt", b"again")
    with pytest.raises(CorpusError, match=r"duplicate __key__ 'dir/a' in .*00001\.tar"):
        open_corpus(d)
    with pytest.raises(CorpusError, match=r"1 of 3 shard\(s\) not found"):
        open_corpus(f"{d}/{{00000..00002}}.tar")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="no .tar shards"):
        open_corpus(tmp_path / "empty")
    (tmp_path / "junk.tar").write_bytes(b"this is not a tar" * 100)
    with pytest.raises(CorpusError, match="not a readable tar"):
        open_corpus(tmp_path / "junk.tar")
