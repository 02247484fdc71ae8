"""The feature reader's block cache and the block-shuffled training order: same values as direct reads, each
block read once per epoch, orders reproducible per (seed, epoch), and the config knobs that choose them."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

import cache.store.writer as W
from cache import FeatureReader
from cache.store.reader import block_shuffle_order
from distill.config.train_config import Config, ConfigError, DataCfg
from distill.data.cache_join import CacheJoin
from distill.data.samplers import EpochSampler
from distill.training.build_run import build_sampler, sampler_kind

N, CHUNK = 1000, 64
TEACHERS = {"a": (8, 0), "b": (6, 3)}  # name -> (dim, views)


@pytest.fixture(scope="module")
def feature_file(tmp_path_factory):
    """A finished float16 cache of N rows in the writer's layout (chunks of CHUNK rows); its values as numpy."""
    path = str(tmp_path_factory.mktemp("reader") / "features.h5")
    W.create_file(path, [f"k{i}" for i in range(N)], fingerprint="fp", source="synthetic")
    rng = np.random.default_rng(0)
    values = {}
    with h5py.File(path, "r+") as f:
        for name, (d, k) in TEACHERS.items():
            meta = {
                "attrs": {"spec": f"synthetic:{name}", "embed_dim": d, "logit_scale": 100.0, "views": k},
                "dtype": "float16",
                "h5_chunk_rows": CHUNK,
            }
            g = W._ensure_group(f, name, meta)  # the datasets and chunks a fold creates
            image = rng.standard_normal((N, k, d) if k else (N, d)).astype(np.float16)
            text = rng.standard_normal((N, d)).astype(np.float16)
            g["image"][...], g["text"][...], g["done"][...] = image, text, True
            values[name] = (image, text)
    return path, values


def _nbytes(values) -> int:
    return sum(x.nbytes for image, text in values.values() for x in (image, text))


@pytest.mark.parametrize("block_rows,cache_blocks", [(0, 16), (64, 1), (192, 4), (1000, 2), (4096, 16)])
def test_block_reads_equal_the_stored_rows(feature_file, block_rows, cache_blocks):
    path, values = feature_file
    rows = np.array([999, 3, 3, 640, 0, 65, 63, 500, 999, 128])
    views = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    with FeatureReader(path, block_rows=block_rows, cache_blocks=cache_blocks) as reader:
        assert reader.chunk_rows == CHUNK
        for _ in range(2):  # the second pass comes (partly) from the block cache
            got = reader.read(rows)
            picked = reader.read(rows, views=views)
            for t, (image, text) in values.items():
                assert got[t]["image"].dtype == np.float32 and got[t]["text"].dtype == np.float32
                np.testing.assert_array_equal(got[t]["image"], image[rows].astype(np.float32))
                np.testing.assert_array_equal(got[t]["text"], text[rows].astype(np.float32))
                want = image[rows, views] if image.ndim == 3 else image[rows]
                np.testing.assert_array_equal(picked[t]["image"], want.astype(np.float32))
        assert reader.read(np.zeros(0, dtype=np.int64))["a"]["text"].shape == (0, 8)
        assert list(reader.read([5], teachers=["b"])) == ["b"]
        with pytest.raises(IndexError, match=r"\[0, 1000\)"):
            reader.read([N])
        with pytest.raises(IndexError, match="3 views"):
            reader.read([1, 2], views=[0, 3])


