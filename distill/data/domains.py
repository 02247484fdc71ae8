"""Each corpus row's domain as a small integer: the lookup behind domain-balanced sampling (`data.domain_balance`),
the rows seen per domain in log.jsonl (`rows_per_domain`) and domain-local loss terms (`scope: domain`).

Why one module: the sampler, the counts and the loss must agree on which id is which domain, in every process and
in a resumed run; ids are the sorted distinct names, so they depend on the column's values only, never on row
order, process or worker.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from cache.sources.corpus import CorpusError
from distill.data.loader import DataError
from distill.data.samplers import DomainBalance, EpochSampler
from teachers.kernel.config_model import ConfigError

log = logging.getLogger(__name__)


def domain_ids(corpus, column: str = "domain", key: str = "data.domain_column") -> tuple[np.ndarray, list[str]]:
    """(ids, names): ids[i] (int64) is corpus row i's domain, `names[ids[i]]` its text; names sorted.

    A corpus without the column (or without extra columns at all: WebDataset) or a row whose cell is empty raises a
    one-line DataError naming `key` and the column (and the first such row). Cells are stripped of surrounding
    whitespace.
    """
    try:
        cells = corpus.column(column)
    except CorpusError as e:
        raise DataError(f"{key}={column!r}: {e}") from None
    values = np.array([c.strip() for c in cells], dtype=object)
    empty = np.flatnonzero(values == "")
    if len(empty):
        raise DataError(
            f"{key}={column!r}: {len(empty)} row(s) have an empty {column!r} cell (first: "
            f"{corpus.describe(int(empty[0]))}); fill every cell, or name another column in {key}"
        )
    if not len(values):
        return np.zeros(0, dtype=np.int64), []
    names, ids = np.unique(values.astype(str), return_inverse=True)
    return np.asarray(ids, dtype=np.int64).reshape(-1), [str(n) for n in names]


@dataclass(frozen=True)
class Domains:
    """The corpus's domains: `names[ids[row]]` is corpus row `row`'s value of `column`."""

    column: str
    names: list[str]
    ids: np.ndarray  # (N_corpus,) int64, indexed by corpus row


def load_domains(data, corpus, streamed: bool = False) -> Domains | None:
    """The domains of `data.domain_column` (a `DataCfg`), or None where the run has none to count or balance.

    data.domain_balance = 1 (proportional): the column is optional; without it (or with empty cells) the run just
    logs no rows_per_domain. Below 1 it is required (one-line DataError naming data.domain_column), and a streamed
    corpus is refused: its shards are read front to back, so rows cannot be drawn by domain.
    """
    if data.domain_balance < 1 and streamed:
        raise ConfigError(
            f"data.domain_balance={data.domain_balance:g} draws rows by domain, which a streamed corpus "
            f"({corpus.source}; data.sampler={data.sampler} reads whole shards in order) cannot do; "
            "set data.domain_balance=1 or train from a local CSV/TSV/JSONL corpus"
        )
    try:
        ids, names = domain_ids(corpus, data.domain_column)
    except DataError as e:
        if data.domain_balance < 1:
            raise DataError(f"data.domain_balance={data.domain_balance:g} needs each row's domain: {e}") from None
        log.info("no rows_per_domain in log.jsonl: %s", e)
        return None
    return Domains(data.domain_column, names, ids)


def build_balance(data, domains: Domains | None, corpus_rows: np.ndarray) -> DomainBalance | None:
    """The sampler's DomainBalance over the training rows (`corpus_rows`: each dataset item's corpus row); None at
    data.domain_balance=1 (the plain order, unchanged) or when the training rows have a single domain (a warning:
    n^alpha / n^alpha = 1, so balance changes nothing)."""
    if data.domain_balance >= 1 or domains is None:
        return None
    ids = domains.ids[np.asarray(corpus_rows, dtype=np.int64)]
    present = np.unique(ids)
    if len(present) < 2:
        log.warning(
            "data.domain_balance=%g has no effect: every training row has %s %r; training in the plain order",
            data.domain_balance,
            domains.column,
            domains.names[int(present[0])] if len(present) else "",
        )
        return None
    return DomainBalance(ids, data.domain_balance)


class DomainCounter:
    """Rows seen per domain, counted from the batches the trainer takes (`TrainBatch.rows`, corpus rows) on the
    device (no host sync per step), summed over processes when read. A resumed run starts from the counts of the
    rows its sampler scheduled before the resume point, so its log equals an uninterrupted run's."""

    def __init__(self, domains: Domains, device, base: np.ndarray | None = None):
        self.names = list(domains.names)
        self.lookup = torch.as_tensor(domains.ids, dtype=torch.int32, device=device)  # by corpus row
        self.counts = torch.zeros(len(self.names), dtype=torch.int64, device=device)
        self.base = np.zeros(len(self.names), dtype=np.int64) if base is None else np.asarray(base, dtype=np.int64)

    def add(self, rows: torch.Tensor) -> None:
        """Count one batch's corpus rows (this process's share)."""
        rows = rows.to(self.lookup.device)
        self.counts.scatter_add_(0, self.lookup[rows].long(), torch.ones_like(rows, dtype=torch.int64))

    def read(self, accelerator) -> dict[str, int]:
        """{domain: rows seen since step 0 by all processes}; a collective: call it on every process alike."""
        total = accelerator.reduce(self.counts, "sum").cpu().numpy() + self.base
        return {n: int(c) for n, c in zip(self.names, total.tolist())}


def scheduled_counts(
    sampler: EpochSampler, domain_of_item: np.ndarray, epoch: int, items: int, num_domains: int
) -> np.ndarray:
    """Rows per domain the sampler scheduled before item `items` of epoch `epoch` (all earlier epochs whole): what
    an uninterrupted run has counted when it reaches that point (the resume point)."""
    out = np.zeros(num_domains, dtype=np.int64)
    for e in range(epoch + 1):
        done = sampler.epoch_items(e)
        done = done if e < epoch else done[:items]
        out += np.bincount(domain_of_item[done], minlength=num_domains)
    return out
