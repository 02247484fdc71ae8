"""Block dealing (data.sampler=block_deal): blocks dealt to (rank, worker) pairs so that, across R ranks x W
workers, every row is used once per epoch and every feature block is read by exactly one pair, once."""

from __future__ import annotations

from collections import Counter

import h5py
import numpy as np
import pytest
from accelerate.data_loader import BatchSamplerShard
from torch.utils.data import BatchSampler, DataLoader, Dataset, get_worker_info

import cache.store.writer as W
from cache import FeatureReader
from distill.config.train_config import DataCfg
from distill.data.samplers import Dealing, EpochSampler, reader_blocks
from distill.training.build_run import build_sampler

BLOCK, BUFFER, BATCH = 64, 2, 16


def _cache(path: str, n: int, chunk: int = BLOCK) -> str:
    """A finished float16 cache of n rows, two teachers, chunks of `chunk` rows."""
    W.create_file(path, [f"k{i}" for i in range(n)], fingerprint="fp", source="synthetic")
    rng = np.random.default_rng(0)
    with h5py.File(path, "r+") as f:
        for name, d in (("a", 8), ("b", 4)):
            meta = {
                "attrs": {"spec": f"synthetic:{name}", "embed_dim": d, "logit_scale": 100.0, "views": 0},
                "dtype": "float16",
                "h5_chunk_rows": chunk,
            }
            g = W._ensure_group(f, name, meta)
            g["image"][...] = rng.standard_normal((n, d)).astype(np.float16)
            g["text"][...] = rng.standard_normal((n, d)).astype(np.float16)
            g["done"][...] = True
    return path


def _sampler(n: int, ranks: int, workers: int, seed: int = 7) -> EpochSampler:
    return EpochSampler(
        n,
        seed,
        lambda e: BATCH * ranks,
        block_ids=np.arange(n) // BLOCK,
        buffer_blocks=BUFFER,
        dealing=Dealing(ranks, workers, BATCH),
    )


def _pair_batches(sampler: EpochSampler, ranks: int, workers: int) -> dict[tuple[int, int], list[list[int]]]:
    """Each (rank, worker)'s batches of dataset indices, split as Accelerate (batch g to rank g % R) and the
    DataLoader (a rank's batch j to worker j % W) split them."""
    out = {}
    for r in range(ranks):
        shard = BatchSamplerShard(
            BatchSampler(sampler, BATCH, drop_last=True),
            num_processes=ranks,
            process_index=r,
            split_batches=False,
            even_batches=True,
        )
        local = [[i for _, i in b] for b in shard]
        for w in range(workers):
            out[(r, w)] = local[w::workers]
    return out


def _read_all(
    path: str, pairs: dict[tuple[int, int], list[list[int]]], unit: int = BLOCK, held: int = BUFFER
) -> dict[tuple[int, int], Counter]:
    """Reads every pair's batches with its own block-cached reader (as its Collate would); its block reads."""
    reads = {}
    for pair, batches in pairs.items():
        with FeatureReader(path, block_rows=unit, cache_blocks=held) as reader:
            for b in batches:
                reader.read(b)
            reads[pair] = reader.block_reads
    return reads


