"""What `distill teachers` is asked to do (`TeachersJob`): its flags are made from these fields (`distill.cli`).

Why here, torch-free: the command line is validated before the cache reader (and so torch) is imported.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from distill.config.routing import CLUSTER_ON
from teachers.kernel.config_model import Float, Int, Section, Str


class TeachersJob(Section):
    """Slices of a feature cache's rows and how each teacher is scored on them (`distill.teacher_report`)."""

    features: Str = Field(description="FEATURES.h5")
    by: Str | None = Field(None, description="slice by this corpus column (needs --data)")
    data: Str | None = Field(None, description="the cache's corpus (CSV/TSV/JSONL), joined by key")
    clusters: Int | None = Field(None, description="slice by K k-means clusters of image embeddings")
    cluster_on: Str = Field(
        "joint", description="what --clusters clusters: joint (each teacher's image and text embeddings), image, text"
    )
    cluster_teacher: Str | None = Field(None, description="cluster this teacher's embeddings only (default: all)")
    seed: Int = Field(0, description="seed of the pools and the clusters")
    pool: Int = Field(64, description="rows per retrieval pool (chance ~ 1/N)")
    out: Str | None = Field(None, description="write teachers.json and teachers.png here")
    suggest: Str | None = Field(
        None,
        description="write a YAML loss.routing block training accepts: per slice, the teachers within --margin of "
        "the best skill (with --clusters: an auto block that clusters the training rows the same way)",
    )
    margin: Float = Field(0.05, description="accuracy margin for --suggest")

    @model_validator(mode="after")
    def _check(self) -> TeachersJob:
        if (self.by is None) == (self.clusters is None):
            raise ValueError("distill teachers needs one of --by COLUMN (with --data) or --clusters K")
        if self.by is not None and not self.data:
            raise ValueError("--by COLUMN needs --data CORPUS (the corpus that holds the column)")
        if self.clusters is not None and self.clusters < 1:
            raise ValueError(f"--clusters must be at least 1, got {self.clusters}")
        if self.cluster_on not in CLUSTER_ON:
            raise ValueError(f"--cluster-on {self.cluster_on!r} is unknown; use one of {', '.join(CLUSTER_ON)}")
        if self.pool < 2:
            raise ValueError(f"--pool must be at least 2, got {self.pool}")
        if self.margin < 0:
            raise ValueError(f"--margin must be >= 0, got {self.margin}")
        return self
