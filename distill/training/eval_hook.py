"""`train.eval`: `distill eval` on the student (and its EMA) while it trains.

Why through an export and `run_eval`: the numbers are then exactly what `distill export` + `distill eval` would
give for that step (same loading path, same tasks, same metrics), not a second implementation of zero-shot. The
main process evaluates; the others wait at a barrier. Each evaluation appends one line to `OUTPUT_DIR/eval.jsonl`
(step, and per model and task the headline metric) and leaves the full report in `OUTPUT_DIR/eval/step-N/`.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from distill.config.ema import TrainEvalCfg

log = logging.getLogger(__name__)
EVAL_LOG = "eval.jsonl"


@dataclass
class EvalHook:
    cfg: TrainEvalCfg
    out: Path  # the run folder
    student_dir: Path  # RUN/student-config: what an export of the student needs besides its weights
    total_steps: int

    def check_tasks(self) -> None:
        """Load every task once before training starts, so a wrong name or file fails now, in one line."""
        from distill.eval.tasks import load_task  # noqa: PLC0415 (lazy: only with train.eval)

        for t in self.cfg.tasks:
            load_task(t, max_samples=self.cfg.max_samples)

    def due(self, step: int) -> bool:
        return step == self.total_steps or (self.cfg.every > 0 and step % self.cfg.every == 0)

    def truncate_after(self, step: int) -> None:
        """Drop evaluations after `step` (a resumed run repeats them)."""
        path = self.out / EVAL_LOG
        if path.is_file():
            keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
            path.write_text("".join(ln + "\n" for ln in keep))

    def run(self, student: torch.nn.Module, ema, step: int) -> dict[str, float]:
        """Export `student` (and a copy holding `ema`'s average) into RUN/eval/step-N/, evaluate, log, return the
        headline metrics as {"MODEL/TASK": value}."""
        from distill.eval import EvalJob, run_eval  # noqa: PLC0415 (lazy: only with train.eval)
        from student.export import export_student  # noqa: PLC0415 (lazy: only with train.eval)

        where = self.out / "eval" / f"step-{step}"
        models = {"student": student}
        if ema is not None:
            averaged = copy.deepcopy(student)
            with torch.no_grad():
                for name, p in averaged.named_parameters():
                    if name in ema.average:
                        p.copy_(ema.average[name])
            models["student-ema"] = averaged
        specs = {n: f"local-dir:{export_student(m, self.student_dir, where / 'models' / n)}" for n, m in models.items()}
        report = run_eval(
            EvalJob(
                models=specs,
                tasks=self.cfg.tasks,
                out=str(where),
                device=self.cfg.device,
                bootstrap=self.cfg.bootstrap,
                max_samples=self.cfg.max_samples,
                student="student",
            )
        )
        shutil.rmtree(where / "models", ignore_errors=True)  # the weights are in the checkpoints; keep the report
        found = {}
        for task, info in report["tasks"].items():
            for name in specs:
                found[f"{name}/{task}"] = float(report["results"][name][task][info["headline"]])
        with open(self.out / EVAL_LOG, "a") as f:
            f.write(json.dumps({"step": step, **found}) + "\n")
        tqdm.write(f"eval at step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in found.items()))
        return found
