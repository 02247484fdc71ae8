"""Named batch inputs: per-row data a loss term reads that is neither pixels, captions nor teacher features.

Why: a term that needs something new per row (a mask, a label, a cached map) should not have to thread it through
the collate, `TrainBatch`, the device copy, the merge of accumulated batches, GradCache and the loss by hand. Here
the data side registers a producer under a name; a term lists the names it reads (`batch_inputs = ("name",)`);
`build_run` builds the producers the loss's terms ask for, the collate calls them in the DataLoader workers, and
the batch carries the values in `TrainBatch.inputs` (moved to the device, merged and sliced generically) up to
`StepContext.batch_input(name)` in the term.

    @register_batch_input(key="row_parity")
    def row_parity(setup: InputSetup) -> Producer:          # once per run, in the main process
        return lambda rows: torch.from_numpy(rows.corpus_rows % 2)   # per batch, in a worker: (B, ...) rows

A value is a (B, ...) tensor or a {key: (B, ...) tensor} dict (e.g. by teacher). A producer runs in DataLoader
workers: keep it picklable (a module-level function or a class instance) and cheap, as the collate is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from teachers.kernel.registry import Registry

InputValue = Tensor | dict[str, Tensor]


@dataclass(frozen=True)
class BatchRows:
    """One batch's rows as a producer sees them (in the collate)."""

    corpus_rows: np.ndarray  # (B,) int64 corpus rows
    cache_rows: np.ndarray  # (B,) int64 rows of the feature cache (the corpus rows when there is no cache)
    views: np.ndarray  # (B,) int64 stored view shown, -1 for the student's own crop
    captions: Sequence[str]


@dataclass(frozen=True)
class InputSetup:
    """What a producer's factory may read when the run is built: the config, the corpus, the cache join (None in
    contrastive mode), and the loss's teachers found in the cache."""

    cfg: Any  # distill.config.train_config.Config
    corpus: Any  # cache.sources.corpus.Corpus
    join: Any = None  # distill.data.cache_join.CacheJoin | None
    teachers: tuple[str, ...] = ()


Producer = Callable[[BatchRows], InputValue]
Factory = Callable[[InputSetup], Producer]
BATCH_INPUTS: Registry[Factory] = Registry("batch input", entry_point_group="biomed_distill.batch_inputs")
register_batch_input = BATCH_INPUTS.register


def build_inputs(wanted: Mapping[str, Iterable[str]], setup: InputSetup) -> dict[str, Producer]:
    """The producers of the inputs `wanted` ({input name: the loss terms that read it}), built once per run."""
    out = {}
    for name, readers in wanted.items():
        if name not in BATCH_INPUTS:
            raise KeyError(
                f"loss term(s) {', '.join(sorted(readers))} read the batch input {name!r}, which no "
                f"module registered (register_batch_input(key={name!r}) in distill.data.inputs); "
                f"registered: {', '.join(BATCH_INPUTS.list()) or 'none'}"
            )
        out[name] = BATCH_INPUTS.get(name)(setup)
    return out


def produce(producers: Mapping[str, Producer], rows: BatchRows) -> dict[str, InputValue]:
    """Each producer's value for the batch's rows, checked to have one entry per row."""
    out = {}
    for name, make in producers.items():
        value = make(rows)
        check_rows(name, value, len(rows.corpus_rows))
        out[name] = value
    return out


def _each(value: InputValue, fn: Callable[[Tensor], Tensor]) -> InputValue:
    return {k: fn(v) for k, v in value.items()} if isinstance(value, dict) else fn(value)


def check_rows(name: str, value: InputValue, batch_size: int) -> None:
    """A one-line error when an input is not a (B, ...) tensor (or a dict of them)."""
    parts = value.items() if isinstance(value, dict) else [(None, value)]
    for key, v in parts:
        label = name if key is None else f"{name}[{key!r}]"
        if not isinstance(v, Tensor) or v.dim() == 0 or v.shape[0] != batch_size:
            shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise ValueError(f"batch input {label} is {shape}; expected a tensor of {batch_size} rows (B, ...)")


def move_inputs(inputs: Mapping[str, InputValue], device, non_blocking: bool = False) -> dict[str, InputValue]:
    return {n: _each(v, lambda t: t.to(device, non_blocking=non_blocking)) for n, v in inputs.items()}


def select_inputs(inputs: Mapping[str, InputValue], rows: slice | Tensor) -> dict[str, InputValue]:
    """The inputs of some rows (a GradCache chunk, a micro batch)."""
    return {n: _each(v, lambda t: t[rows]) for n, v in inputs.items()}


def concat_inputs(parts: Sequence[Mapping[str, InputValue]]) -> dict[str, InputValue]:
    """The inputs of batches merged into one (their rows in order)."""
    if not parts:
        return {}
    out: dict[str, InputValue] = {}
    for name, first in parts[0].items():
        values = [p[name] for p in parts]
        if isinstance(first, dict):
            out[name] = {k: torch.cat([v[k] for v in values if isinstance(v, dict)]) for k in first}
        else:
            out[name] = torch.cat([v for v in values if isinstance(v, Tensor)])
    return out


__all__ = [
    "BATCH_INPUTS",
    "BatchRows",
    "InputSetup",
    "InputValue",
    "Producer",
    "build_inputs",
    "check_rows",
    "concat_inputs",
    "move_inputs",
    "produce",
    "register_batch_input",
    "select_inputs",
]
