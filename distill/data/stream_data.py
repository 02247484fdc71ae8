"""Training from a streamed corpus (`cache.sources.stream.StreamCorpus`): the epoch order that lets every
DataLoader worker read its shards front to back.

Why still a map-style dataset with a sampler, not an IterableDataset: the sampler fixes the whole epoch order from
(seed, epoch) alone, so crops stay per-sample seeded (`distill.data.loader.sample_generator`), a resumed run skips into
the same order (`skip_first_batches`), and Accelerate deals batches to ranks as for local corpora. The order is
made for streaming: shards are dealt whole to (rank, worker) pairs (`distill.data.samplers.deal_order` with a shard as
the block: each shard is read by one pair, bar about one shard per pair split to even the pairs out), and each
pair's rows are its shards in stream order passed through a shuffle buffer of `data.stream_buffer` rows (as
webdataset's `shuffle(n)`), so the worker's corpus cursor only ever keeps that window of samples read ahead.
"""

from __future__ import annotations

from typing import cast

import numpy as np

from cache.sources.corpus import StreamOptions, is_stream_spec, open_corpus
from cache.sources.shard_io import Retry
from cache.store.shard_record import read_record
from distill.config.train_config import ConfigError, DataCfg
from distill.data.samplers import Dealing, EpochSampler, deal_order


def buffer_shuffle(n: int, buffer: int, rng: np.random.Generator) -> np.ndarray:
    """A permutation of 0..n-1 made by a shuffle buffer: fill `buffer` slots in order, then repeatedly emit a
    random slot and refill it with the next index; the last ones leave in random order. Any index leaves at most
    `buffer` positions before it arrives, so a reader of the order keeps at most `buffer` items read ahead."""
    if buffer <= 1 or n <= 1:
        return np.arange(n)
    out = np.empty(n, dtype=np.int64)
    slots = list(range(min(buffer, n)))
    nxt = len(slots)
    picks = rng.integers(0, 1 << 62, size=n).tolist()
    for k in range(n):
        j = picks[k] % len(slots)
        out[k] = slots[j]
        if nxt < n:  # refill the slot with the next index of the stream
            slots[j], nxt = nxt, nxt + 1
        else:  # the stream has ended: the buffer drains
            slots[j] = slots[-1]
            slots.pop()
    return out


def stream_order(shard_ids: np.ndarray, dealing: Dealing, buffer: int, rng: np.random.Generator) -> np.ndarray:
    """deal_order with shards as blocks, each pair's rows then put in stream order through a shuffle buffer.

    Items are dataset indices, increasing in corpus (stream) order within a shard; the tail that deal_order leaves
    to whichever pair reads it stays in shard order."""
    order = deal_order(shard_ids, 1, dealing, rng)
    b, pairs = dealing.batch_size, dealing.pairs
    dealt = len(shard_ids) // (pairs * b) * b * pairs  # deal_order's evened-out part
    pair_of = np.repeat([dealing.pair_of_batch(g) for g in range(dealt // b)], b)
    for p in range(pairs):
        pos = np.flatnonzero(pair_of == p)
        rows = order[pos]
        first: dict[int, int] = {}  # the order in which this pair meets its shards
        for s in shard_ids[rows].tolist():
            first.setdefault(s, len(first))
        rank = np.array([first[s] for s in shard_ids[rows].tolist()], dtype=np.int64)
        streamed = rows[np.lexsort((rows, rank))]
        order[pos] = streamed[buffer_shuffle(len(streamed), buffer, rng)]
    return order


class StreamSampler(EpochSampler):
    """EpochSampler whose order is `stream_order` (seeded by (seed, epoch); depends on processes, workers and the
    per-device batch, as block_deal does)."""

    def __init__(self, shard_ids: np.ndarray, seed: int, global_batch_of, dealing: Dealing, buffer: int):
        super().__init__(len(shard_ids), seed, global_batch_of, block_ids=shard_ids, buffer_blocks=1, dealing=dealing)
        self.buffer = int(buffer)

    def order(self) -> np.ndarray:
        # built with both (shard ids, dealing)
        return stream_order(
            cast(np.ndarray, self.block_ids),
            cast(Dealing, self.dealing),
            self.buffer,
            np.random.default_rng((self.seed, self.epoch)),
        )


def stream_sampler(
    data: DataCfg, corpus, corpus_rows: np.ndarray, global_batch_of, *, seed: int, ranks: int
) -> StreamSampler:
    """The sampler of a streamed corpus's training rows (`corpus_rows`: the dataset's corpus row of each item)."""
    if data.sampler not in ("auto", "block_deal"):
        raise ConfigError(
            f"data.sampler={data.sampler} needs random access, which streamed shards "
            f"({corpus.source}) do not give; use data.sampler=auto (shards dealt to ranks and "
            "workers, shuffled within data.stream_buffer rows)"
        )
    dealing = Dealing(ranks, max(1, data.num_workers), data.batch_size)
    return StreamSampler(corpus.shard_of[np.asarray(corpus_rows)], seed, global_batch_of, dealing, data.stream_buffer)


def open_train_corpus(data: DataCfg, accelerator):
    """The training corpus. Streamed shards: listed by the main process first (the others then read its
    listings), the shards the cache records as unlisted left out as they were when it was built, and each worker
    keeping up to 2 x data.stream_buffer samples read ahead."""
    if not is_stream_spec(data.corpus):
        return open_corpus(data.corpus)
    skip = read_record(data.features).unlisted if data.features else {}
    options = StreamOptions(Retry(data.shard_attempts), skip=skip, read_ahead=2 * data.stream_buffer)
    with accelerator.main_process_first():
        return open_corpus(data.corpus, options)
