"""The evaluation report: `report.json` (every number), `report.md` (tables) and PNG charts beside them.

Layout of report.json::

    {"format": "biomed-distill-eval", "version": 1, "student": NAME | null, "teachers": [NAME, ...],
     "models": {NAME: {"spec", "role", "embed_dim"}}, "settings": {...},
     "tasks": {TASK: {"kind", "source", "dataset", "n": {split: rows}, "classes",
                      "metrics": {METRIC: {MODEL: {"point", "ci_low", "ci_high", "n"}}},
                      "gain": {METRIC: student point - best teacher point | null}}},
     "results": {MODEL: {TASK: {METRIC: point | null}}}}   # the point estimates alone (model cards read these)

Every metric is higher-is-better, so "best" is the largest point estimate.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Mapping

from .bootstrap import Estimate

FORMAT = "biomed-distill-eval"


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def student_gain(row: Mapping[str, Estimate], student: str | None, teachers: list[str]) -> float | None:
    """Student's point estimate minus the best teacher's; None without a student, teachers or numbers."""
    if student is None or student not in row or not _finite(row[student].point):
        return None
    pts = [row[t].point for t in teachers if t in row and _finite(row[t].point)]
    return row[student].point - max(pts) if pts else None


def build_report(models: Mapping[str, dict], student: str | None, tasks: Mapping[str, dict],
                 results: Mapping[str, Mapping[str, Mapping[str, Estimate]]], settings: dict) -> dict:
    """Assemble the report. `results[task][model][metric]` are Estimates; `tasks[task]` its description."""
    from distill import __version__

    teachers = [m for m in models if m != student]
    out_tasks = {}
    for task, info in tasks.items():
        per_model = results.get(task, {})
        metric_names = list(dict.fromkeys(m for model in per_model.values() for m in model))
        metrics = {m: {name: per_model[name][m] for name in models if m in per_model.get(name, {})}
                   for m in metric_names}
        out_tasks[task] = {**info,
                           "metrics": {m: {k: e.to_dict() for k, e in row.items()} for m, row in metrics.items()},
                           "gain": {m: student_gain(row, student, teachers) for m, row in metrics.items()}}
    points = {m: {t: {k: row[m]["point"] for k, row in info["metrics"].items() if m in row}
                  for t, info in out_tasks.items()} for m in models}
    return {"format": FORMAT, "version": 1, "created_by": __version__, "student": student, "teachers": teachers,
            "models": {k: {**v, "role": "student" if k == student else "teacher"} for k, v in models.items()},
            "settings": settings, "tasks": out_tasks, "results": points}


def _est(d: dict) -> Estimate:
    nan = float("nan")
    return Estimate(*(nan if d.get(k) is None else d[k] for k in ("point", "ci_low", "ci_high")), d.get("n", 0))


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def markdown_table(report: dict, task: str) -> str:
    """One row per metric, one column per model ('0.812 [0.78, 0.84]'), the best per row in bold."""
    models, student = list(report["models"]), report["student"]
    t = report["tasks"][task]
    show_gain = student is not None and len(models) > 1
    header = ["task", "metric"] + [f"{m} (student)" if m == student and show_gain else m for m in models]
    if show_gain:
        header.append(f"{student} − best teacher")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for metric, row in t["metrics"].items():
        ests = {m: _est(row[m]) for m in models if m in row}
        pts = [e.point for e in ests.values() if _finite(e.point)]
        best = max(pts) if pts else None
        cells = []
        for m in models:
            if m not in ests:
                cells.append("")
                continue
            text = str(ests[m])
            cells.append(f"**{text}**" if best is not None and ests[m].point == best and len(models) > 1 else text)
        line = [task, metric] + cells
        if show_gain:
            g = t["gain"].get(metric)
            line.append("n/a" if g is None else f"{g:+.3f}")
        lines.append("| " + " | ".join(line) + " |")
    return "\n".join(lines)


def write_markdown(report: dict, out: Path, charts: Mapping[str, str]) -> Path:
    s = report["settings"]
    lines = ["# Evaluation report", ""]
    if report["student"] and report["teachers"]:
        lines.append(f"Student: **{report['student']}**; teachers: {', '.join(report['teachers'])}. "
                     "The last column is the student's point estimate minus the best teacher's.")
    lines += [f"Values: point estimate [95% CI], percentile bootstrap over test samples ({s.get('bootstrap')} "
              f"resamples, seed {s.get('seed')}); the best per row in bold.", "", "## Models", "",
              "| model | role | spec |", "|---|---|---|"]
    lines += [f"| {k} | {v['role']} | `{v['spec']}` |" for k, v in report["models"].items()]
    for task, t in report["tasks"].items():
        sizes = ", ".join(f"{k} {v}" for k, v in t.get("n", {}).items())
        lines += ["", f"## {task}", "", f"{t.get('kind')} on `{t.get('dataset')}` ({sizes})", "",
                  markdown_table(report, task)]
        if task in charts:
            lines += ["", f"![{task}]({charts[task]})"]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _headline(metrics: dict) -> str | None:
    for m in ("accuracy", "mean_auroc"):
        if any(k.endswith("/" + m) for k in metrics):
            return m
    return None


def plot_task(report: dict, task: str, path: Path) -> Path:
    """A grouped bar chart (metrics x models) with CI error bars; probes: headline metric against shots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    t, models = report["tasks"][task], list(report["models"])
    labels = {m: f"{m} (student)" if m == report.get("student") and len(models) > 1 else m for m in models}
    metrics = t["metrics"]
    head = _headline(metrics)
    if t.get("kind") == "linear_probe" and head:
        names = [k for k in metrics if k.endswith("/" + head)]
        fig, ax = plt.subplots(figsize=(max(5.0, 1.0 * len(names) + 2), 3.8))
        x = np.arange(len(names))
        for j, m in enumerate(models):
            e = [_est(metrics[k].get(m, {})) for k in names]
            y = np.array([v.point for v in e], dtype=float)
            err = np.array([[v.point - v.ci_low for v in e], [v.ci_high - v.point for v in e]], dtype=float)
            ax.errorbar(x + (j - (len(models) - 1) / 2) * 0.05, y, yerr=np.nan_to_num(err), marker="o", capsize=3,
                        label=labels[m])
        ax.set_xticks(x, [k.split("/")[0] for k in names])
        ax.set_xlabel("training images per class")
        ax.set_ylabel(f"{head} (95% CI)")
    else:
        names = list(metrics)
        fig, ax = plt.subplots(figsize=(min(16.0, max(6.5, 0.45 * len(names) * max(1, len(models)) + 3)), 4.2))
        x, width = np.arange(len(names)), 0.8 / max(1, len(models))
        for j, m in enumerate(models):
            e = [_est(metrics[k].get(m, {})) for k in names]
            y = np.nan_to_num(np.array([v.point for v in e], dtype=float))
            err = np.nan_to_num(np.clip(np.array([[v.point - v.ci_low for v in e],
                                                  [v.ci_high - v.point for v in e]], dtype=float), 0, None))
            ax.bar(x + (j - (len(models) - 1) / 2) * width, y, width, yerr=err, capsize=3, label=labels[m])
        slant = len(names) > 2 and max(map(len, names)) > 8  # long metric names would run into each other
        ax.set_xticks(x, names, rotation=25 if slant else 0, ha="right" if slant else "center")
        ax.set_ylabel("score (95% bootstrap CI)")
    ax.set_ylim(0, 1.05)
    ax.set_title(task)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)  # never over a bar
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(report: dict, out: str | Path) -> dict[str, Path]:
    """Write report.json, charts/TASK.png and report.md into `out`; returns their paths."""
    out = Path(out)
    (out / "charts").mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json"}
    paths["json"].write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    charts = {}
    for task in report["tasks"]:
        if report["tasks"][task]["metrics"]:
            rel = f"charts/{_slug(task)}.png"
            paths[f"chart:{task}"] = plot_task(report, task, out / rel)
            charts[task] = rel
    paths["md"] = write_markdown(report, out, charts)
    return paths
