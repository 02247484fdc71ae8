"""The task kinds `distill eval` knows: one registry, the single source of truth for task files and the runner.

Why its own tiny module: task files (`tasks.py`) check `kind` against it and the runner dispatches through it,
while each evaluator module registers itself here; holding the registry apart from both keeps the imports one way
(evaluator -> kinds, tasks -> kinds, runner -> evaluators) with no cycle. The built-in kinds register when
`distill.eval` is imported (its `__init__` imports the runner, which imports every evaluator module); another
installed package can add a kind by declaring a `TaskKind` object in the `biomed_distill.eval_kinds` entry point
group.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from teachers.kernel.registry import Registry

SPLIT_ROLES = ("train", "val", "test")

# evaluate(task, model, model_name, splits by role, EvalContext) -> {metric: Estimate}
Evaluate = Callable[[Any, Any, str, dict, Any], dict]


@dataclass(frozen=True)
class TaskKind:
    """What a task of this kind needs from its file and dataset, and the function that evaluates it."""

    evaluate: Evaluate
    roles: tuple[str, ...] = SPLIT_ROLES  # the splits it reads (zero-shot and retrieval read only test)
    needs_classes: bool = True  # at least two class names (retrieval works from captions instead)
    uses_templates: bool = False  # builds prompts from `templates`, each with one "{}"


EVALUATORS: Registry[TaskKind] = Registry("task kind", entry_point_group="biomed_distill.eval_kinds")


def register_kind(name: str, **needs: Any) -> Callable[[Evaluate], Evaluate]:
    """Decorator: register `evaluate` as the task kind `name` (keyword arguments: the TaskKind's needs)."""

    def _add(evaluate: Evaluate) -> Evaluate:
        EVALUATORS.add(name, TaskKind(evaluate, **needs))
        return evaluate

    return _add