def test_block_shuffled_epoch_reads_each_block_once(feature_file):
    path, values = feature_file
    order = EpochSampler(N, seed=3, global_batch_of=lambda e: 1, block_ids=np.arange(N) // 128, buffer_blocks=4).order()
    with FeatureReader(path, block_rows=128, cache_blocks=4) as reader:
        for i in range(0, N, 50):
            reader.read(order[i : i + 50])
        assert reader.bytes_read == _nbytes(values)  # read/useful = 1 exactly
    with FeatureReader(path, block_rows=128, cache_blocks=1) as small:  # the LRU cannot hold the buffer
        for i in range(0, N, 50):
            small.read(order[i : i + 50])
        assert small.bytes_read > 2 * _nbytes(values)


def test_block_reader_is_fork_safe_in_dataloader_workers(feature_file):
    path, values = feature_file
    reader = FeatureReader(path, teachers=["a"], block_rows=128, cache_blocks=2)
    reader.read([0, 700])  # a handle and blocks in the parent must not be reused across the fork

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return 40

        def __getitem__(self, i):
            return torch.from_numpy(reader.read([(i * 37) % N])["a"]["text"][0])

    got = torch.cat([b for b in torch.utils.data.DataLoader(DS(), batch_size=8, num_workers=2)]).numpy()
    np.testing.assert_array_equal(got, values["a"][1][(np.arange(40) * 37) % N].astype(np.float32))
    reader.close()
    with pytest.raises(ValueError, match="block_rows must be >= 0"):
        FeatureReader(path, block_rows=-1)


def test_block_shuffle_order_keeps_whole_blocks_in_each_buffer():
    ids = np.repeat([7, 2, 9, 4, 0, 5, 11], [5, 5, 3, 5, 5, 5, 1])  # uneven blocks, gaps (bad rows removed)
    a = block_shuffle_order(ids, 3, np.random.default_rng((1, 0)))
    assert sorted(a.tolist()) == list(range(len(ids)))
    np.testing.assert_array_equal(a, block_shuffle_order(ids, 3, np.random.default_rng((1, 0))))
    assert not np.array_equal(a, block_shuffle_order(ids, 3, np.random.default_rng((1, 1))))
    sizes = {b: int((ids == b).sum()) for b in np.unique(ids)}
    start = 0
    blocks_seen = []
    while start < len(a):  # consecutive buffers of 3 whole blocks (the last may have fewer)
        blocks = []
        n = 0
        for b in ids[a[start:]]:
            if b not in blocks:
                if len(blocks) == 3:
                    break
                blocks.append(int(b))
            n += 1
        assert n == sum(sizes[b] for b in blocks)
        blocks_seen += blocks
        start += n
    assert sorted(blocks_seen) == sorted(sizes)  # each block in exactly one buffer


def _gb(epoch: int) -> int:
    return 96 if epoch == 0 else 192


def test_epoch_sampler_block_shuffle_is_reproducible_and_cut_to_global_batches():
    cache_rows = np.flatnonzero(np.arange(N) % 10 != 3)  # 900 usable rows, cache rows with gaps
    ids = cache_rows // 128
    s = EpochSampler(len(cache_rows), seed=5, global_batch_of=_gb, block_ids=ids, buffer_blocks=2)
    e0 = list(s)
    assert len(e0) == len(s) == 900 // 96 * 96 and {e for e, _ in e0} == {0}
    idx = np.array([i for _, i in e0])
    assert len(set(idx.tolist())) == len(idx)
    assert len(np.unique(ids[idx[:96]])) <= 2  # the first global batch draws from one buffer of 2 blocks
    again = EpochSampler(len(cache_rows), seed=5, global_batch_of=_gb, block_ids=ids, buffer_blocks=2)
    assert list(again) == e0  # a resumed run sees the same order
    s.set_epoch(1)
    e1 = [i for _, i in s]
    assert len(e1) == 900 // 192 * 192 and e1[:96] != idx[:96].tolist()
    rand = EpochSampler(len(cache_rows), seed=5, global_batch_of=_gb)
    want = torch.randperm(900, generator=torch.Generator().manual_seed(5))[:864].tolist()
    assert [i for _, i in rand] == want  # the random order is unchanged
    with pytest.raises(ValueError, match="block_ids has 3 entries"):
        EpochSampler(4, 0, _gb, block_ids=np.zeros(3))


def test_epoch_sampler_block_order_is_a_reproducible_permutation_of_whole_blocks():
    """What the removed cache.BlockShuffleSampler's test showed, on the trainer's sampler (the one that is used)."""
    s = EpochSampler(100, seed=1, global_batch_of=lambda e: 1, block_ids=np.arange(100) // 10, buffer_blocks=2)
    a = [i for _, i in s]
    assert sorted(a) == list(range(100)) and a != list(range(100)) and [i for _, i in s] == a
    s.set_epoch(1)
    assert [i for _, i in s] != a
    assert len({x // 10 for x in a[:20]}) == 2  # the first buffer holds exactly two whole blocks


def _cfg(mode="hybrid", **data) -> DataCfg:
    d = {"mode": mode, "data": {"corpus": "c.csv", "features": None if mode == "contrastive" else "f.h5", **data}}
    if mode == "contrastive":
        d["loss"] = {"terms": []}
    return Config.from_dict(d).data


def _join(chunk_rows=64) -> CacheJoin:
    rows = np.arange(N)
    return CacheJoin(rows, rows, {}, None, 0, chunk_rows)


def test_sampler_config_chooses_and_validates():
    assert sampler_kind(_cfg(), True) == "block_shuffle" and sampler_kind(_cfg("contrastive"), False) == "random"
    assert sampler_kind(_cfg(sampler="random"), True) == "random"
    s = build_sampler(_cfg(block_rows=256, shuffle_buffer_blocks=2), _join(), N, _gb, seed=0)
    np.testing.assert_array_equal(s.block_ids, np.arange(N) // 256)
    assert s.buffer_blocks == 2
    assert build_sampler(_cfg("contrastive"), None, N, _gb, seed=0).block_ids is None
    own = build_sampler(_cfg("contrastive", sampler="block_shuffle", block_rows=100), None, N, _gb, seed=0)
    np.testing.assert_array_equal(own.block_ids, np.arange(N) // 100)  # blocks of corpus rows, no cache
    with pytest.raises(ConfigError, match=r"data.block_rows=100 is not a multiple .* 64 rows.*block_rows=128"):
        build_sampler(_cfg(block_rows=100), _join(), N, _gb, seed=0)
    assert build_sampler(_cfg(block_rows=2000), _join(), N, _gb, seed=0).block_ids.max() == 0  # one block: any size
    for bad, msg in [
        ({"sampler": "blocks"}, "data.sampler must be one of"),
        ({"block_rows": 0}, "block_rows"),
        ({"shuffle_buffer_blocks": 0}, "shuffle_buffer_blocks"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            _cfg(**bad)
