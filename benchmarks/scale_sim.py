"""What writing, merging and reading a feature cache cost at scale, without teachers (issue 12).

    python -m benchmarks.scale_sim --quick --json OUT.json   # 1M rows x 3 teachers (~9.7 GB), < 10 min on 2 cores
    python -m benchmarks.scale_sim --rows 24000000 --dims 512,768,1152,768,768,768,512,512,1152 --processes 64

(a) Write: P processes (spawned, as torchrun would) each take their contiguous share of the chunks
    (`cache.build.commit.deal`), open their segment (`open_segment`) and commit every chunk through the builder's
    own path (`commit_chunk` -> `W.write_part` -> `SegmentWriter`, in the `W.PartWriter` thread), with the running
    statistics sums (`SegmentWriter.add_sums`; on a GPU build they run on the device, here on the CPU, timed
    apart). Rows are random unit vectors (float16) drawn from one pool per teacher, so drawing them costs nothing.
(b) Merge: `W.fold`, the real merge, timed; a thread samples the bytes allocated under the cache's folder every
    20 ms, so `extra_disk_over_final` = (peak during the merge - before) / final size.
(c) Read: R ranks x W workers (`distill.data.samplers` block_deal, Accelerate's and the DataLoader's dealing of
    batches as `input_pipeline.pair_batches` gives them), each (rank, worker) reading its first batches through its
    own `FeatureReader(block_rows=chunk)` as its Collate does, one after another in this process: rows/s per core.
    Also the same rows read straight from a segment file, to show what the virtual datasets cost.
`merge_over_write` = merge seconds / the seconds a writing process spent committing (its writer thread: encode,
pwrite, fsync), the conservative ratio: a real build's write time also holds the teachers' forward passes.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from benchmarks.bench_common import Output, load_avg, parse_flags, synthetic_teacher_meta, table, write_results
from benchmarks.input_pipeline import pair_batches
from teachers.kernel.modality import Modality

# Imports of torch and of the project's modules (which load torch) sit in the functions that use them, so that
# --help and a flag error answer at once, without loading torch.

POOL_ROWS = 8192  # distinct unit vectors per teacher and modality; chunks take rolling slices of them


@dataclass(frozen=True)
class Flags(Output):
    quick: bool = False  # 1M rows, 2 processes, 2 x 2 readers: < 10 minutes on 2 cores
    json: str = ""  # also write the results here
    rows: int = 4000000  # cache rows (--quick: 1000000)
    dims: tuple[int, ...] = (512, 768, 1152)  # one teacher per dim (image + text each, float16)
    processes: int = 4  # simulated caching processes (--quick: 2)
    chunk_rows: int = 512  # rows per commit (distill cache --chunk-rows)
    h5_chunk_rows: int = 256  # HDF5 chunk rows (distill cache's default)
    ranks: int = 8  # simulated training processes reading back (--quick: 2)
    workers: int = 8  # simulated DataLoader workers per rank (--quick: 2)
    batch_size: int = 256  # per device
    block_rows: int = 1024  # data.block_rows
    buffer_blocks: int = 16  # data.shuffle_buffer_blocks
    read_rows: int = 400000  # rows read back in all, over the pairs (--quick: 200000)
    sums: bool = True  # keep the statistics sums as the builder does (CPU here)
    work: str = ""  # folder for the cache (default: a temporary one, deleted)


# == (a) write =================================================================================================
def _pool(d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((POOL_ROWS, d), dtype=np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def _write_rank(out: str, rank: int, world: int, run: int, metas: dict, fp: str, f: Flags, queue, start) -> None:
    """One caching process: its chunks through the builder's commit path into its own segment, timed from the
    moment every process is ready (`start`, a barrier) to its last commit."""
    import torch  # noqa: PLC0415 (lazy: torch after the flags)

    import cache.store.writer as W  # noqa: PLC0415 (lazy: torch after the flags)
    from cache.build.commit import commit_chunk, deal, open_segment  # noqa: PLC0415 (lazy: torch after the flags)
    from cache.build.dist import DistEnv  # noqa: PLC0415 (lazy: torch after the flags)

    torch.set_num_threads(1)
    rows = np.arange(f.rows, dtype=np.int64)
    chunks = deal([rows[i : i + f.chunk_rows] for i in range(0, f.rows, f.chunk_rows)], DistEnv(rank, world))
    names = list(metas)
    need = np.broadcast_to(np.ones((1, len(names)), dtype=bool), (f.rows, len(names)))  # every teacher, every row
    dims = {n: int(m["attrs"]["embed_dim"]) for n, m in metas.items()}
    pools = {n: (_pool(dims[n], 2 * i), _pool(dims[n], 2 * i + 1)) for i, n in enumerate(names)}
    start.wait()
    t0 = time.perf_counter()
    seg = open_segment(out, run, DistEnv(rank, world), chunks, need, metas, f.chunk_rows, f.h5_chunk_rows, fp)
    if seg is None:  # (seg.finish() below would fail on it)
        raise ValueError(f"process {rank} of {world} has no rows to write: more --rows or fewer --processes")
    writer, sums_s, busy = W.PartWriter(), 0.0, [0.0]

    def commit(parts: list, j: int) -> None:  # in the writer's thread: encode, pwrite, fsync, log line
        t = time.perf_counter()
        commit_chunk(out, parts, seg, j)
        busy[0] += time.perf_counter() - t

    try:
        for j, c in enumerate(chunks):
            parts: list[tuple] = []
            for n in names:
                img_pool, txt_pool = pools[n]
                at = (int(c[0]) * 7919) % (POOL_ROWS - len(c))
                img, txt = img_pool[at : at + len(c)], txt_pool[at : at + len(c)]
                if f.sums:
                    t = time.perf_counter()
                    seg.add_sums(n, torch.from_numpy(img), torch.from_numpy(txt))
                    sums_s += time.perf_counter() - t
                parts.append((n, c, img, txt, [], [], None))
            writer.submit(partial(commit, parts, j))
        writer.join()
        seg.finish()
    finally:
        writer.close()
        seg.close()
    queue.put(
        {
            "rank": rank,
            "seconds": time.perf_counter() - t0,
            "sums_s": sums_s,
            "commit_s": busy[0],
            "chunks": len(chunks),
        }
    )


def write(out: Path, f: Flags) -> dict:
    import cache.store.layout as L  # noqa: PLC0415 (lazy: torch after the flags)
    import cache.store.segments as S  # noqa: PLC0415 (lazy: torch after the flags)
    import cache.store.writer as W  # noqa: PLC0415 (lazy: torch after the flags)

    fp = "scale-sim"
    W.create_file(str(out), [f"row-{i:09d}" for i in range(f.rows)], fingerprint=fp, source="synthetic")
    run = S.next_run(S.segment_dir(str(out)))
    metas = {}
    for j, d in enumerate(f.dims):
        name = f"t{j}_{d}"
        metas[name] = synthetic_teacher_meta(name, d, f.h5_chunk_rows, fingerprint=fp, **{L.SINCE_RUN: run})
        W.write_meta(str(out), name, metas[name])
    ctx = mp.get_context("spawn")
    queue, start = ctx.Queue(), ctx.Barrier(f.processes)
    procs = [
        ctx.Process(target=_write_rank, args=(str(out), r, f.processes, run, metas, fp, f, queue, start))
        for r in range(f.processes)
    ]
    for p in procs:
        p.start()
    for p in procs:  # a few small dicts wait in the queue: joining first cannot block on it
        p.join()
        if p.exitcode:
            raise SystemExit(f"a writing process failed (exit {p.exitcode}); its traceback is above")
    done = [queue.get(timeout=10) for _ in procs]
    wall = max(d["seconds"] for d in done)  # from the common start to the last process's last commit
    sums, commits = max(d["sums_s"] for d in done), max(d["commit_s"] for d in done)
    print(
        f"write: {wall:.1f} s for {f.rows} rows x {len(f.dims)} teachers with {f.processes} processes; the "
        f"slowest process spent {commits:.1f} s committing (its writer thread) and {sums:.1f} s on the "
        "statistics sums",
        flush=True,
    )
    return {"write_s": wall, "sums_s": sums, "commit_s": commits, "per_process": done}


# == (b) merge ==================================================================================================
def allocated(folder: Path) -> int:
    """Bytes allocated (not apparent: segments are sparse until written) under `folder`, files only."""
    total = 0
    for root, _, files in os.walk(folder):
        for n in files:
            try:
                st = os.stat(os.path.join(root, n))
            except FileNotFoundError:  # the merge removed it while we looked
                continue
            total += st.st_blocks * 512
    return total


def merge(out: Path) -> dict:
    import cache.store.writer as W  # noqa: PLC0415 (lazy: torch after the flags)

    folder = out.parent
    before = allocated(folder)
    peak, stop = [before], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak.append(allocated(folder))
            time.sleep(0.02)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.perf_counter()
    folded = W.fold(str(out))
    seconds = time.perf_counter() - t0
    stop.set()
    th.join()
    final = allocated(folder)
    extra = max(peak) - before
    print(
        f"merge: {seconds:.2f} s, peak extra disk {extra / 2**20:.1f} MiB of {final / 2**30:.2f} GiB final", flush=True
    )
    return {
        "merge_s": seconds,
        "extra_disk_peak_bytes": extra,
        "final_bytes": final,
        "before_bytes": before,
        "main_file_bytes": os.path.getsize(out),
        "rows_folded": folded,
    }


def mappings(out: Path) -> dict:
    import h5py  # noqa: PLC0415 (lazy: h5py kept off --help)

    import cache.store.layout as L  # noqa: PLC0415 (lazy: torch after the flags)

    with h5py.File(out, "r") as f:
        counts = {n: f[L.feature(n, Modality.IMAGE)].id.get_create_plist().get_virtual_count() for n in f[L.TEACHERS]}
        files = {vs.file_name for n in f[L.TEACHERS] for vs in f[L.feature(n, Modality.IMAGE)].virtual_sources()}
    return {"mappings_per_dataset": counts, "segment_files": len(files)}


# == (c) read ===================================================================================================
def read(out: Path, f: Flags) -> dict:
    import h5py  # noqa: PLC0415 (lazy: h5py kept off --help)

    import cache.store.layout as L  # noqa: PLC0415 (lazy: torch after the flags)
    from cache import FeatureReader  # noqa: PLC0415 (lazy: torch after the flags)
    from distill.data.samplers import Dealing, EpochSampler, reader_blocks  # noqa: PLC0415 (lazy: torch after the flags)

    dealing = Dealing(f.ranks, f.workers, f.batch_size)
    s = EpochSampler(
        f.rows,
        0,
        lambda e: f.batch_size * f.ranks,
        block_ids=np.arange(f.rows) // f.block_rows,
        buffer_blocks=f.buffer_blocks,
        dealing=dealing,
    )
    pairs = pair_batches(s, f.ranks, f.workers, f.batch_size)
    per_pair = max(1, f.read_rows // (len(pairs) * f.batch_size))
    read_rows, seconds, read_bytes, useful = 0, 0.0, 0, 0
    with h5py.File(out, "r") as h:
        row_bytes = sum(2 * h[L.feature(n, Modality.IMAGE)].shape[-1] * 2 for n in h[L.TEACHERS])
    for batches in pairs:
        unit, held = reader_blocks(f.block_rows, f.buffer_blocks, f.h5_chunk_rows, True)
        with FeatureReader(str(out), block_rows=unit, cache_blocks=held) as reader:
            t0 = time.perf_counter()
            for b in batches[:per_pair]:
                reader.read(b)
            seconds += time.perf_counter() - t0
            read_rows += len(batches[:per_pair]) * f.batch_size
            read_bytes += reader.bytes_read
            useful += len(batches[:per_pair]) * f.batch_size * row_bytes
    direct = _direct_vs_virtual(out, f)
    print(
        f"read: {read_rows} rows in {seconds:.1f} s with {f.ranks} x {f.workers} readers, one after another: "
        f"{read_rows / seconds:,.0f} rows/s per core; virtual/direct time {direct['virtual_over_direct']:.2f}",
        flush=True,
    )
    return {
        "read_rows": read_rows,
        "read_s": seconds,
        "read_rows_per_s": read_rows / seconds,
        "read_mb_per_s": read_bytes / seconds / 1e6,
        "read_per_useful_byte": read_bytes / useful,
        **direct,
    }


def _direct_vs_virtual(out: Path, f: Flags, blocks: int = 64, repeats: int = 3) -> dict:
    """The same whole HDF5 chunks read through the virtual datasets and straight from the first segment, in turn
    (`repeats` times each, A B A B ...): the median time ratio."""
    import h5py  # noqa: PLC0415 (lazy: h5py kept off --help)

    import cache.store.layout as L  # noqa: PLC0415 (lazy: torch after the flags)

    with h5py.File(out, "r") as h:
        names = list(h[L.TEACHERS])
        src = Path(out).parent / next(
            iter(
                {
                    vs.file_name
                    for vs in h[L.feature(names[0], Modality.IMAGE)].virtual_sources()
                    if "-rank-0000-" in vs.file_name
                }
            )
        )
    c = f.h5_chunk_rows
    n = max(1, min(blocks, (f.rows // f.processes) // c))
    times: dict[str, list[float]] = {"virtual": [], "direct": []}
    for _ in range(repeats):
        for label, path in (("virtual", out), ("direct", src)):
            with h5py.File(path, "r") as h:
                sets = [h[L.feature(t, m)] for t in names for m in Modality]
                t0 = time.perf_counter()
                for k in range(n):
                    for ds in sets:
                        ds[k * c : (k + 1) * c]
                times[label].append(time.perf_counter() - t0)
    ratio = statistics.median(v / d for v, d in zip(times["virtual"], times["direct"]))
    return {
        "virtual_over_direct": ratio,
        "direct_read_s": statistics.median(times["direct"]),
        "virtual_read_s": statistics.median(times["virtual"]),
    }


def main(argv=None) -> dict:
    f = parse_flags(Flags, argv, __doc__)
    if f.quick:
        f = Flags(
            **{
                **f.__dict__,
                "rows": min(f.rows, 1000000),
                "processes": min(f.processes, 2),
                "ranks": min(f.ranks, 2),
                "workers": min(f.workers, 2),
                "read_rows": min(f.read_rows, 200000),
            }
        )
    load_start = load_avg()
    work = Path(f.work) if f.work else Path(tempfile.mkdtemp(prefix="scale-sim-"))
    work.mkdir(parents=True, exist_ok=True)
    out = work / "features.h5"
    try:
        w = write(out, f)
        m = merge(out)
        maps = mappings(out)
        r = read(out, f)
    finally:
        if not f.work:
            shutil.rmtree(work, ignore_errors=True)
    results = {
        "rows": f.rows,
        "teachers": len(f.dims),
        "dims": list(f.dims),
        "processes": f.processes,
        "merge_over_write": m["merge_s"] / w["commit_s"],  # conservative: the writer thread's time only
        "merge_over_write_wall": m["merge_s"] / w["write_s"],
        "extra_disk_over_final": m["extra_disk_peak_bytes"] / m["final_bytes"],
        "read_rows_per_s": r["read_rows_per_s"],
        "write_rows_per_s": f.rows / w["commit_s"] / f.processes,  # per process, its writer thread alone
        "write_mb_per_s": m["final_bytes"] / w["commit_s"] / 1e6,  # all processes
        "load_average": {"start": load_start, "end": load_avg()},
        "write": w,
        "merge": m,
        "read": r,
        **maps,
    }
    rows = [
        [
            f"write, {f.processes} processes in parallel (wall)",
            f"{w['write_s']:.1f} s",
            f"merge / this = {results['merge_over_write_wall']:.4f}",
        ],
        [
            "  of which committing (a process's writer thread)",
            f"{w['commit_s']:.1f} s",
            f"{results['write_rows_per_s']:,.0f} rows/s per process, {results['write_mb_per_s']:.0f} MB/s in all",
        ],
        ["  and the statistics sums (CPU here, GPU in a build)", f"{w['sums_s']:.1f} s", "slowest process"],
        [
            "merge (W.fold)",
            f"{m['merge_s']:.2f} s",
            f"merge / committing = {results['merge_over_write']:.4f} (merge_over_write)",
        ],
        [
            "peak extra disk during the merge",
            f"{m['extra_disk_peak_bytes'] / 2**20:.1f} MiB",
            f"/ final {m['final_bytes'] / 2**30:.2f} GiB = {results['extra_disk_over_final']:.5f}",
        ],
        [
            "FEATURES.h5 itself",
            f"{m['main_file_bytes'] / 2**20:.2f} MiB",
            f"{maps['segment_files']} segment files, mappings per dataset "
            f"{sorted(set(maps['mappings_per_dataset'].values()))}",
        ],
        [
            f"read back ({f.ranks} ranks x {f.workers} workers, block_deal)",
            f"{r['read_s']:.1f} s",
            f"{r['read_rows_per_s']:,.0f} rows/s per core, {r['read_per_useful_byte']:.3f} bytes read per useful byte",
        ],
        ["virtual datasets vs the segment read directly", f"{r['virtual_over_direct']:.2f}x", "same chunks"],
    ]
    md = table(rows, ["step", "time", "figure"])
    md += (
        f"\n\n{f.rows:,} rows x {len(f.dims)} teachers (dims {', '.join(map(str, f.dims))}, image + text, float16), "
        f"{f.processes} writing processes, chunks of {f.chunk_rows} rows, HDF5 chunks of {f.h5_chunk_rows}; "
        f"load average {results['load_average']}\n"
    )
    print(md)
    write_results("scale_sim", f, results, md, json_copy=f.json)
    return results


if __name__ == "__main__":
    main()
