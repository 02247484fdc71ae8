"""What every task evaluator shares: device, batch sizes, bootstrap settings and the embedding cache."""

from __future__ import annotations

from dataclasses import dataclass, field

from distill.eval.embeddings import EmbeddingCache


@dataclass(frozen=True)
class EvalContext:
    device: str = "cpu"
    batch_size: int = 64
    num_workers: int = 0
    bootstrap: int = 1000  # resamples for 95% CIs (0: point estimates only)
    seed: int = 0
    cache: EmbeddingCache = field(default_factory=EmbeddingCache)
