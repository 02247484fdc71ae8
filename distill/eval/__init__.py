"""Evaluation (`distill eval`): students and teachers side by side on the same tasks, with bootstrap CIs.

Tasks are YAML files (`tasks.py`), read by `datasets.py`; image embeddings are computed once per model and split
(`embeddings.py`); each task kind has its own module (`zeroshot`, `retrieval`, `linear_probe`, `finetune`), which
registers it in `kinds.EVALUATORS` (what task files' `kind` is checked against and the runner dispatches through);
`metrics.py` and `bootstrap.py` are pure numpy; `compare.py` turns paired bootstrap differences into verdicts;
`chance.py` gives each metric's chance level; `report.py` writes report.json, report.md and PNG charts.
"""

from distill.eval.bootstrap import Difference, Estimate, bootstrap, mean_difference, paired_difference
from distill.eval.chance import chance_levels
from distill.eval.compare import headline_metric, overall_summary, verdict_word
from distill.eval.datasets import SplitData, load_splits
from distill.eval.kinds import EVALUATORS, TaskKind, register_kind
from distill.eval.report import EvalReport
from distill.eval.runner import EvalJob, is_our_export, pick_student, run_eval
from distill.eval.tasks import DatasetCfg, FinetuneCfg, ProbeCfg, TaskCfg, TaskError, data_root, list_tasks, load_task

__all__ = [
    "EvalJob",
    "run_eval",
    "EVALUATORS",
    "TaskKind",
    "register_kind",
    "is_our_export",
    "pick_student",
    "Estimate",
    "bootstrap",
    "Difference",
    "paired_difference",
    "mean_difference",
    "headline_metric",
    "verdict_word",
    "overall_summary",
    "chance_levels",
    "EvalReport",
    "SplitData",
    "load_splits",
    "TaskCfg",
    "DatasetCfg",
    "ProbeCfg",
    "FinetuneCfg",
    "TaskError",
    "data_root",
    "list_tasks",
    "load_task",
]
