"""The trainer's epoch order: one order per (seed, epoch), the same in every process, worker and resumed run."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
from torch.utils.data import Sampler

from cache.store.reader import block_shuffle_order


@dataclass(frozen=True)
class Dealing:
    """Who reads which batch: Accelerate deals a loader's batches of `batch_size` to ranks round-robin (global
    batch g to rank g % ranks) and each rank's DataLoader hands its batches to its `workers` round-robin (0
    workers: the main process, counted as 1)."""

    ranks: int
    workers: int
    batch_size: int  # per device (data.batch_size)

    def __post_init__(self):
        if min(self.ranks, self.workers, self.batch_size) < 1:
            raise ValueError(f"Dealing needs ranks, workers and batch_size >= 1; got {self}")

    @property
    def pairs(self) -> int:
        return self.ranks * self.workers

    def pair_of_batch(self, g: int) -> int:
        """The (rank, worker) pair, as rank * workers + worker, that reads global batch g."""
        return (g % self.ranks) * self.workers + (g // self.ranks) % self.workers


def deal_order(block_ids: np.ndarray, buffer_blocks: int, dealing: Dealing, rng: np.random.Generator) -> np.ndarray:
    """Positions 0..n-1 in an order where every block is read by one (rank, worker) pair, bar a few.

    Blocks, in a seeded random order, go to the pair with the fewest rows so far. Every pair then gets exactly
    T rows, T the largest multiple of batch_size with pairs x T <= n: a pair over T hands rows of its last block
    to the pair furthest under T (that block is then read by both: at most about one block per pair), and
    what is left over (fewer than pairs x batch_size rows) goes last, in block order, read by whichever pair
    its batches fall to. Each pair's rows are block-shuffled (`block_shuffle_order`: shuffled within buffers
    of `buffer_blocks` of its blocks), and global batch g is the next batch of `dealing.pair_of_batch(g)`.
    """
    block_ids = np.asarray(block_ids).reshape(-1)
    if len(block_ids) == 0:
        return np.zeros(0, dtype=np.int64)
    pos = np.argsort(block_ids, kind="stable")
    starts = np.flatnonzero(np.r_[True, block_ids[pos][1:] != block_ids[pos][:-1]])
    groups = np.split(pos, starts[1:])
    p_n, b = dealing.pairs, dealing.batch_size
    sizes = np.zeros(p_n, dtype=np.int64)
    owned: list[list[np.ndarray]] = [[] for _ in range(p_n)]
    for i in rng.permutation(len(groups)).tolist():
        p = int(np.argmin(sizes))  # the first pair with the fewest rows
        owned[p].append(groups[i])
        sizes[p] += len(groups[i])
    target = len(block_ids) // (p_n * b) * b
    left: list[np.ndarray] = []
    for d in np.argsort(-sizes, kind="stable").tolist():  # the largest pairs give their rows over the target
        while sizes[d] > target:
            r = int(np.argmin(sizes))
            k = int(sizes[d] - target) if sizes[r] >= target else int(min(sizes[d] - target, target - sizes[r]))
            last = owned[d][-1]
            give, owned[d][-1] = last[max(0, len(last) - k) :], last[: max(0, len(last) - k)]
            if not len(owned[d][-1]):
                owned[d].pop()
            (left if sizes[r] >= target else owned[r]).append(give)
            sizes[d] -= len(give)
            if sizes[r] < target:
                sizes[r] += len(give)
    streams = []
    for blocks in owned:
        mine = np.concatenate(blocks) if blocks else np.zeros(0, dtype=np.int64)
        streams.append(mine[block_shuffle_order(block_ids[mine], buffer_blocks, rng)])
    order = [streams[dealing.pair_of_batch(g)][(g // p_n) * b : (g // p_n + 1) * b] for g in range(target // b * p_n)]
    if left:
        rest = np.concatenate(left)
        order.append(rest[np.argsort(block_ids[rest], kind="stable")])
    return np.concatenate(order).astype(np.int64)


_BALANCE_STREAM = 17  # seeds the balanced draws apart from the (seed, epoch) shuffle of the order itself


class DomainBalance:
    """Domain-balanced draws for one epoch: domain d is drawn with probability p_d proportional to n_d^alpha (n_d:
    its rows), rows within a domain uniformly (data.domain_balance, data.domain_column).

    An epoch stays `len(ids)` draws (the usable rows), so steps per epoch do not change. Domain d gets a quota q_d
    of them: N p_d rounded by largest remainder (ties to the lower id), so every epoch holds exactly q_d rows of d.
    Its rows come from an endless stream of permutations of its rows, seeded by (seed, d, cycle) and read on from
    where the previous epoch stopped: every row of d shows once per pass over d, so a small domain repeats a row
    only after showing all of its rows, and a large one shows every row within ceil(n_d / q_d) epochs (an epoch
    that crosses into its next pass may show a row twice). The draws are then laid out along a seeded shuffle of
    the epoch's domain labels, so a batch of the random sampler has hypergeometric domain counts around B p_d.
    Depends on (seed, epoch) only, never on processes, workers or resumption.
    """

    def __init__(self, ids: np.ndarray, alpha: float):
        self.ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        self.alpha = float(alpha)
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"domain balance alpha must be in [0, 1], got {alpha}")
        if len(self.ids) and self.ids.min() < 0:
            raise ValueError("domain ids must be >= 0")
        self.sizes = np.bincount(self.ids) if len(self.ids) else np.zeros(0, dtype=np.int64)
        self.members = [np.flatnonzero(self.ids == d) for d in range(len(self.sizes))]

    def probabilities(self) -> np.ndarray:
        """p_d = n_d^alpha / sum_e n_e^alpha over the domains with rows (0 for an id without rows)."""
        w = np.where(self.sizes > 0, self.sizes.astype(np.float64) ** self.alpha, 0.0)
        return w / w.sum()

    def quotas(self, total: int | None = None) -> np.ndarray:
        """Draws per domain in an epoch of `total` (default: every usable row): largest-remainder rounding."""
        total = len(self.ids) if total is None else int(total)
        exact = self.probabilities() * total
        q = np.floor(exact).astype(np.int64)
        short = total - int(q.sum())
        q[np.argsort(-(exact - q), kind="stable")[:short]] += 1
        return q

    def draw(self, seed: int, epoch: int) -> np.ndarray:
        """The epoch's dataset indices (len(ids) of them, repeats allowed) in a random order."""
        q = self.quotas()
        labels = np.random.default_rng((seed, epoch, _BALANCE_STREAM)).permutation(np.repeat(np.arange(len(q)), q))
        out = np.empty(len(labels), dtype=np.int64)
        for d, k in enumerate(q.tolist()):
            if k:
                out[labels == d] = self._stream(seed, d, epoch * k, k)
        return out

    def _stream(self, seed: int, d: int, start: int, count: int) -> np.ndarray:
        """Items start..start+count-1 of domain d's endless stream of seeded permutations of its rows."""
        n = int(self.sizes[d])
        parts = [
            self.members[d][np.random.default_rng((seed, _BALANCE_STREAM, d, c)).permutation(n)]
            for c in range(start // n, (start + count - 1) // n + 1)
        ]
        return np.concatenate(parts)[start % n : start % n + count]


def reader_blocks(block_rows: int, buffer_blocks: int, chunk_rows: int, dealt: bool) -> tuple[int, int]:
    """(rows per read, reads held) for a worker's feature reader.

    Block-shuffled: whole sampler blocks, `buffer_blocks` of them (every worker draws rows from every block of the
    buffer). Dealt: a pair owns whole blocks bar about one split block, whose rows it shares with another pair;
    reading HDF5 chunks instead of whole blocks makes that pair read only the chunks its rows fall in, so a split
    costs at most a chunk, not a block, per pair. The memory held is the same: the buffer's rows.
    """
    if dealt and chunk_rows > 0 and block_rows % chunk_rows == 0:
        return chunk_rows, buffer_blocks * (block_rows // chunk_rows)
    return block_rows, buffer_blocks


class EpochSampler(Sampler):
    """An epoch order seeded by (seed, epoch), cut to whole global batches; yields (epoch, index) pairs.

    Random (`block_ids=None`): a permutation. Block-shuffled (`block_ids[i]`: the cache block of dataset item i,
    i.e. its cache row // data.block_rows): blocks in random order, items shuffled within each buffer of
    `buffer_blocks` blocks (cache.store.reader.block_shuffle_order), so the feature reader reads each block whole
    once instead of scattered rows per batch. The order depends on (seed, epoch) only, never on the number of
    processes or workers: Accelerate gives each rank its share of every global batch from the same order, and a
    resumed run skips into the same order. Dealt (`dealing`, data.sampler=block_deal): `deal_order`, so every
    block is read by one (rank, worker) only (read amplification ~1 instead of up to ranks x workers); the order
    then depends on the number of processes, workers and the per-device batch, so a run is reproducible (and
    resumes exactly) only with the same ones. A worker holds only its own shuffle buffer: buffer_blocks x
    block_rows x bytes per row per teacher. Cutting to whole global batches makes every optimizer step see exactly
    the scheduled global batch, and every epoch end on an accumulation boundary. No `generator` attribute on
    purpose: Accelerate would reseed it. `balance` (data.domain_balance < 1): the epoch's items are
    `DomainBalance.draw`'s (same count, domains reweighted), then ordered as above over their blocks; the items
    drawn depend on (seed, epoch) only, for every sampler (block_deal: only their order depends on the dealing).
    """

    def __init__(
        self,
        num_rows: int,
        seed: int,
        global_batch_of: Callable[[int], int],
        shuffle: bool = True,
        block_ids: np.ndarray | None = None,
        buffer_blocks: int = 16,
        dealing: Dealing | None = None,
        balance: DomainBalance | None = None,
    ):
        self.num_rows, self.seed, self.global_batch_of, self.shuffle = num_rows, seed, global_batch_of, shuffle
        if balance is not None and (len(balance.ids) != num_rows or not shuffle):
            raise ValueError(
                f"balance needs shuffle and one domain id per row; got {len(balance.ids)} ids for "
                f"{num_rows} rows, shuffle={shuffle}"
            )
        self.balance = balance
        if block_ids is not None and len(block_ids) != num_rows:
            raise ValueError(f"block_ids has {len(block_ids)} entries for {num_rows} rows")
        self.block_ids = None if block_ids is None else np.asarray(block_ids, dtype=np.int64)
        self.buffer_blocks = int(buffer_blocks)
        if dealing is not None and block_ids is None:
            raise ValueError("dealing deals blocks: give block_ids too")
        self.dealing = dealing
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        gb = self.global_batch_of(self.epoch)
        return self.num_rows // gb * gb

    def order(self) -> np.ndarray:
        """Dataset indices of this epoch, before the cut to whole global batches."""
        if not self.shuffle:
            return np.arange(self.num_rows)
        if self.balance is not None:
            return self._balanced_order()
        if self.dealing is not None:
            return deal_order(  # dealing comes with block_ids (__init__ checks)
                cast(np.ndarray, self.block_ids),
                self.buffer_blocks,
                self.dealing,
                np.random.default_rng((self.seed, self.epoch)),
            )
        if self.block_ids is not None:
            return block_shuffle_order(
                self.block_ids, self.buffer_blocks, np.random.default_rng((self.seed, self.epoch))
            )
        return torch.randperm(self.num_rows, generator=torch.Generator().manual_seed(self.seed + self.epoch)).numpy()

    def _balanced_order(self) -> np.ndarray:
        """The balanced draws (`DomainBalance.draw`), block-shuffled or dealt over their blocks like plain items."""
        items = cast(DomainBalance, self.balance).draw(self.seed, self.epoch)  # called only with a balance
        if self.block_ids is None:
            return items  # already in a random order

        rng = np.random.default_rng((self.seed, self.epoch))
        blocks = self.block_ids[items]
        pos = (
            deal_order(blocks, self.buffer_blocks, self.dealing, rng)
            if self.dealing is not None
            else block_shuffle_order(blocks, self.buffer_blocks, rng)
        )
        return items[pos]

    def epoch_items(self, epoch: int) -> np.ndarray:
        """The dataset indices epoch `epoch` yields (cut to whole global batches), without changing this sampler."""
        other = copy.copy(self)
        other.set_epoch(epoch)
        return other.order()[: len(other)]

    def __iter__(self):
        for i in self.order()[: len(self)].tolist():
            yield (self.epoch, i)
