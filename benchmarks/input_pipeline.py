"""What the input pipeline costs on CPU, and how many cores a GPU needs to be fed (issue 10, finding 2).

    python -m benchmarks.input_pipeline --quick --json OUT.json   # < 2 minutes on 2 cores
    python -m benchmarks.input_pipeline                             # more images, rows and repeats

(a) Samples/s of ONE process (a DataLoader worker is one) for decode + augment + tokenise of ~0.5 MP synthetic
    JPEGs to a 224 px student: today's path (`teachers.transforms.make_view_transform`: normalised float32) and
    the uint8 path (`distill.data.loader.make_uint8_view_transform`, normalised on the device) where it exists. Both run
    `PairDataset.__getitem__` and `Collate` (PubMedBERT-sized context of 256) over the same images, interleaved
    (A B A B ..., bench_common.interleave): ratios per repeat, median [min, max], load average per repeat.
(b) Feature bytes read per useful byte with R ranks x W workers simulated (8 x 8 in --quick): every (rank, worker)
    gets the batches Accelerate (`BatchSamplerShard`: batch g to rank g % R) and the DataLoader (a rank's batch j
    to worker j % W) give it and reads them through its own `FeatureReader(block_rows, cache_blocks=buffer)`, as
    its Collate does; block_shuffle (today) against block_deal (`distill.data.samplers.deal_order`).
(c) CPU cores per GPU to feed a ViT-B/16 student at 1,800 samples/s = 1800 x (CPU seconds per sample): the
    decode path of (a) plus the feature reads of (b) for 9 ViT-B teachers (27.6 KB a row in float16), the read
    time modelled as bytes read per useful byte x 27.6 KB x the measured seconds per byte read (page cache).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.bench_common import (
    Output,
    interleave,
    load_avg,
    make_jpeg_corpus,
    parse_flags,
    quiet_libraries,
    table,
    write_results,
)
from benchmarks.cache_overhead import write_feature_file

# Imports of torch and of the project's modules (which load torch) sit in the functions that use them, so that
# --help and a flag error answer at once, without loading torch.

TARGET_SAMPLES_PER_S = 1800.0  # a ViT-B/16 + PubMedBERT-256 student at ~45% MFU on one H200 (issue 10)
ROW_BYTES_9_TEACHERS = 9 * 2 * 768 * 2  # 9 teachers x (image, text) x 768 dims x float16 = 27.6 KB


@dataclass(frozen=True)
class Flags(Output):
    quick: bool = False  # small sizes: finishes in < 2 minutes
    json: str = ""  # also write the results here
    images: int = 192  # synthetic JPEGs (--quick: 64)
    image_px: int = 704  # their side: 704 x 704 = 0.5 MP
    batch_size: int = 32  # per device, both parts
    repeats: int = 5  # interleaved repeats of part (a) (--quick: 3)
    ranks: int = 8  # simulated processes (part b)
    workers: int = 8  # simulated DataLoader workers per process (part b)
    rows: int = 1000000  # feature rows in part (b) (--quick: 300000): not a multiple of the blocks
    block_rows: int = 1024  # data.block_rows
    buffer_blocks: int = 16  # data.shuffle_buffer_blocks (= each reader's cache_blocks)
    chunk_rows: int = 256  # the cache's HDF5 chunk rows (distill cache's default)
    dim: int = 32  # feature dims of the one simulated teacher (ratios do not depend on it)


# == (a) decode + augment + tokenise =========================================================================
def decode_variants(f: Flags, work: Path) -> dict:
    """{name: callable returning seconds for one pass over the images}, one process, batches of batch_size."""
    from open_clip.tokenizer import HFTokenizer  # noqa: PLC0415 (lazy: torch after the flags)

    import distill.data.loader as D  # noqa: PLC0415 (lazy: torch after the flags)
    from cache.sources.corpus import open_corpus  # noqa: PLC0415 (lazy: torch after the flags)
    from student.tokenizer import train_wordpiece  # noqa: PLC0415 (lazy: torch after the flags)
    from teachers.transforms import PreprocessCfg, make_view_transform  # noqa: PLC0415 (lazy: torch after the flags)

    csv = make_jpeg_corpus(work / "jpegs", f.images, f.image_px)
    corpus = open_corpus(str(csv))
    tok = HFTokenizer(str(train_wordpiece(corpus.captions, work / "wp", vocab_size=2000)), context_length=256)
    pp = PreprocessCfg(image_size=(224, 224))
    ds = D.PairDataset(corpus, pp, crop_scale=(0.9, 1.0), seed=0)
    collate = D.Collate(tok)
    transforms = {"float32 (today)": make_view_transform(pp)}
    if hasattr(D, "make_uint8_view_transform"):
        transforms["uint8"] = D.make_uint8_view_transform(pp)

    def one_pass(transform, decode="worker"):
        def go() -> float:
            ds.transform, ds.decode = transform, decode
            t0 = time.perf_counter()
            for lo in range(0, len(ds), f.batch_size):
                collate([ds[(0, i)] for i in range(lo, min(len(ds), lo + f.batch_size))])
            return time.perf_counter() - t0

        return go

    passes = {k: one_pass(t) for k, t in transforms.items()}
    if hasattr(ds, "decode"):  # data.decode=device: a worker reads bytes and the JPEG header only
        passes["device decode (worker side)"] = one_pass(transforms["uint8"], "device")
    for go in passes.values():  # warm-up: page cache, lazy imports
        go()
    return passes


def run_decode(f: Flags, work: Path) -> dict:
    import torch  # noqa: PLC0415 (lazy: torch after the flags)

    torch.set_num_threads(1)  # a worker process is one core
    res = interleave(decode_variants(f, work), f.repeats, label="decode")
    per_s = {k: f.images / res.stats(k).median for k in res.samples}
    out = {"samples_per_s": per_s, "interleaved": res.as_dict()}
    if "uint8" in res.samples:
        out["uint8_speedup"] = res.ratio("float32 (today)", "uint8").__dict__  # seconds today / seconds uint8
    return out


# == (b) feature bytes read per useful byte ==================================================================
def pair_batches(sampler, ranks: int, workers: int, batch: int) -> list[list[list[int]]]:
    """Each (rank, worker)'s batches of dataset indices, as Accelerate and the DataLoader deal them."""
    from accelerate.data_loader import BatchSamplerShard  # noqa: PLC0415 (lazy: torch after the flags)
    from torch.utils.data import BatchSampler  # noqa: PLC0415 (lazy: torch after the flags)

    out = []
    for r in range(ranks):
        shard = BatchSamplerShard(
            BatchSampler(sampler, batch, drop_last=True),
            num_processes=ranks,
            process_index=r,
            split_batches=False,
            even_batches=True,
        )
        local = [[i for _, i in b] for b in shard]
        out += [local[w::workers] for w in range(workers)]
    return out


