"""How much `distill cache` costs beyond the teachers' own forward passes, and how fast training can read the cache.

    python -m benchmarks.cache_overhead                 # both parts, defaults sized for a few minutes on 2 cores
    python -m benchmarks.cache_overhead --skip-reader   # part 1 only;  --rows 200000: a smaller part-2 file

Part 1 (issue 2): over the same JPEG images and batch size, the wall time of a real cache run (`build_cache`, the
code behind `distill cache`) with two small teachers (open_clip and Hugging Face CLIP), divided by the time of
the same teachers' bare forward passes (image + text) over images decoded, transformed and tokenised beforehand
(in the same process, with the same torch threads). The cache run decodes each image once for both teachers.
Printed for each --workers value, with what one decode, each teacher's transform and each forward cost per
image. "total" is the whole run (loading teachers, worker start-up, file folds included); "marginal" subtracts
a one-batch run from both sides, i.e. the cost per extra image, which is what dominates on a real corpus of
millions of images. Every variant runs once per repeat, in turn (A B A B ..., --repeats, bench_common.interleave);
ratios are taken within a repeat, reported as median [min, max] with the load average. Goal: marginal <= 1.10
with workers >= 1.

Part 2: the reader's throughput (`cache.FeatureReader.read`) for 256-row batches, all teachers together, on a
synthetic --rows x 3-teacher float16 file written in the cache's own layout (cache.store.writer creates the file and
each teacher's group), for each --chunk-rows: random rows (an epoch permutation, read directly: no block can
help), block-shuffled rows for each --block-rows B that is a multiple of the chunk
(`cache.store.reader.block_shuffle_order`, the trainer's EpochSampler order, read through
`FeatureReader(block_rows=B, cache_blocks=--buffer-blocks)`, the way training reads), and sequential rows (the
ceiling); warm (whole file read into the page cache first) and cold (dropped from it with posix_fadvise, no root
needed). "fetched/useful" is feature bytes the reader took from HDF5 per byte returned;
"read/useful" bytes HDF5 read through pread (/proc/self/io rchar); "disk/useful" those that came from the disk.
Goal: >= 20,000 rows/s (what 8 GPUs training ViT-B/16 consume).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.bench_common import (
    Output,
    Spread,
    drop_from_page_cache,
    head_corpus,
    interleave,
    io_counters,
    load_into_page_cache,
    make_jpeg_corpus,
    output_dir,
    parse_flags,
    quiet_libraries,
    synthetic_teacher_meta,
    table,
    timed,
    write_results,
)

# Imports of torch and of the project's modules (which load torch) sit in the functions that use them, so that
# --help and a flag error answer at once, without loading torch.

GOAL_OVERHEAD = 1.10
GOAL_ROWS_PER_S = 20_000


@dataclass(frozen=True)
class Flags(Output):
    # part 1: cache overhead
    images: int = 384  # synthetic JPEG images in the corpus
    image_px: int = 256  # their side: decoding and resizing cost something real
    batch_size: int = 64  # images per teacher forward pass (both sides)
    workers: tuple[int, ...] = (0, 1, 2)  # --num-workers values of the cache run
    repeats: int = 3  # interleaved repeats (A B A B ...): ratios per repeat, then median and range
    teacher_width: int = 256  # both small teachers: transformer width,
    teacher_layers: int = 6  # layers (vision and text),
    teacher_image_size: int = 96  # and input resolution (patch 8): a forward costs well over one decode
    corpus: str | None = None  # use this corpus (CSV/TSV/JSONL/shards) instead of the synthetic one
    # part 2: reader throughput
    rows: int = 1_000_000  # rows of the synthetic feature file (~7 GB at 1M rows, 3 teachers, fp16)
    dims: tuple[int, ...] = (512, 768, 512)  # one teacher per embedding size; each has image + text
    chunk_rows: tuple[int, ...] = (256, 1024)  # HDF5 chunk lengths (rows) to compare
    block_rows: tuple[int, ...] = (256, 1024, 4096)  # reader blocks / sampler blocks (those a multiple of the chunk)
    read_batch: int = 256  # rows per read, as a training batch
    buffer_rows: int = 16384  # shuffle buffer in rows (same memory for every block size): buffer_rows / B
    # blocks shuffled together = the reader's LRU blocks
    seconds: float = 2.0  # reading time per measurement (or until the rows run out)
    cold: bool = True  # also measure after dropping the file from the page cache
    reader_dir: str = "/tmp"  # where the big file is written (deleted at the end)
    # both
    workdir: str | None = None  # keep corpus/teachers/caches here (default: a temp dir, deleted)
    skip_overhead: bool = False
    skip_reader: bool = False


# == part 1 =================================================================================================
def make_teachers(root: Path, f: Flags) -> dict[str, str]:
    from distill.tiny_models import make_tiny_hf_clip, make_tiny_open_clip  # noqa: PLC0415 (lazy: torch after the flags)

    oc = make_tiny_open_clip(
        root / "oc", embed_dim=128, width=f.teacher_width, layers=f.teacher_layers, image_size=f.teacher_image_size
    )
    hf = make_tiny_hf_clip(
        root / "hf", projection_dim=96, hidden=f.teacher_width, layers=f.teacher_layers, image_size=f.teacher_image_size
    )
    return {"oc": f"local-dir:{oc}", "hf": f"hf-clip:{hf}"}


def _device() -> str:
    import torch  # noqa: PLC0415 (lazy: torch after the flags)

    return "cuda" if torch.cuda.is_available() else "cpu"


def _sync() -> None:
    import torch  # noqa: PLC0415 (lazy: torch after the flags)

    if torch.cuda.is_available():
        torch.cuda.synchronize()


@dataclass
class Prepared:
    """The denominator's inputs: every image decoded once, each teacher's inputs made and on its device."""

    teachers: dict  # name -> (teacher, image batches, token batches)
    images: int
    decode_s: float  # corpus.load_image over every image (one decode each)
    transform_s: dict[str, float]  # each teacher's own image transform over every decoded image


def prepared_inputs(corpus_path: str, teachers: dict[str, str], batch_size: int) -> Prepared:
    """Per teacher: its model, image batches (decoded + its own transform) and token batches, all ready."""
    import torch  # noqa: PLC0415 (lazy: torch after the flags)

    from cache.sources.corpus import open_corpus  # noqa: PLC0415 (lazy: torch after the flags)
    from teachers import load_teacher  # noqa: PLC0415 (lazy: torch after the flags)

    corpus = open_corpus(corpus_path)
    t0 = time.perf_counter()
    images = [corpus.load_image(i) for i in range(len(corpus))]
    decode_s = time.perf_counter() - t0
    out, transform_s = {}, {}
    for name, spec in teachers.items():
        t = load_teacher(spec, _device())
        t0 = time.perf_counter()
        x = torch.stack([t.image_transform(im) for im in images])
        transform_s[name] = time.perf_counter() - t0
        tok = [t.tokenize(corpus.captions[i : i + batch_size]) for i in range(0, len(corpus), batch_size)]
        out[name] = (t, [b.to(t.device) for b in x.split(batch_size)], [b.to(t.device) for b in tok])
    return Prepared(out, len(images), decode_s, transform_s)


def bare_forward_seconds(prepared: Prepared) -> dict[str, tuple[float, float]]:
    """Per teacher (image s, text s): only the forward passes, batched as the cache run batches them."""
    times = {}
    for name, (t, image_batches, token_batches) in prepared.teachers.items():
        _sync()
        t0 = time.perf_counter()
        for x in image_batches:
            t.encode_image(x)
        _sync()
        t1 = time.perf_counter()
        for tok in token_batches:
            t.encode_text(tok)
        _sync()
        times[name] = (t1 - t0, time.perf_counter() - t1)
    return times


def cache_run_seconds(corpus_path: str, teachers: dict[str, str], out: Path, batch_size: int, workers: int) -> float:
    """Wall time of a complete `distill cache` run into a fresh file."""
    from cache import CacheJob, build_cache  # noqa: PLC0415 (lazy: torch after the flags)

    for p in (
        out,
        Path(str(out) + ".parts"),
        Path(str(out) + ".tmp"),
        Path(str(out) + ".lock"),
        Path(str(out) + ".segments"),
    ):
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    job = CacheJob(
        data=str(corpus_path),
        teachers=teachers,
        out=str(out),
        batch_size=batch_size,
        num_workers=workers,
        device=_device(),
        progress=False,
    )
    seconds, summary = timed(lambda: build_cache(job))
    if any(t.done != summary.rows for t in summary.teachers.values()):
        raise RuntimeError(f"cache run incomplete: {summary}")
    return seconds


def per_image_costs(prep: Prepared, bare: dict[str, tuple[float, float]]) -> dict:
    """Milliseconds per image: one decode, and per teacher its transform and its image and text forward passes."""
    n = prep.images
    return {
        "decode_ms": 1e3 * prep.decode_s / n,
        "teachers": {
            name: {
                "transform_ms": 1e3 * prep.transform_s[name] / n,
                "image_forward_ms": 1e3 * i / n,
                "text_forward_ms": 1e3 * s / n,
            }
            for name, (i, s) in bare.items()
        },
    }


def run_overhead(f: Flags, work: Path) -> dict:
    import torch  # noqa: PLC0415 (lazy: torch after the flags)

    quiet_libraries()
    corpus = Path(f.corpus) if f.corpus else make_jpeg_corpus(work / "corpus", f.images, f.image_px)
    if not f.corpus:
        print(f"corpus: {f.images} synthetic {f.image_px}px JPEGs -> {corpus}", flush=True)
    small = head_corpus(corpus, f.batch_size) if corpus.suffix == ".csv" else None
    teachers = make_teachers(work / "teachers", f)
    prep = {"full": prepared_inputs(str(corpus), teachers, f.batch_size)}
    if small is not None:
        prep["small"] = prepared_inputs(str(small), teachers, f.batch_size)
    n_images = prep["full"].images
    bare_forward_seconds(prep["full"])  # warm-up: first calls allocate
    last_bare: dict[str, dict] = {}

    def bare(size: str):
        def go() -> float:
            last_bare[size] = bare_forward_seconds(prep[size])
            return sum(i + s for i, s in last_bare[size].values())

        return go

    def cache(size: str, path: Path, w: int):
        return lambda: cache_run_seconds(str(path), teachers, work / f"features-{size}-w{w}.h5", f.batch_size, w)

    variants = {"bare/full": bare("full")}
    if small is not None:
        variants["bare/small"] = bare("small")
    for w in f.workers:
        variants[f"w{w}/full"] = cache("full", corpus, w)
        if small is not None:
            variants[f"w{w}/small"] = cache("small", small, w)
    runs = interleave(variants, f.repeats, "cache_overhead")  # A B A B ...: drift hits every variant alike
    costs = per_image_costs(prep["full"], last_bare["full"])
    prep.clear()  # free the teachers and their inputs (`bare` closures are not called again)
    S = runs.samples
    rows: list[list] = []
    results: dict[str, Any] = {
        "images": n_images,
        "batch_size": f.batch_size,
        "teachers": teachers,
        "teacher_size": {"width": f.teacher_width, "layers": f.teacher_layers, "image_size": f.teacher_image_size},
        "torch_threads": torch.get_num_threads(),
        "device": _device(),
        "interleaved": runs.as_dict(),
        "per_image": costs,
        "by_workers": {},
    }
    for w in f.workers:
        total = runs.ratio(f"w{w}/full", "bare/full")
        marginal = None
        if small is not None:  # per repeat: (cache full - cache one batch) / (bare full - bare one batch)
            marginal = Spread.of(
                [
                    (cf - cs) / (bf - bs)
                    for cf, cs, bf, bs in zip(S[f"w{w}/full"], S[f"w{w}/small"], S["bare/full"], S["bare/small"])
                ]
            )
        results["by_workers"][w] = {
            "cache_s": runs.stats(f"w{w}/full").median,
            "overhead_total": total.median,
            "overhead_total_range": [total.lo, total.hi],
            "overhead_marginal": marginal and marginal.median,
            "overhead_marginal_range": marginal and [marginal.lo, marginal.hi],
        }
        ok = "yes" if (marginal or total).median <= GOAL_OVERHEAD else "no"
        rows.append(
            [
                w,
                runs.stats(f"w{w}/full").median,
                runs.stats("bare/full").median,
                total.text(),
                "n/a" if marginal is None else marginal.text(),
                ok if w >= 1 else "(not a goal)",
            ]
        )
    md = table(
        rows,
        [
            "num_workers",
            "cache run s (median)",
            "bare forward s (median)",
            "overhead total, median [min, max]",
            "overhead marginal, median [min, max]",
            f"marginal <= {GOAL_OVERHEAD}",
        ],
    )
    cost_rows = [["decode (corpus.load_image, once per image)", costs["decode_ms"], "", "", ""]]
    for name, c in costs["teachers"].items():
        cost_rows.append([f"teacher {name}", "", c["transform_ms"], c["image_forward_ms"], c["text_forward_ms"]])
    cost_md = table(cost_rows, ["per image, ms", "decode", "own transform", "image forward", "text forward"])
    md = (
        f"Part 1: `distill cache` wall time / bare teacher forward time, {n_images} images, batch "
        f"{f.batch_size}, teachers {', '.join(teachers)} (width {f.teacher_width}, {f.teacher_layers} layers, "
        f"{f.teacher_image_size}px), device {_device()}, torch threads {torch.get_num_threads()} on both sides "
        f"(DataLoader workers decode with 1 thread each); {f.repeats} interleaved repeats (every variant once per "
        f"repeat, in turn), ratios taken within each repeat; 1-minute load average before each repeat and after: "
        f"{', '.join(map(str, runs.load))}\n\n{md}\n\n{cost_md}\n"
    )
    return {"results": results, "markdown": md}


# == part 2 =================================================================================================
def write_feature_file(path: Path, rows: int, dims: tuple[int, ...], chunk_rows: int, seed: int = 0) -> float:
    """A finished float16 cache of `rows` rows and one teacher per dim, in the writer's own layout and chunking.

    The file and each group come from cache.store.writer (create_file, the group the writer's fold creates); the
    values are one block of random unit vectors repeated, which reading speed does not depend on.
    """
    import h5py  # noqa: PLC0415 (lazy: h5py kept off --help)

    import cache.store.writer as W  # noqa: PLC0415 (lazy: torch after the flags)

    t0 = time.perf_counter()
    keys = [f"row-{i:08d}" for i in range(rows)]
    W.create_file(str(path), keys, fingerprint="benchmark", source="synthetic")
    del keys
    rng = np.random.default_rng(seed)
    block = min(rows, 65536)
    with h5py.File(path, "r+") as f:
        for j, d in enumerate(dims):
            name = f"t{j}_{d}"
            meta = synthetic_teacher_meta(name, d, chunk_rows)
            g = W._ensure_group(f, name, meta)  # the exact datasets and chunks a fold creates
            x = rng.standard_normal((block, d)).astype(np.float32)
            x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
            for what in ("image", "text"):
                ds = g[what]
                for lo in range(0, rows, block):
                    hi = min(rows, lo + block)
                    ds[lo:hi] = x[: hi - lo]
            g["done"][...] = True
    return time.perf_counter() - t0


def measure_reads(reader, order: np.ndarray, batch: int, seconds: float, useful_per_row: int, whole: int = 1) -> dict:
    """Read consecutive batches of `order` for about `seconds`, then on to a multiple of `whole` rows (whole
    shuffle buffers: a buffer's blocks are all read at its start); rows/s and bytes read per useful byte."""
    n_batches = len(order) // batch
    io0, b0, t0, done = io_counters(), reader.bytes_read, time.perf_counter(), 0
    while done < n_batches:
        reader.read(order[done * batch : (done + 1) * batch])
        done += 1
        if time.perf_counter() - t0 >= seconds and (done * batch) % whole == 0:
            break
    elapsed, io1 = time.perf_counter() - t0, io_counters()
    useful = done * batch * useful_per_row
    out = {
        "rows": done * batch,
        "seconds": elapsed,
        "rows_per_s": done * batch / elapsed,
        "fetched_per_useful": (reader.bytes_read - b0) / useful,
    }
    if io0 and io1:
        out["read_per_useful"] = (io1["rchar"] - io0["rchar"]) / useful
        out["disk_per_useful"] = (io1["read_bytes"] - io0["read_bytes"]) / useful
    return out


def reader_variants(f: Flags, n: int, chunk: int, seed: int = 0) -> list[tuple[str, int, int, np.ndarray]]:
    """(label, reader block_rows, buffer blocks, row order): random rows read directly (no block can help),
    block-shuffled rows through the block cache (how training reads: the EpochSampler's
    block_shuffle_order + FeatureReader(block_rows=B, cache_blocks=buffer)), and sequential rows (the ceiling)."""
    from cache.store.reader import block_shuffle_order  # noqa: PLC0415 (lazy: torch after the flags)

    out = [("random", 0, 1, np.random.default_rng(seed).permutation(n))]
    for b in f.block_rows:
        if b % chunk == 0:
            k = max(1, f.buffer_rows // b)
            order = block_shuffle_order(
                np.arange(n) // b, k, np.random.default_rng((seed, 0))
            )  # EpochSampler's, epoch 0
            out.append((f"block-shuffle {b} x {k}", b, k, order))
    out.append(("sequential", 0, 1, np.arange(n)))
    return out


def run_reader(f: Flags) -> dict:
    from cache import FeatureReader  # noqa: PLC0415 (lazy: torch after the flags)

    need = f.rows * sum(f.dims) * 2 * 2
    free = shutil.disk_usage(f.reader_dir).free
    if need * 1.2 > free:
        raise SystemExit(
            f"part 2 needs ~{need / 1e9:.1f} GB in {f.reader_dir} (free {free / 1e9:.1f} GB); "
            f"pass --rows {int(f.rows * free / need / 1.5)} or --reader-dir elsewhere"
        )
    useful_per_row = sum(f.dims) * 2 * 2  # image + text, float16 as stored
    results, rows = {}, []
    for c in f.chunk_rows:
        path = Path(tempfile.mkstemp(prefix=f"bench-features-c{c}-", suffix=".h5", dir=f.reader_dir)[1])
        try:
            write_s = write_feature_file(path, f.rows, f.dims, c)
            print(f"chunk {c} rows: wrote {path.stat().st_size / 1e9:.2f} GB in {write_s:.0f}s", flush=True)
            res: dict[str, Any] = {"write_s": write_s, "file_bytes": path.stat().st_size}
            results[c] = res
            for cache_state in ("warm", "cold") if f.cold else ("warm",):
                if cache_state == "warm":
                    load_into_page_cache(path)
                elif not drop_from_page_cache(path):
                    continue
                for label, block, k, order in reader_variants(f, f.rows, c):
                    cache_mb = k * block * useful_per_row / 1e6 if block else 0.0
                    # a fresh reader per measurement: its block cache starts empty, as a worker's does
                    with FeatureReader(str(path), block_rows=block, cache_blocks=k) as reader:
                        if cache_state == "cold":
                            drop_from_page_cache(path)
                        m = measure_reads(
                            reader, order, f.read_batch, f.seconds, useful_per_row, whole=k * block if block else 1
                        )
                    m["block_cache_mb"] = cache_mb
                    res[f"{label}/{cache_state}"] = m
                    rows.append(
                        [
                            c,
                            label,
                            cache_state,
                            m["rows_per_s"],
                            m["fetched_per_useful"],
                            m.get("read_per_useful", "n/a"),
                            m.get("disk_per_useful", "n/a"),
                            cache_mb,
                            "yes" if m["rows_per_s"] >= GOAL_ROWS_PER_S else "no",
                        ]
                    )
                    print(
                        f"  {label:>24} {cache_state}: {m['rows_per_s']:,.0f} rows/s, "
                        f"fetched/useful {m['fetched_per_useful']:.2f}",
                        flush=True,
                    )
        finally:
            path.unlink(missing_ok=True)
    md = table(
        rows,
        [
            "chunk rows",
            "order (block rows x buffer blocks)",
            "page cache",
            "rows/s",
            "fetched/useful",
            "read/useful",
            "disk/useful",
            "block cache MB",
            f">= {GOAL_ROWS_PER_S:,}",
        ],
    )
    md = (
        f"Part 2: `FeatureReader.read` of {f.read_batch}-row batches, all {len(f.dims)} teachers (dims "
        f"{', '.join(map(str, f.dims))}, image + text, float16), {f.rows:,} rows, one process; block-shuffle "
        f"B x K: block_shuffle_order(rows // B, K) (the trainer's EpochSampler) read by FeatureReader(block_rows=B, "
        f"cache_blocks=K), K = {f.buffer_rows:,} rows / B; whole buffers measured\n\n{md}\n"
    )
    return {"results": results, "markdown": md}


def main(argv=None) -> int:
    f = parse_flags(Flags, argv, __doc__)
    owned = f.workdir is None
    work = Path(tempfile.mkdtemp(prefix="bench-cache-")) if f.workdir is None else Path(f.workdir)
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    md: list[str] = []
    try:
        if not f.skip_overhead:
            r = run_overhead(f, work)
            results["overhead"], md = {**r["results"], "markdown": r["markdown"]}, md + [r["markdown"]]
            print("\n" + r["markdown"], flush=True)
        if not f.skip_reader:
            r = run_reader(f)
            results["reader"], md = {"chunks": r["results"], "markdown": r["markdown"]}, md + [r["markdown"]]
            print("\n" + r["markdown"], flush=True)
    finally:
        if owned:
            shutil.rmtree(work, ignore_errors=True)
    previous = output_dir(f) / "cache_overhead.json"
    if (f.skip_overhead or f.skip_reader) and previous.is_file():  # keep the other part's last figures
        old = json.loads(previous.read_text())
        for part in ("overhead", "reader"):
            if part not in results and part in old.get("results", {}):
                results[part] = {**old["results"][part], "from_earlier_run": old.get("command")}
                md.append(old["results"][part].get("markdown", ""))
    j, m = write_results("cache_overhead", f, results, "\n".join(md))
    print(f"results: {j} and {m}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
