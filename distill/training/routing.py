"""`loss.routing` for a run: each corpus row's teachers (a route mask), from a corpus column or, label-free, from
clusters of the cache (`loss.routing.auto`), and the domain ids `scope: domain` terms read.

Why the auto routing is computed on the main process and broadcast: k-means and the per-cluster scores are float
arithmetic, and two hosts with different CPUs may round differently and so split a tie another way; one result,
sent to every process, cannot disagree. It is saved in RUN/auto_routing.safetensors, so a resumed run (on this or
another machine) routes exactly as before instead of recomputing.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from distill import teacher_report as tr
from distill.config.routing import AutoRoutingCfg, RoutingCfg
from distill.config.train_config import ConfigError, DataCfg
from distill.data.cache_join import CacheJoin, Routing, route_mask
from distill.data.domains import Domains, domain_ids
from distill.data.loader import DataError
from distill.training.collective import all_ok

log = logging.getLogger(__name__)
AUTO_FILE = "auto_routing.safetensors"


@dataclass(frozen=True)
class Cluster:
    """One auto-routing cluster: its name (commonest caption words), size, chosen teachers and their scores."""

    name: str
    rows: int
    teachers: list[str]
    skill: dict[str, float] = field(default_factory=dict)
    accuracy: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class RunRouting:
    """The run's route mask, and for auto routing each corpus row's cluster (the domain of `scope: domain`)."""

    routing: Routing
    config: RoutingCfg
    cluster_of_row: np.ndarray | None = None  # (N_corpus,) int64; rows that do not train: 0 (never drawn)
    clusters: list[Cluster] = field(default_factory=list)
    clustered: str = ""  # what was clustered, e.g. "joint embeddings of a, b"

    def record(self) -> dict:
        """run_meta.json's `routing`: the config, rows per teacher, and for auto routing every cluster's choice."""
        out = {"config": self.config.model_dump(), **self.routing.summary()}
        if self.config.auto is not None:
            out["auto"] = {
                "clustered": self.clustered,
                "file": AUTO_FILE,
                "clusters": [c.__dict__ for c in self.clusters],
            }
        return out


def build_routing(
    cfg: RoutingCfg | None,
    corpus,
    join: CacheJoin | None,
    used: list[str],
    features: str | None = None,
    accelerator=None,
    output_dir: str | Path | None = None,
    seed: int = 0,
) -> RunRouting | None:
    """loss.routing as a route mask over the loss's teachers `used` (None without routing); logs the counts.
    Auto routing reads `features` (data.features), saves its clusters in `output_dir` and seeds them with
    loss.routing.auto.seed, else `seed` (train.seed)."""
    if cfg is None:
        return None
    if join is None or not used:
        raise ConfigError(
            "loss.routing is set, but no loss term uses teachers; add a teacher term or remove loss.routing"
        )
    if cfg.auto is not None:
        assert features is not None  # a join implies data.features
        if cfg.auto.seed is None:
            cfg = cfg.model_copy(update={"auto": cfg.auto.model_copy(update={"seed": seed})})
        return auto_routing(cfg, corpus, join, used, features, accelerator, output_dir)
    routing = route_mask(cfg, corpus, used, join.cache_teachers, join.corpus_rows)
    log.info(
        "routing by column %r: rows per teacher %s; %d of %d rows have no teacher (teacher-free terms only)",
        cfg.column,
        routing.rows_per_teacher,
        routing.unrouted_rows,
        len(join.corpus_rows),
    )
    return RunRouting(routing, cfg)


def loss_domains(data: DataCfg, uses_domains: bool, corpus, domains: Domains | None, routing: RunRouting | None = None):
    """(N_corpus,) int64 domain ids for the loss's `scope: domain` (None when nothing has that scope): the auto
    routing's clusters when there are some, else data.domain_column's values; a corpus without that column (or with
    empty cells) is refused in one line naming the key."""
    if not uses_domains:
        return None
    if routing is not None and routing.cluster_of_row is not None:
        return routing.cluster_of_row
    if domains is not None:
        return domains.ids
    try:
        return domain_ids(corpus, data.domain_column)[0]
    except DataError as e:
        raise DataError(
            f"scope: domain (a loss term's kwargs or loss.combine.scope) needs each row's domain: {e}"
        ) from None


# -- label-free: clusters of the cache ------------------------------------------------------------------------------
def _settings(auto: AutoRoutingCfg, features: str, used: list[str]) -> str:
    """What the saved clusters depend on besides the rows (compared themselves, `_load`); a saved file with other
    settings is recomputed, not reused."""
    return json.dumps({"auto": auto.model_dump(), "features": str(features), "teachers": used}, sort_keys=True)


Result = tuple[np.ndarray, np.ndarray, list[dict]]  # cluster id of each row, (K, T) bool choice, scores per cluster


def _compute(auto: AutoRoutingCfg, features: str, rows: np.ndarray, used: list[str]) -> Result:
    """k-means of `rows`, then per cluster the teachers within margin of the best skill, and the scores."""
    if auto.teacher is not None and auto.teacher not in used:
        raise DataError(
            f"loss.routing.auto.teacher={auto.teacher!r} is not one of the loss's teachers ({', '.join(used)})"
        )
    if auto.clusters > len(rows):
        raise DataError(
            f"loss.routing.auto.clusters={auto.clusters} is more than the {len(rows)} rows that train; "
            f"use at most {len(rows)}"
        )
    assert auto.seed is not None  # build_routing fills it in
    sorted_rows, ids, _ = tr.kmeans(
        features, auto.clusters, auto.seed, auto.teacher, rows=rows, on=auto.on, teachers=used
    )
    slices = tr.Slices([str(j) for j in range(auto.clusters)], sorted_rows, ids, "auto")
    report = tr.score(features, slices, pool=auto.pool, seed=auto.seed, teachers=used)
    choice = np.zeros((auto.clusters, len(used)), dtype=bool)
    for j, s in enumerate(report.slices):
        choice[j, [used.index(t) for t in tr.within_margin(s, used, auto.margin)]] = True
    order = np.argsort(rows, kind="stable")  # back from sorted cache rows to the join's order
    out = np.empty(len(rows), dtype=np.int64)
    out[order] = ids
    scores = [{"skill": s.skill, "accuracy": s.accuracy} for s in report.slices]
    return out, choice, scores


def _load(path: Path, settings: str, rows: np.ndarray) -> Result | None:
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("settings") != settings:
                return None
            scores = json.loads(meta.get("scores", "[]"))
            saved_rows, ids, choice = (f.get_tensor(k).numpy() for k in ("cache_rows", "cluster", "choice"))
    except Exception as e:  # a damaged file is recomputed, never trusted
        log.warning("ignoring %s (%s); computing the clusters again", path, e)
        return None
    if not np.array_equal(saved_rows, rows):
        return None
    return ids.astype(np.int64), choice.astype(bool), scores


def _main_result(auto, features, rows, used, output_dir) -> Result:
    path = Path(output_dir) / AUTO_FILE if output_dir is not None else None
    settings = _settings(auto, features, used)
    got = _load(path, settings, rows) if path is not None else None
    if got is not None:
        log.info("auto routing: reusing the clusters in %s", path)
        return got
    ids, choice, scores = _compute(auto, features, rows, used)
    if path is not None:
        tmp = path.with_suffix(".tmp")
        tensors = {
            "cache_rows": torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64)),
            "cluster": torch.from_numpy(ids),
            "choice": torch.from_numpy(choice.astype(np.uint8)),
        }
        save_file(tensors, str(tmp), metadata={"settings": settings, "scores": json.dumps(scores)})
        tmp.replace(path)
    return ids, choice, scores


def _broadcast(accelerator, ids: np.ndarray, choice: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The main process's (ids, choice) on every process (one tensor each, shapes known everywhere)."""
    if accelerator is None or accelerator.num_processes == 1:
        return ids, choice
    from accelerate.utils import broadcast  # noqa: PLC0415 (lazy: only with several processes)

    a = broadcast(torch.from_numpy(ids).to(accelerator.device), from_process=0)
    b = broadcast(torch.from_numpy(choice.astype(np.uint8)).to(accelerator.device), from_process=0)
    return a.cpu().numpy(), b.cpu().numpy().astype(bool)