def _write_features(path: Path, f: Flags) -> int:
    """A one-teacher float16 cache (cache_overhead's writer); its bytes per row."""
    write_feature_file(path, f.rows, (f.dim,), chunk_rows=f.chunk_rows)
    return 2 * f.dim * 2


def read_amplification(f: Flags, work: Path) -> dict:
    from cache import FeatureReader  # noqa: PLC0415 (lazy: torch after the flags)
    from distill.data.samplers import Dealing, EpochSampler, reader_blocks  # noqa: PLC0415 (lazy: torch after the flags)

    path = work / "features.h5"
    row_bytes = _write_features(path, f)
    out = {}
    for name, dealing in (("block_shuffle (before)", None), ("block_deal", Dealing(f.ranks, f.workers, f.batch_size))):
        s = EpochSampler(
            f.rows,
            0,
            lambda e: f.batch_size * f.ranks,
            block_ids=np.arange(f.rows) // f.block_rows,
            buffer_blocks=f.buffer_blocks,
            dealing=dealing,
        )
        read, useful, seconds, blocks_held = 0, 0, 0.0, 0
        for batches in pair_batches(s, f.ranks, f.workers, f.batch_size):
            unit, held = reader_blocks(f.block_rows, f.buffer_blocks, f.chunk_rows, dealing is not None)
            with FeatureReader(str(path), block_rows=unit, cache_blocks=held) as reader:
                t0 = time.perf_counter()
                for b in batches:
                    reader.read(b)
                seconds += time.perf_counter() - t0
                read += reader.bytes_read
                useful += len(batches) * f.batch_size * row_bytes
                blocks_held = max(blocks_held, len({k for _, k in reader.block_reads}))
        out[name] = {
            "bytes_read": read,
            "useful_bytes": useful,
            "read_per_useful_byte": read / useful,
            "read_seconds": seconds,
            "seconds_per_byte_read": seconds / read,
            "blocks_per_reader_max": blocks_held,
        }
        print(
            f"reads {name}: {read / useful:.3f} bytes read per useful byte ({read / 1e6:.1f} MB, {seconds:.2f} s)",
            flush=True,
        )
    return out


