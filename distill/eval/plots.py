"""The eval report's charts (one PNG per task) and the small readers they share with the report's tables."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from distill.eval.bootstrap import Estimate


def estimate_of(d: dict) -> Estimate:
    """An Estimate read back from its report.json form (NaN where the JSON has null)."""
    point, low, high = (float("nan") if d.get(k) is None else d[k] for k in ("point", "ci_low", "ci_high"))
    return Estimate(point, low, high, d.get("n", 0))


def model_label(m: str, role: str, n_models: int) -> str:
    """A model as table headers and chart legends name it: 'ours (student)'; just 'student' when the name already
    says the role (never 'student (student)')."""
    return f"{m} ({role})" if role != "teacher" and n_models > 1 and m != role else m


def plot_task(report: dict, task: str, path: Path) -> Path:
    """A grouped bar chart (metrics x models) with CI error bars and a dashed chance line per metric;
    linear probes: the headline metric against shots, chance as a dashed line."""
    import matplotlib  # noqa: PLC0415 (lazy: heavy, only to plot; Agg first)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 (lazy: heavy, only to plot; Agg first)

    t, models = report["tasks"][task], list(report["models"])
    role = {m: v.get("role", "teacher") for m, v in report["models"].items()}
    labels = {m: model_label(m, role[m], len(models)) for m in models}
    metrics, chance = t["metrics"], t.get("chance", {})
    head = (t.get("headline") or "").split("/")[-1]
    if t.get("kind") == "linear_probe" and head:
        names = [k for k in metrics if k.endswith("/" + head) and k.count("/") == 1]
        fig, ax = plt.subplots(figsize=(max(5.0, 1.0 * len(names) + 2), 3.8))
        x = np.arange(len(names))
        for j, m in enumerate(models):
            e = [estimate_of(metrics[k].get(m, {})) for k in names]
            y = np.array([v.point for v in e], dtype=float)
            err = np.array([[v.point - v.ci_low for v in e], [v.ci_high - v.point for v in e]], dtype=float)
            ax.errorbar(
                x + (j - (len(models) - 1) / 2) * 0.05,
                y,
                yerr=np.nan_to_num(err),
                marker="o",
                capsize=3,
                label=labels[m],
            )
        levels = [chance.get(k) for k in names if chance.get(k) is not None]
        if levels:
            ax.axhline(levels[0], color="0.3", linestyle="--", linewidth=1, label="chance")
        ax.set_xticks(x, [k.split("/")[0] for k in names])
        ax.set_xlabel("training images per class")
        ax.set_ylabel(f"{head} (95% CI)")
    else:
        names = list(metrics)
        fig, ax = plt.subplots(figsize=(min(16.0, max(6.5, 0.45 * len(names) * max(1, len(models)) + 3)), 4.2))
        x, width = np.arange(len(names)), 0.8 / max(1, len(models))
        for j, m in enumerate(models):
            e = [estimate_of(metrics[k].get(m, {})) for k in names]
            y = np.nan_to_num(np.array([v.point for v in e], dtype=float))
            err = np.nan_to_num(
                np.clip(
                    np.array([[v.point - v.ci_low for v in e], [v.ci_high - v.point for v in e]], dtype=float), 0, None
                )
            )
            ax.bar(x + (j - (len(models) - 1) / 2) * width, y, width, yerr=err, capsize=3, label=labels[m])
        first = True
        for i, k in enumerate(names):  # one dashed segment over each metric's group of bars
            if chance.get(k) is not None:
                ax.hlines(
                    chance[k],
                    i - 0.45,
                    i + 0.45,
                    colors="0.15",
                    linestyles="--",
                    linewidth=1.2,
                    label="chance" if first else None,  # type: ignore[arg-type]  # None: no legend entry
                    zorder=3,
                )
                first = False
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
