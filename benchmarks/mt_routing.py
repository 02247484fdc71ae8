"""Label-free routing checked against the labels the students never saw (issue 20): what `distill teachers` finds on
the benchmark's cache, and where `loss.routing.auto` sent each domain's rows.

Both read the student corpus's `domain` column, which the label-free variants hide from training: the teacher report
by that column and by as many clusters as there are domains (which domains each cluster holds), and, per auto-routed
run, the share of each domain's rows whose routed teachers include the domain's own teacher (`own`), the share routed
to it alone (`only_own`), and the mean number of teachers per row.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

# The cache's and the report's modules are imported in the functions: the harness imports this module at its
# start, before its flags are checked.


def teacher_report(features: str, corpus_csv: str, seed: int = 0) -> dict:
    """{"by_domain": [...], "by_clusters": [...]}: each slice's rows, best teacher and skills; clusters (as many
    as domains, the default joint embeddings) also list the domains of their rows."""
    from cache.sources.corpus import open_corpus  # noqa: PLC0415 (lazy: before the harness's flag check)
    from distill import teacher_report as tr  # noqa: PLC0415 (lazy: before the harness's flag check)

    by_domain = tr.score(features, tr.by_column(features, corpus_csv, "domain"), seed=seed)
    k = len(by_domain.slices)
    slices = tr.by_clusters(features, k, seed, data=corpus_csv)
    clusters = tr.score(features, slices, seed=seed)
    corpus = open_corpus(corpus_csv)
    domain_of_key = dict(zip(corpus.keys, corpus.column("domain")))
    from cache.store.reader import FeatureReader  # noqa: PLC0415 (lazy: before the harness's flag check)

    with FeatureReader(features) as reader:
        keys = reader.keys
    held = [Counter(domain_of_key[keys[int(r)]] for r in slices.rows[slices.ids == j]) for j in range(k)]
    return {
        "by_domain": [_slice(s) for s in by_domain.slices],
        "by_clusters": [{**_slice(s), "domains": dict(held[j].most_common())} for j, s in enumerate(clusters.slices)],
        "clustered": clusters.how,
    }


def _slice(s) -> dict:
    return {"slice": s.name, "rows": s.rows, "best": s.best, "skill": {t: round(v, 3) for t, v in s.skill.items()}}


def auto_routing_by_domain(run_dir: str | Path, corpus_csv: str, own: dict[str, str]) -> dict | None:
    """{domain: {own, only_own, teachers_per_row, rows}} of an auto-routed run (None for another run); `own` maps
    a domain to its own teacher."""
    from safetensors.numpy import load_file  # noqa: PLC0415 (lazy: before the harness's flag check)

    from cache.sources.corpus import open_corpus  # noqa: PLC0415 (lazy: before the harness's flag check)
    from cache.store.reader import FeatureReader  # noqa: PLC0415 (lazy: before the harness's flag check)

    run = Path(run_dir)
    saved = run / "auto_routing.safetensors"
    if not saved.is_file():
        return None
    meta = json.loads((run / "run_meta.json").read_text())
    chosen = [c["teachers"] for c in meta["routing"]["auto"]["clusters"]]
    tensors = load_file(str(saved))
    corpus = open_corpus(corpus_csv)
    domain_of_key = dict(zip(corpus.keys, corpus.column("domain")))
    with FeatureReader(meta["features"]) as reader:
        keys = reader.keys
    domains = np.array([domain_of_key[keys[int(r)]] for r in tensors["cache_rows"]])
    teachers = [chosen[int(j)] for j in tensors["cluster"]]
    out = {}
    for d in sorted(set(domains.tolist())):
        rows = np.flatnonzero(domains == d)
        has = np.array([own.get(d) in teachers[i] for i in rows])
        alone = np.array([teachers[i] == [own.get(d)] for i in rows])
        out[d] = {
            "rows": len(rows),
            "own": round(float(has.mean()), 3),
            "only_own": round(float(alone.mean()), 3),
            "teachers_per_row": round(float(np.mean([len(teachers[i]) for i in rows])), 2),
        }
    return out


def report_table(report: dict) -> str:
    """Markdown: the teacher report by domain and by clusters (skill per teacher, the clusters' domains)."""
    teachers = list(report["by_domain"][0]["skill"]) if report["by_domain"] else []
    head = "| slice | rows | " + " | ".join(teachers) + " | best | domains of its rows |"
    lines = [head, "|---|---|" + "---|" * len(teachers) + "---|---|"]
    for kind in ("by_domain", "by_clusters"):
        for s in report[kind]:
            doms = ", ".join(f"{d} {n}" for d, n in s.get("domains", {}).items()) or "(the domain column)"
            skills = " | ".join(f"{s['skill'].get(t, float('nan')):+.3f}" for t in teachers)
            name = s["slice"] if kind == "by_domain" else f"cluster: {s['slice']}"
            lines.append(f"| {name} | {s['rows']} | {skills} | {s['best']} | {doms} |")
    return "\n".join(lines)


def routing_table(per_variant: dict[str, dict[int, dict]]) -> str:
    """Markdown: per auto-routed variant and domain, the mean over seeds of own / only_own / teachers per row."""
    lines = ["| variant | domain | rows | own teacher among its teachers | own teacher alone | teachers per row |"]
    lines.append("|---|---|---|---|---|---|")
    for name, seeds in per_variant.items():
        runs = [r for r in seeds.values() if r]
        for d in runs[0] if runs else {}:
            m = {k: float(np.mean([r[d][k] for r in runs])) for k in ("own", "only_own", "teachers_per_row")}
            lines.append(
                f"| {name} | {d} | {runs[0][d]['rows']} | {m['own']:.2f} | {m['only_own']:.2f} | "
                f"{m['teachers_per_row']:.2f} |"
            )
    return "\n".join(lines)