# == (c) cores per GPU ======================================================================================
def cores_per_gpu(decode_per_s: float, read_per_useful: float, s_per_byte: float) -> dict:
    """1800 x CPU seconds per sample (decode path + modelled feature reads for 9 ViT-B teachers)."""
    read_s = read_per_useful * ROW_BYTES_9_TEACHERS * s_per_byte
    per_core = 1.0 / (1.0 / decode_per_s + read_s)
    return {
        "samples_per_s_per_core": per_core,
        "read_ms_per_sample": 1e3 * read_s,
        "cores_per_gpu_at_1800": TARGET_SAMPLES_PER_S / per_core,
    }


def main(argv=None) -> dict:
    f = parse_flags(Flags, argv, __doc__)
    if f.quick:
        f = Flags(
            **{**f.__dict__, "images": min(f.images, 64), "repeats": min(f.repeats, 3), "rows": min(f.rows, 300000)}
        )
    quiet_libraries()
    load_start = load_avg()
    with tempfile.TemporaryDirectory(prefix="input-pipeline-") as tmp:
        work = Path(tmp)
        decode = run_decode(f, work)
        reads = read_amplification(f, work)
    before, after = reads["block_shuffle (before)"], reads["block_deal"]
    s_per_byte = before["seconds_per_byte_read"]  # the same reads from the page cache; the larger sample
    fast = "uint8" if "uint8" in decode["samples_per_s"] else "float32 (today)"
    c_before = cores_per_gpu(decode["samples_per_s"]["float32 (today)"], before["read_per_useful_byte"], s_per_byte)
    c_after = cores_per_gpu(decode["samples_per_s"][fast], after["read_per_useful_byte"], s_per_byte)
    dev = "device decode (worker side)"
    c_dev = (
        cores_per_gpu(decode["samples_per_s"][dev], after["read_per_useful_byte"], s_per_byte)
        if dev in decode["samples_per_s"]
        else None
    )
    results = {
        "cores_per_gpu_at_1800_device_decode": c_dev and c_dev["cores_per_gpu_at_1800"],
        "read_per_useful_byte": after["read_per_useful_byte"],
        "read_per_useful_byte_before": before["read_per_useful_byte"],
        "cores_per_gpu_at_1800": c_after["cores_per_gpu_at_1800"],
        "cores_per_gpu_at_1800_before": c_before["cores_per_gpu_at_1800"],
        "samples_per_s_per_worker": decode["samples_per_s"][fast],
        "samples_per_s_per_worker_before": decode["samples_per_s"]["float32 (today)"],
        "block_cache_bytes_per_worker_9_teachers": f.buffer_blocks * f.block_rows * ROW_BYTES_9_TEACHERS,
        "load_average": {"start": load_start, "end": load_avg()},
        "ranks_x_workers": [f.ranks, f.workers],
        "decode": decode,
        "reads": reads,
        "cores": {"before": c_before, "after": c_after, "device_decode": c_dev},
    }
    rows = [
        ["read / useful byte", before["read_per_useful_byte"], after["read_per_useful_byte"]],
        [
            "samples/s per worker (decode+augment+tokenise)",
            results["samples_per_s_per_worker_before"],
            results["samples_per_s_per_worker"],
        ],
        ["feature-read ms per sample (9 teachers)", c_before["read_ms_per_sample"], c_after["read_ms_per_sample"]],
        ["cores per GPU at 1,800 samples/s", c_before["cores_per_gpu_at_1800"], c_after["cores_per_gpu_at_1800"]],
    ]
    heads = ["", "before (block_shuffle, float32)", f"after (block_deal, {fast})"]
    if c_dev:  # the workers' side only: the GPU's decode and resize are not counted here
        heads.append("block_deal, data.decode=device (worker side)")
        for r, v in zip(
            rows,
            [
                after["read_per_useful_byte"],
                decode["samples_per_s"][dev],
                c_dev["read_ms_per_sample"],
                c_dev["cores_per_gpu_at_1800"],
            ],
        ):
            r.append(v)
    md = table(rows, heads)
    md += (
        f"\n\n{f.ranks} ranks x {f.workers} workers, block {f.block_rows} rows, buffer {f.buffer_blocks} blocks, "
        f"batch {f.batch_size}; block cache per worker for 9 ViT-B teachers: "
        f"{results['block_cache_bytes_per_worker_9_teachers'] / 2**20:.0f} MiB; load average "
        f"{results['load_average']}\n"
    )
    print(md)
    write_results("input_pipeline", f, results, md, json_copy=f.json)
    return results


if __name__ == "__main__":
    main()
