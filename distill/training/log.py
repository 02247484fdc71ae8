"""Training logs: one JSON line per logged step (log.jsonl), TensorBoard when installed, a PNG of the loss curves.

Only the main process writes; other processes get a logger whose calls do nothing.
"""

from __future__ import annotations

import json
import math
from pathlib import Path


class RunLogger:
    """Appends `{"step": s, "loss": ..., <term>: ..., "lr": ..., "samples_per_s": ...}` lines to log.jsonl; a dict
    value (rows_per_domain: {domain: rows seen}) is written as a JSON object of integers."""

    def __init__(self, output_dir: str | Path, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(output_dir) / "log.jsonl"
        self._tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415 (lazy: optional dependency tensorboard)
            except ImportError:
                pass
            else:
                self._tb = SummaryWriter(str(Path(output_dir) / "tb"))

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {
            "step": int(step),
            **{k: {n: int(c) for n, c in v.items()} if isinstance(v, dict) else float(v) for k, v in values.items()},
        }
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in values.items():
                for name, x in v.items() if isinstance(v, dict) else [(None, v)]:
                    tag = k if k in ("lr", "samples_per_s") or name is not None else f"loss/{k}"
                    self._tb.add_scalar(tag if name is None else f"{tag}/{name}", float(x), step)

    def truncate_after(self, step: int) -> None:
        """Drop lines logged after `step` (a resumed run repeats them), so the log has each step once."""
        if not self.enabled or not self.path.is_file():
            return
        keep = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in keep))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_log(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_loss_curves(
    log_path: str | Path, out_png: str | Path, skip: tuple[str, ...] = ("step", "lr", "samples_per_s", "epoch")
) -> Path | None:
    """One line per loss key against the step (log scale when all positive); None when there is nothing to plot."""
    rows = read_log(log_path) if Path(log_path).is_file() else []
    if not rows:
        return None
    import matplotlib  # noqa: PLC0415 (lazy: heavy, only to plot; Agg first)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 (lazy: heavy, only to plot; Agg first)

    keys = sorted(
        {k for r in rows for k, v in r.items() if k not in skip and not isinstance(v, dict)},
        key=lambda k: (k != "loss", k),
    )
    fig, ax = plt.subplots(figsize=(7, 4))
    positive = True
    for k in keys:
        pts = [(r["step"], r[k]) for r in rows if k in r and math.isfinite(r[k])]
        if pts:
            ax.plot(*zip(*pts), label=k, linewidth=2.0 if k == "loss" else 1.0)
            positive &= all(v > 0 for _, v in pts)
    if positive:
        ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return Path(out_png)