@pytest.mark.parametrize("ranks,workers", [(2, 3), (1, 1), (4, 2)])
def test_every_row_once_and_every_block_read_by_one_pair(tmp_path, ranks, workers):
    n = ranks * workers * 4 * BLOCK  # 4 blocks per pair: no remainder
    path = _cache(str(tmp_path / "f.h5"), n)
    pairs = _pair_batches(_sampler(n, ranks, workers), ranks, workers)
    rows = [i for batches in pairs.values() for b in batches for i in b]
    assert sorted(rows) == list(range(n))  # every row exactly once per epoch
    reads = _read_all(path, pairs)
    total = sum(reads.values(), Counter())
    assert total == Counter({(t, k): 1 for t in ("a", "b") for k in range(n // BLOCK)})  # each block read once
    for pair, got in reads.items():  # ... by one pair, which holds 4 of them
        assert len({k for _, k in got}) == 4, pair


def test_uneven_rows_are_used_once_up_to_the_cut_and_reread_little(tmp_path):
    n, ranks, workers = 1000, 2, 2  # 15.6 blocks for 4 pairs: a partial block and a remainder
    path = _cache(str(tmp_path / "f.h5"), n)
    s = _sampler(n, ranks, workers)
    assert len(s) == n // (BATCH * ranks) * BATCH * ranks == 992  # the cut to whole global batches: 8 rows
    pairs = _pair_batches(s, ranks, workers)
    rows = [i for batches in pairs.values() for b in batches for i in b]
    assert len(rows) == len(set(rows)) == 992 and set(rows) == set(s.order()[:992].tolist())
    total = sum(_read_all(path, pairs).values(), Counter())
    blocks = -(-n // BLOCK)
    assert {k for _, k in total} == set(range(blocks))
    # re-read only: blocks split to even out the pairs (<= 1 per pair) and the leftover's (< pairs x batch rows)
    per_teacher = sum(total.values()) // 2
    assert blocks < per_teacher <= blocks + 2 * ranks * workers and max(total.values()) <= 3


def test_order_is_seeded_shuffled_and_differs_by_epoch():
    n = 4 * 6 * BLOCK
    s = _sampler(n, 2, 3)
    a = s.order()
    assert sorted(a.tolist()) == list(range(n)) and not np.array_equal(a, np.arange(n))
    np.testing.assert_array_equal(a, _sampler(n, 2, 3).order())  # same seed, same order
    assert not np.array_equal(a, _sampler(n, 2, 3, seed=8).order())
    s.set_epoch(1)
    b = s.order()
    assert sorted(b.tolist()) == list(range(n)) and not np.array_equal(a, b)
    first = a[:BATCH] // BLOCK  # a batch holds rows of its pair's buffer only, shuffled within it
    assert len(set(first.tolist())) <= BUFFER and not np.array_equal(a[:BATCH], np.sort(a[:BATCH]))


class _WhoReads(Dataset):
    def __len__(self):
        return 10_000

    def __getitem__(self, item):
        return item[1], get_worker_info().id


@pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")  # 3 workers on purpose, even on 2 cores
def test_dataloader_workers_receive_their_own_blocks():
    """The DataLoader really hands batch j to worker j % W (the dealing's assumption)."""
    n, workers = 3 * 4 * BLOCK, 3
    s = _sampler(n, 1, workers)
    owner: dict[int, int] = {}
    for rows, who in DataLoader(_WhoReads(), batch_size=BATCH, sampler=s, num_workers=workers, drop_last=True):
        for block, w in zip((rows // BLOCK).tolist(), who.tolist()):
            assert owner.setdefault(block, w) == w, block
    assert sorted(Counter(owner.values()).values()) == [4, 4, 4]


def test_build_sampler_deals_for_the_run_s_processes_and_workers():
    cfg = DataCfg(sampler="block_deal", block_rows=BLOCK, batch_size=BATCH, num_workers=0, shuffle_buffer_blocks=BUFFER)
    s = build_sampler(cfg, None, 1000, lambda e: BATCH * 8, seed=0, ranks=8)
    assert s.dealing == Dealing(8, 1, BATCH)  # 0 workers: the main process reads
    assert (
        build_sampler(cfg.model_copy(update={"sampler": "block_shuffle"}), None, 1000, lambda e: 8, seed=0).dealing
        is None
    )
    with pytest.raises(ValueError, match="give block_ids"):
        EpochSampler(10, 0, lambda e: 1, dealing=Dealing(1, 1, 1))
    with pytest.raises(ValueError, match=">= 1"):
        Dealing(0, 1, 1)


def test_dealt_readers_read_chunks_so_a_split_block_costs_at_most_a_chunk(tmp_path):
    n, ranks, workers, chunk = 1000, 2, 2, 16  # blocks of 64 rows split to even out the pairs
    assert reader_blocks(BLOCK, BUFFER, chunk, dealt=True) == (chunk, BUFFER * BLOCK // chunk)  # same rows held
    assert reader_blocks(BLOCK, BUFFER, chunk, dealt=False) == (BLOCK, BUFFER)  # shuffled: every pair reads all
    assert reader_blocks(BLOCK, BUFFER, 48, dealt=True) == (BLOCK, BUFFER)  # chunks that do not tile a block
    path = _cache(str(tmp_path / "f.h5"), n, chunk=chunk)
    pairs = _pair_batches(_sampler(n, ranks, workers), ranks, workers)
    used = sum(len(b) for batches in pairs.values() for b in batches)
    whole = sum(_read_all(path, pairs).values(), Counter())
    unit, held = reader_blocks(BLOCK, BUFFER, chunk, dealt=True)
    chunks = sum(_read_all(path, pairs, unit, held).values(), Counter())

    def rows_read(reads, rows):
        return sum(min(rows, n - k * rows) * c for (t, k), c in reads.items() if t == "a")

    # whole blocks re-read a block per split; chunks re-read at most a chunk per split and per leftover batch
    assert rows_read(chunks, chunk) < rows_read(whole, BLOCK)
    assert rows_read(chunks, chunk) <= n + 2 * ranks * workers * chunk + (n - used)
    assert max(chunks.values()) <= 3 and {k for _, k in chunks} == set(range(-(-n // chunk)))
