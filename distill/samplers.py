"""The trainer's epoch order: one order per (seed, epoch), the same in every process, worker and resumed run."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch.utils.data import Sampler


class EpochSampler(Sampler):
    """An epoch order seeded by (seed, epoch), cut to whole global batches; yields (epoch, index) pairs.

    Random (`block_ids=None`): a permutation. Block-shuffled (`block_ids[i]`: the cache block of dataset item i,
    i.e. its cache row // data.block_rows): blocks in random order, items shuffled within each buffer of
    `buffer_blocks` blocks (cache.h5_reader.block_shuffle_order), so the feature reader reads each block whole
    once instead of scattered rows per batch. The order depends on (seed, epoch) only, never on the number of
    processes or workers: Accelerate gives each rank its share of every global batch from the same order, and a
    resumed run skips into the same order. Cutting to whole global batches makes every optimizer step see exactly
    the scheduled global batch, and every epoch end on an accumulation boundary. No `generator` attribute on
    purpose: Accelerate would reseed it.
    """

    def __init__(self, num_rows: int, seed: int, global_batch_of: Callable[[int], int], shuffle: bool = True,
                 block_ids: np.ndarray | None = None, buffer_blocks: int = 16):
        self.num_rows, self.seed, self.global_batch_of, self.shuffle = num_rows, seed, global_batch_of, shuffle
        if block_ids is not None and len(block_ids) != num_rows:
            raise ValueError(f"block_ids has {len(block_ids)} entries for {num_rows} rows")
        self.block_ids = None if block_ids is None else np.asarray(block_ids, dtype=np.int64)
        self.buffer_blocks = int(buffer_blocks)
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
        if self.block_ids is not None:
            from cache.h5_reader import block_shuffle_order  # late: h5py loads only when features are read

            return block_shuffle_order(self.block_ids, self.buffer_blocks,
                                       np.random.default_rng((self.seed, self.epoch)))
        return torch.randperm(self.num_rows, generator=torch.Generator().manual_seed(self.seed + self.epoch)).numpy()

    def __iter__(self):
        for i in self.order()[: len(self)].tolist():
            yield (self.epoch, i)
