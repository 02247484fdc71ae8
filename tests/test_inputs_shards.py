"""Issue 18 item 3 for WebDataset shards: a 600 MB member and a 50 MB caption member made `distill cache` grow to
10.4 GB and stall. Now the oversized member is a recorded bad sample, never read; a caption is cut to
MAX_CAPTION_BYTES before anything tokenises it; listing a shard (local, `file://` or `pipe:`) never holds a
member's bytes. The shards are generated sparse (the 600 MB member costs no disk), so the tests stay fast."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap
import tracemalloc
from pathlib import Path

import h5py
import pytest
from hostile_images import png_bytes

from cache.sources.base import MAX_CAPTION_BYTES
from cache.sources.corpus import BadSampleError, open_corpus
from cache.sources.stream import StreamCorpus, StreamOptions

ROOT = Path(__file__).resolve().parents[1]
HUGE = 600 * 2**20
LONG_CAPTION = "word " * (50 * 2**20 // 5)  # 50 MB
CUT = LONG_CAPTION.encode()[:MAX_CAPTION_BYTES].decode().strip()


def _member(f, name: str, data: bytes | None = None, size: int = HUGE) -> None:
    """A tar member holding `data`, or `size` bytes of a hole the file system does not store (zeros)."""
    info = tarfile.TarInfo(name)
    size = info.size = size if data is None else len(data)
    f.write(info.tobuf(format=tarfile.USTAR_FORMAT))
    padded = -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    if data is None:
        f.seek(padded, io.SEEK_CUR)
    else:
        f.write(data + b"\0" * (padded - size))


def hostile_shard(folder: Path) -> Path:
    """a: fine; b: a 600 MB `png` member; c: a 50 MB caption; d: fine, after a 600 MB member of another kind."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "00000.tar"
    with open(path, "wb") as f:
        _member(f, "a.png", png_bytes((10, 20, 30)))
        _member(f, "a.txt", b"caption a ")
        _member(f, "b.png")
        _member(f, "b.txt", b"caption b")
        _member(f, "c.png", png_bytes((40, 50, 60)))
        _member(f, "c.txt", LONG_CAPTION.encode())
        _member(f, "d.json")
        _member(f, "d.png", png_bytes((70, 80, 90)))
        _member(f, "d.txt", b"caption d")
        f.write(b"\0" * (2 * tarfile.BLOCKSIZE))
    assert path.stat().st_size > 2 * HUGE
    return path


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> Path:
    return hostile_shard(tmp_path_factory.mktemp("shards") / "shards")


def traced(fn):
    """fn() and the peak of Python's allocations while it ran (bytes)."""
    tracemalloc.start()
    try:
        out = fn()
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def check_corpus(corpus) -> None:
    assert corpus.keys == ["a", "b", "c", "d"]
    assert corpus.captions == ["caption a", "caption b", CUT, "caption d"]
    assert len(corpus.captions[2].encode()) <= MAX_CAPTION_BYTES


def test_a_local_shard_is_indexed_without_reading_members(shard):
    corpus, peak = traced(lambda: open_corpus(shard.parent))
    check_corpus(corpus)
    assert peak < 4 * 2**20, peak  # a cut caption and the index; not the 50 MB caption, not the 600 MB member
    with pytest.raises(
        BadSampleError,
        match=r"image member is 600 MiB, larger than any image within the pixel "
        r"limit \(--max-pixels\); not read",
    ):
        traced(lambda: corpus.load_bytes(1))
    assert corpus.load_image(3).getpixel((0, 0)) == (70, 80, 90)


@pytest.mark.parametrize("how", ["file", "pipe"])
def test_a_streamed_listing_holds_no_member_bytes(shard, tmp_path, how):
    """`file://` listings seek over members; `pipe:` listings read through them in blocks, keeping none."""
    spec = f"file://{shard}" if how == "file" else f"pipe:cat {shard}"
    corpus, peak = traced(lambda: StreamCorpus(spec, StreamOptions(listing=str(tmp_path / "listings"))))
    check_corpus(corpus)
    assert peak < 4 * 2**20, peak
    listing = json.loads(next((tmp_path / "listings").iterdir()).read_text())
    assert listing["sizes"] == [
        len(png_bytes((10, 20, 30))),
        HUGE,
        len(png_bytes((40, 50, 60))),
        len(png_bytes((70, 80, 90))),
    ]
    with pytest.raises(BadSampleError, match=r"image member is 600 MiB"):
        corpus.load_bytes(1)
    if how == "file":  # seeks past the 600 MB `json` member (a pipe reads through it as its listing did above)
        data, peak = traced(lambda: corpus.load_bytes(3))
        assert data == png_bytes((70, 80, 90)) and peak < 4 * 2**20, peak
    corpus.close()


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the peak RSS from /proc (Linux)")
def test_distill_cache_records_the_member_as_bad_and_tokenises_the_cut_caption(shard, tmp_path, tiny_teachers):
    """The real command with a real open_clip tokenizer, in a fresh process: caching the hostile shard raises the
    peak RSS by less than 100 MiB over caching a plain shard of 4 small samples (the member alone is 600 MB; the
    attack grew to 10.4 GB), and the caption reaches the tokenizer cut."""
    plain = tmp_path / "plain" / "00000.tar"
    plain.parent.mkdir()
    with open(plain, "wb") as f:
        for k in "abcd":
            _member(f, f"{k}.png", png_bytes((10, 20, 30)))
            _member(f, f"{k}.txt", f"caption {k}".encode())
        f.write(b"\0" * (2 * tarfile.BLOCKSIZE))
    out = tmp_path / "f.h5"
    script = textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / "tests")!r}]
        from distill.cli import main

        def peak_mib():  # this process's own peak RSS (ru_maxrss would include the forking pytest's)
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) // 1024

        def cache(data, out):
            return main(["cache", "--data", data, "--teacher", "oc={tiny_teachers["oc"]}", "--out", out,
                         "--num-workers", "0", "--device", "cpu", "--batch-size", "2"])

        rc_plain = cache({str(plain.parent)!r}, {str(tmp_path / "plain.h5")!r})
        before = peak_mib()
        print(rc_plain, cache({str(shard.parent)!r}, {str(out)!r}), before, peak_mib())
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    rc_plain, rc, before, after = map(int, res.stdout.split()[-4:])
    assert rc_plain == 0 and rc == 0, res.stderr
    assert after - before < 100, (before, after)
    with h5py.File(out, "r") as f:
        assert f["keys"].asstr()[:].tolist() == ["a", "b", "c", "d"]
        assert f["bad/keys"].asstr()[:].tolist() == ["b"]
        assert "image member is 600 MiB" in f["bad/reasons"].asstr()[0]
        assert f["teachers/oc/done"][:].tolist() == [True, False, True, True]
