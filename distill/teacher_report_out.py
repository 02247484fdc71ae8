"""The outputs of `distill teachers`: the printed table, teachers.json, the heatmap PNG and the `loss.routing` block."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml

from distill.teacher_report import Report, within_margin


def table(report: Report) -> str:
    """One line per slice: its rows, each teacher's accuracy/skill, the chance level and the best teacher."""
    width = max([5, *(len(s.name) for s in report.slices)])
    cols = [max(13, len(t)) for t in report.teachers]
    head = f"{'slice':<{width}} {'rows':>8} " + " ".join(f"{t:>{c}}" for t, c in zip(report.teachers, cols))
    lines = [
        f"{report.path}: image-to-text top-1 within pools of {report.pool} rows (seed {report.seed}), "
        f"slices by {report.how}; cells: accuracy/skill (skill: above the chance of the teacher's own choices)",
        head + f" {'chance':>7}  best",
    ]
    for s in report.slices:
        accs = " ".join(
            f"{f'{s.accuracy[t]:.3f}/{s.skill[t]:+.3f}':>{c}}" if t in s.accuracy else f"{'-':>{c}}"
            for t, c in zip(report.teachers, cols)
        )
        lines.append(f"{s.name:<{width}} {s.rows:>8} {accs} {s.chance:>7.3f}  {s.best or '-'}")
    return "\n".join(lines)


def write_json(report: Report, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "teachers.json"
    path.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return path


def write_heatmap(report: Report, out: Path) -> Path:
    """teachers.png: slices (rows) x teachers (columns), cell = skill (accuracy above its choices' chance)."""
    import matplotlib  # noqa: PLC0415 (lazy: heavy, only to plot; Agg first)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 (lazy: heavy, only to plot; Agg first)

    grid = np.array([[s.skill.get(t, np.nan) for t in report.teachers] for s in report.slices], dtype=float)
    fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(report.teachers), 1.2 + 0.45 * len(report.slices)))
    im = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(report.teachers)), report.teachers, rotation=30, ha="right")
    ax.set_yticks(range(len(report.slices)), [f"{s.name} ({s.rows})" for s in report.slices])
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            if np.isfinite(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", color="w" if grid[i, j] < 0.6 else "k")
    ax.set_title(f"skill: top-1 image-to-text above chance, pools of {report.pool}")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "teachers.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def routing_block(report: Report, margin: float, auto: dict | None = None) -> dict:
    """{"loss": {"routing": ...}}, shaped as `distill.config.train_config.RoutingCfg`: for column slices, per value
    the teachers within `margin` of its best skill, `default` every teacher (values not listed); for clusters
    (`auto`: the clustering's settings), the `auto` block that recomputes the same clusters and choice in training."""
    if margin < 0:
        raise ValueError(f"--margin must be >= 0, got {margin}")
    if auto is not None:
        return {"loss": {"routing": {"auto": {**auto, "margin": margin, "pool": report.pool}}}}
    teachers = {s.name: within_margin(s, report.teachers, margin) for s in report.slices if s.skill}
    return {"loss": {"routing": {"column": report.column, "teachers": teachers, "default": list(report.teachers)}}}


def write_suggestion(report: Report, margin: float, path: Path, auto: dict | None = None) -> Path:
    block = routing_block(report, margin, auto)
    note = f"# from `distill teachers` on {report.path}: per slice, the teachers within {margin} of the best skill\n"
    if auto is not None:
        note += "# training clusters its own rows the same way and routes each cluster (loss.routing.auto)\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(note + yaml.safe_dump(block, sort_keys=False, allow_unicode=True))
    return path