def auto_routing(
    cfg: RoutingCfg, corpus, join: CacheJoin, used: list[str], features: str, accelerator, output_dir
) -> RunRouting:
    auto = cfg.auto
    assert auto is not None  # the caller's branch
    rows = np.asarray(join.cache_rows, dtype=np.int64)
    main = accelerator is None or accelerator.is_main_process
    n_teachers = len(used)
    scores: list[dict] = []
    ids, choice = np.zeros(len(rows), np.int64), np.zeros((auto.clusters, n_teachers), bool)
    error: Exception | None = None
    if main:
        try:
            ids, choice, scores = _main_result(auto, features, rows, used, output_dir)
        except DataError as e:
            error = e
        except ValueError as e:  # the report's checks (an unknown teacher, K out of range) read as bad input
            error = DataError(f"loss.routing.auto: {e}")
    if accelerator is not None and not all_ok(accelerator, error is None):  # no process waits on a failed main
        raise error or DataError("loss.routing.auto: the main process could not cluster the cache (see its message)")
    if error is not None:
        raise error
    ids, choice = _broadcast(accelerator, ids, choice)
    never = [t for j, t in enumerate(used) if not choice[:, j].any()]
    if never and main:  # a finding, not an error: the cache says these teachers know no cluster best
        log.warning(
            "loss.routing.auto: %s within %g of the best on none of the %d clusters, so distil%s no row; raise "
            "loss.routing.auto.margin to keep them (`distill teachers %s --clusters %d` shows the scores)",
            ", ".join(repr(t) for t in never) + (" is" if len(never) == 1 else " are"),
            auto.margin,
            auto.clusters,
            "s" if len(never) == 1 else "",
            features,
            auto.clusters,
        )
    cluster_of_row = np.zeros(len(corpus), dtype=np.int64)
    cluster_of_row[join.corpus_rows] = ids
    mask = np.zeros((len(corpus), n_teachers), dtype=bool)
    mask[join.corpus_rows] = choice[ids]
    counts = {t: int(mask[join.corpus_rows, j].sum()) for j, t in enumerate(used)}
    routing = Routing(list(used), mask, counts, 0)
    clusters = _describe(corpus, join, ids, choice, used, scores) if main else []
    clustered = f"{auto.on} embeddings of {auto.teacher or ', '.join(used)}"
    for c in clusters:
        log.info("auto routing: cluster %r (%d rows) -> %s", c.name, c.rows, ", ".join(c.teachers))
    return RunRouting(routing, cfg, cluster_of_row, clusters, clustered)


def _describe(corpus, join: CacheJoin, ids: np.ndarray, choice: np.ndarray, used: list[str], scores) -> list[Cluster]:
    """Each cluster's record for run_meta.json: named by caption words, its size, teachers and their scores."""
    k = choice.shape[0]
    captions = getattr(corpus, "captions", None)  # a streamed corpus has none in memory: clusters keep numbers
    texts = [captions[int(i)] for i in join.corpus_rows] if captions is not None else [""] * len(ids)
    by_cluster: list[list[str]] = [[] for _ in range(k)]
    for text, j in zip(texts, ids.tolist()):
        by_cluster[j].append(text)
    names = tr.cluster_names(by_cluster)
    sizes = np.bincount(ids, minlength=k)
    return [
        Cluster(
            names[m],
            int(sizes[m]),
            [t for j, t in enumerate(used) if choice[m, j]],
            **(scores[m] if m < len(scores) else {}),
        )
        for m in range(k)
    ]
