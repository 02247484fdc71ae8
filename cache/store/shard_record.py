"""The bad-shard record of a feature cache built from streamed shards: `FEATURES.h5.shards.json`.

Why a record of its own, not the cache's bad-row record: a bad row is a sample whose content is wrong, retried only
after the files are fixed (`--retry-bad`); a shard that failed to download is the transport's failure, so its rows
stay *missing* (not done, not bad) and a plain rerun retries exactly them. A shard that could not even be listed has
no rows to mark: it is outside the cache's rows, and the record keeps it out on reruns (`unlisted` pins the row
space: listing it later would change the corpus fingerprint and orphan the file). Why beside the file, not inside:
recording a failure must not rewrite the HDF5 file (its updates copy it whole, `cache.store.writer`); move the record
with the file. `distill info` and the `distill cache` summary show it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

_FORMAT = "biomed-distill bad shards"


def record_path(out: str) -> str:
    return out + ".shards.json"


@dataclass
class ShardRecord:
    unlisted: dict[str, str] = field(default_factory=dict)  # URL -> why: could not be listed, not in the rows
    unread: dict[str, str] = field(default_factory=dict)  # URL -> why: listed, its rows not cached yet

    def __bool__(self) -> bool:
        return bool(self.unlisted or self.unread)


def read_record(out: str) -> ShardRecord:
    """The record beside `out` (empty when there is none or it is unreadable: nothing then is pinned)."""
    try:
        with open(record_path(out), encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, ValueError):
        return ShardRecord()
    if d.get("format") != _FORMAT:
        return ShardRecord()
    return ShardRecord(dict(d.get("unlisted", {})), dict(d.get("unread", {})))


def write_record(out: str, record: ShardRecord) -> None:
    """Replace the record atomically; an empty record removes the file."""
    path = record_path(out)
    if not record:
        if os.path.exists(path):
            os.remove(path)
        return
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"format": _FORMAT, "version": 1, "unlisted": record.unlisted, "unread": record.unread}, f, indent=1)
    os.replace(tmp, path)


def record_lines(out: str, limit: int = 3) -> list[str]:
    """What the record says, with what to do, for `distill info` and the cache summary ([] without one)."""
    r, lines = read_record(out), []
    if r.unread:
        lines.append(
            f"bad shards: {len(r.unread)} could not be read; their rows are not cached yet "
            f"({record_path(out)}): rerun the same `distill cache` command to retry only them"
        )
        lines += [f"  {u}: {why}" for u, why in list(r.unread.items())[:limit]]
    if r.unlisted:
        lines.append(
            f"unlisted shards: {len(r.unlisted)} could not be listed when the cache was created and are "
            "not among its rows (their keys are unknown); once readable they join a new cache (another "
            "--out)"
        )
        lines += [f"  {u}: {why}" for u, why in list(r.unlisted.items())[:limit]]
    return lines
