"""What `distill audit` is asked to do (`AuditJob`): its flags are made from these fields (`distill.cli`).

Why here, torch-free: the command line is validated before the cache reader (and so torch) is imported.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from teachers.kernel.config_model import Float, Int, Section, Str

DEFAULT_THRESHOLD = 0.95  # image-embedding cosine; docs/audit.md says why


class AuditJob(Section):
    """Exact and near duplicates inside a corpus and between it and eval tasks' images (`distill.audit`)."""

    features: Str = Field(description="FEATURES.h5 (the corpus's feature cache)")
    data: Str = Field(description="the cache's corpus (CSV/TSV/JSONL or shards), joined by key")
    tasks: tuple[Str, ...] = Field((), description="eval task (built-in name or TASK.yaml) whose images to check")
    teacher: Str | None = Field(None, description="the cached teacher whose image embeddings compare (default: first)")
    threshold: Float = Field(DEFAULT_THRESHOLD, description="image-embedding cosine at or above which two images match")
    top_k: Int = Field(8, description="nearest neighbours kept per row")
    out: Str = Field("audit", description="folder for audit.json, pairs.csv, drop.csv and pairs.png")
    write_clean: Str | None = Field(None, description="write the corpus without the rows to drop to this CSV")
    device: Str = Field("auto", description="cpu | cuda | cuda:N | auto (the teacher that embeds task images)")
    batch_size: Int = Field(64, description="task images per forward pass")
    max_samples: Int | None = Field(None, description="cap every split of every task (quick looks)")
    block_rows: Int = Field(
        4096, description="rows per block of the similarity search (a block product holds block_rows^2 floats)"
    )
    sheet_pairs: Int = Field(16, description="closest pairs shown in pairs.png")

    @model_validator(mode="after")
    def _check(self) -> AuditJob:
        if not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"--threshold is a cosine, between -1 and 1; got {self.threshold}")
        if self.top_k < 1 or self.block_rows < 1 or self.batch_size < 1 or self.sheet_pairs < 0:
            raise ValueError("--top-k, --block-rows and --batch-size must be >= 1, --sheet-pairs >= 0")
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError(f"--max-samples must be >= 1, got {self.max_samples}")
        if self.write_clean is not None and not self.write_clean.lower().endswith(".csv"):
            raise ValueError(f"--write-clean writes a CSV corpus; name a .csv file, got {self.write_clean!r}")
        return self
