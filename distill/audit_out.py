"""The outputs of `distill audit`: console lines, audit.json, pairs.csv, drop.csv, pairs.png and the clean corpus."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from cache.sources.corpus import Corpus
from distill.audit import Audit, Pair
from distill.audit_record import read_registry, registry_path
from distill.eval.datasets import SplitData

AUDIT_FILE = "audit.json"


def console_lines(audit: Audit) -> list[str]:
    lines = [
        f"{audit.data}: {audit.rows} of {audit.corpus_rows} rows audited with {audit.teacher}'s image embeddings "
        f"(cosine >= {audit.threshold})",
        f"inside the corpus: {audit.exact_groups} exact groups, {audit.near_groups} near-duplicate groups",
        "rows whose nearest other row is at cosine >= " + ", ".join(f"{t:.2f}: {n}" for t, n in audit.nearest.items()),
    ]
    lines += [f"{t.name}: {t.matched_images} of {t.images} images copied by {t.rows} corpus rows" for t in audit.tasks]
    return [*lines, f"{len(audit.drops)} rows to drop", f"verdict: {audit.verdict()}"]


def write_json(audit: Audit, out: Path) -> Path:
    """audit.json: the counts, the verdict, and the corpus fingerprint with the task names (what eval checks)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / AUDIT_FILE
    path.write_text(json.dumps(audit.to_dict(), indent=2) + "\n")
    return path


def register(audit: Audit, report: Path) -> Path | None:
    """Add this audit's tasks (their leaked images and rows, the threshold, the report) to the corpus's record;
    None without tasks. A later audit of a task replaces the earlier one."""
    if not audit.tasks:
        return None
    path = registry_path(audit.features, audit.fingerprint)
    record = read_registry(audit.features, audit.fingerprint) or {"corpus_fingerprint": audit.fingerprint}
    tasks = record.setdefault("tasks", {})
    for task in dict.fromkeys(t.task for t in audit.tasks):
        splits = [t for t in audit.tasks if t.task == task]
        tasks[task] = {
            "images": sum(t.images for t in splits),
            "matched_images": sum(t.matched_images for t in splits),
            "rows": sum(t.rows for t in splits),
            "threshold": audit.threshold,
            "teacher": audit.teacher,
            "corpus": audit.data,
            "report": str(Path(report).resolve()),
        }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(path)
    return path


def write_csvs(audit: Audit, corpus: Corpus, out: Path) -> tuple[Path, Path]:
    """pairs.csv (every matching pair, closest first) and drop.csv (the rows to drop, in corpus order)."""
    out.mkdir(parents=True, exist_ok=True)
    pairs, drops = out / "pairs.csv", out / "drop.csv"
    keys = corpus.keys
    with pairs.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["kind", "scope", "row", "key", "other", "other_key", "cosine", "text_cosine"])
        for p in sorted(audit.pairs, key=lambda p: (-p.cosine, p.row)):
            other_key = keys[p.other] if p.scope == "corpus" else f"{p.scope} image {p.other}"
            tc = "" if p.text_cosine is None else f"{p.text_cosine:.4f}"
            w.writerow([p.kind, p.scope, p.row, keys[p.row], p.other, other_key, f"{p.cosine:.4f}", tc])
    with drops.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["row", "key", "reason", "cosine"])
        for d in audit.drops:
            w.writerow([d.row, d.key, d.reason, f"{d.cosine:.4f}"])
    return pairs, drops


def write_clean(audit: Audit, corpus: Corpus, path: Path) -> tuple[Path, int]:
    """The corpus without the rows to drop, as a CSV (image as an absolute path, caption, key, extra columns).

    Why only tables: a CSV/TSV/JSONL corpus's rows are paths and text; shards would have to be rewritten."""
    if not hasattr(corpus, "image_path"):
        raise ValueError(
            f"--write-clean needs a CSV/TSV/JSONL corpus; {corpus.source} is not one: drop the keys listed in "
            "drop.csv from it with your own tools"
        )
    drop = {d.row for d in audit.drops}
    extra = list(getattr(corpus, "columns", []))
    cells = {c: corpus.column(c) for c in extra}
    path.parent.mkdir(parents=True, exist_ok=True)
    kept = 0
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption", "key", *extra])
        for i in range(len(corpus)):
            if i not in drop:
                w.writerow([corpus.image_path(i), corpus.captions[i], corpus.keys[i], *(cells[c][i] for c in extra)])
                kept += 1
    return path, kept


def write_sheet(audit: Audit, corpus: Corpus, splits: dict[str, SplitData], out: Path, n: int) -> Path | None:
    """pairs.png: the `n` closest pairs side by side, leaks first, each titled with its cosine and what it is."""
    chosen = sorted(audit.pairs, key=lambda p: (p.scope == "corpus", -p.cosine, p.row))[:n]
    if not chosen:
        return None
    import matplotlib  # noqa: PLC0415 (lazy: heavy, only to plot; Agg first)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 (lazy: heavy, only to plot; Agg first)

    fig, axes = plt.subplots(len(chosen), 2, figsize=(5, 2.4 * len(chosen)), squeeze=False)
    for (left, right), p in zip(axes, chosen):
        left.imshow(corpus.load_image(p.row).convert("RGB"))
        left.set_title(_clip(f"corpus {corpus.keys[p.row]}"), fontsize=7)
        right.imshow(_other(p, corpus, splits))
        where = corpus.keys[p.other] if p.scope == "corpus" else f"{p.scope} #{p.other}"
        right.set_title(_clip(f"{p.kind} {p.cosine:.3f}: {where}"), fontsize=7)
        for ax in (left, right):
            ax.axis("off")
    fig.suptitle(f"closest pairs (cosine >= {audit.threshold}, {audit.teacher})", fontsize=9)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "pairs.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _other(p: Pair, corpus: Corpus, splits: dict[str, SplitData]):
    return corpus.load_image(p.other).convert("RGB") if p.scope == "corpus" else splits[p.scope].image(p.other)


def _clip(text: str, n: int = 48) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"
