"""`loss.routing`: which teachers distil which corpus rows, from a corpus column or found from the cache alone."""

from __future__ import annotations

import math

from pydantic import Field, model_validator

from teachers.kernel.config_model import Float, Int, Section, Str, check

CLUSTER_ON = ("joint", "image", "text")  # distill.teacher_report.CLUSTER_ON (this module stays numpy-free)


class AutoRoutingCfg(Section):
    """Label-free routing: the rows that train are cut into k-means clusters of the cached teachers' embeddings,
    and each cluster goes to the teachers whose skill there (`distill teachers`: image-to-text top-1 above the
    chance of their own choices) is within `margin` of the best. Computed once at the start of training, recorded
    in run_meta.json and RUN/auto_routing.safetensors (a resumed run reuses it), equal on every process; each
    cluster acts as a domain for `scope: domain` terms."""

    where = "loss.routing.auto"
    clusters: Int = Field(description="K, the number of clusters (at most the rows that train)")
    margin: Float = Field(0.05, description="teachers within this skill of a cluster's best take its rows")
    on: Str = Field(
        "joint", description="what is clustered: joint (image and text embeddings side by side), image or text"
    )
    teacher: Str | None = Field(None, description="cluster this teacher's embeddings only (default: the loss's)")
    seed: Int | None = Field(
        None, description="seed of the k-means start and the retrieval pools (default: train.seed)"
    )
    pool: Int = Field(64, description="rows per retrieval pool when scoring the teachers on a cluster")

    @model_validator(mode="after")
    def _valid(self) -> AutoRoutingCfg:
        check(self.clusters >= 1, f"loss.routing.auto.clusters must be at least 1, got {self.clusters}")
        check(
            math.isfinite(self.margin) and self.margin >= 0,
            f"loss.routing.auto.margin must be a finite number >= 0, got {self.margin!r}",
        )
        check(self.on in CLUSTER_ON, f"loss.routing.auto.on {self.on!r} is unknown; use one of {', '.join(CLUSTER_ON)}")
        check(self.pool >= 2, f"loss.routing.auto.pool must be at least 2, got {self.pool}")
        return self


class RoutingCfg(Section):
    """Per-sample teacher routing: which teachers distil which corpus rows, from a corpus column or (`auto`) from
    clusters of the cache.

    With `teachers`: the column's value picks the row's teachers (`default` for values not in the map).
    Without: the cell itself lists teacher names separated by `separator` (`default` for empty cells).
    A row routed to no teacher gets only the teacher-free terms (infonce).
    """

    where = "loss.routing"
    column: Str | None = Field(None, description="a column of the CSV/TSV/JSONL corpus (besides image, caption, key)")
    auto: AutoRoutingCfg | None = Field(None, description="label-free: route by clusters of the cache (no column)")
    teachers: dict[Str, tuple[Str, ...]] | None = Field(
        None, description="column value -> teacher names; null: the cell lists them"
    )
    default: tuple[Str, ...] = Field((), description="teachers of rows whose value is not in the map (or empty)")
    separator: Str = Field("|", description="between teacher names in a cell (without `teachers`)")
    weights: dict[Str, Float] = Field(
        default_factory=dict,
        description="column value -> weight (>= 0) multiplying "
        "that row's teacher terms, not InfoNCE (values not listed: 1; a value the "
        "column never holds: refused)",
    )

    @model_validator(mode="after")
    def _valid(self) -> RoutingCfg:
        check(
            self.column is not None or self.auto is not None,
            "loss.routing needs column (a corpus column) or auto (clusters of the cache, no column needed)",
        )
        check(self.column is None or self.auto is None, "loss.routing takes column or auto, not both")
        if self.auto is not None:
            check(
                self.teachers is None and not self.default and not self.weights,
                "loss.routing.auto chooses each cluster's teachers itself; remove loss.routing.teachers, "
                "default and weights (they map values of a column)",
            )
            return self
        check(bool((self.column or "").strip()), "loss.routing.column must name a corpus column")
        for value, w in self.weights.items():
            check(math.isfinite(w) and w >= 0, f"loss.routing.weights.{value} must be a finite number >= 0, got {w!r}")
        check(bool(self.separator), "loss.routing.separator must be a non-empty string, e.g. '|'")
        if self.teachers is not None:
            check(
                bool(self.teachers),
                "loss.routing.teachers must map column values to teacher lists "
                "(or be null: the column lists teacher names itself)",
            )
            for value, names in self.teachers.items():
                check(
                    all(n.strip() for n in names),
                    f"loss.routing.teachers.{value}: teacher names must be non-empty, got {list(names)}",
                )
        check(
            all(n.strip() for n in self.default),
            f"loss.routing.default: teacher names must be non-empty, got {list(self.default)}",
        )
        return self

    def named_teachers(self) -> list[str]:
        """Every teacher the map and the default name (the cell-listed ones are only known from the corpus)."""
        out: list[str] = []
        for names in [*(self.teachers or {}).values(), self.default]:
            out += [n for n in names if n not in out]
        return out
