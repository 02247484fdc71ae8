"""`distill cache` over streamed shards (`cache.sources.stream`): who lists and who reads which shard.

Why shards, not rows, are dealt: a remote shard can only be read front to back, so shard i goes to rank
i % world, and a rank's shards go to its DataLoader workers whole (the fewest rows first); each worker's batches
then request rows in stream order, and every shard is read once per run. Listing is dealt the same way (shard i
listed by rank i % world), so a corpus of many remote shards is listed by every process at once.
"""

from __future__ import annotations

import os

import numpy as np

from cache.build.dist import DistEnv
from cache.sources.corpus import Corpus, StreamCorpus, StreamOptions, is_stream_spec, open_corpus
from cache.sources.shard_io import Retry, shard_urls
from cache.sources.shard_listing import list_shards
from cache.store.shard_record import ShardRecord, read_record, record_lines, write_record


def open_for_cache(data: str, out: str, retry: Retry, env: DistEnv, progress: bool) -> Corpus:
    """The corpus of `data`; streamed shards are listed by all processes (shard i by rank i % world) first.

    With an existing cache the shards it records as unlisted stay out (its rows are fixed); a shard that fails
    listing in this run is left out on every rank alike (their failures are shared)."""
    if not is_stream_spec(data):
        return open_corpus(data)
    pinned = read_record(out).unlisted if os.path.exists(out) else {}
    urls = [u for u in shard_urls(data) if u not in pinned]
    failed = list_shards(urls[env.rank :: env.world], retry, progress=progress and env.main)
    for part in env.all_gather(failed):  # also the barrier: every listing is on disk before anyone opens them
        failed.update(part)
    return StreamCorpus(data, StreamOptions(retry, skip={**pinned, **failed}))


def note_unlisted(out: str, corpus: Corpus) -> None:
    """Before a new file fixes the rows: record the shards left out of them (lock holder only)."""
    if isinstance(corpus, StreamCorpus) and not os.path.exists(out):
        write_record(out, ShardRecord(unlisted=dict(corpus.unlisted)))


def stream_plan(
    corpus: StreamCorpus, rows: np.ndarray, env: DistEnv, workers: int, batch_size: int, chunk_rows: int
) -> tuple[np.ndarray, list[list[int]], set[int]]:
    """(this rank's rows in worker stream order, batches as positions into them, batches that end a chunk).

    The DataLoader hands batch k to worker k % workers, so batches are interleaved that way, with empty batches
    where a worker has run out; a chunk is committed once it holds `chunk_rows` rows (and at the end)."""
    shard = corpus.shard_of[rows]
    mine = rows[shard % env.world == env.rank]
    w = max(1, workers)
    owned: list[list[np.ndarray]] = [[] for _ in range(w)]
    sizes = np.zeros(w, dtype=np.int64)
    for s in np.unique(corpus.shard_of[mine]).tolist():
        part = mine[corpus.shard_of[mine] == s]
        k = int(np.argmin(sizes))
        owned[k].append(part)
        sizes[k] += len(part)
    streams = [np.concatenate(p) if p else np.zeros(0, np.int64) for p in owned]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    n_batches = max((-(-len(s) // batch_size) for s in streams), default=0)
    batches, ends, since = [], set(), 0
    for b in range(n_batches):
        for k in range(w):
            lo, hi = b * batch_size, min((b + 1) * batch_size, len(streams[k]))
            batches.append(list(range(offsets[k] + lo, offsets[k] + hi)) if lo < hi else [])
            since += max(0, hi - lo)
            if since >= chunk_rows:
                ends.add(len(batches) - 1)
                since = 0
    if batches:
        ends.add(len(batches) - 1)
    return (np.concatenate(streams) if streams else np.zeros(0, np.int64)).astype(np.int64), batches, ends


def finish(out: str, corpus: Corpus, unread: dict[str, str], env: DistEnv) -> list[str]:
    """Share every rank's unreadable shards, record them (rank 0) and return the summary's lines about them."""
    if not isinstance(corpus, StreamCorpus):
        return []
    corpus.close()
    for part in env.all_gather(unread):
        unread.update(part)
    if not env.main:
        return []
    record = read_record(out)
    write_record(out, ShardRecord(record.unlisted or dict(corpus.unlisted), dict(sorted(unread.items()))))
    return record_lines(out)
