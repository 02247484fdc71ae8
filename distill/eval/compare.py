"""Student against teachers and baselines: paired differences, verdicts per task and the mean over tasks.

Pure functions of `Estimate`s (with their bootstrap replicates, see `bootstrap.py`). Each task has one headline
metric (`headline_metric`); its paired difference student - best teacher (the teacher with the largest point
estimate on that task) and student - each baseline gives a verdict word: "better" when the interval lies above 0,
"worse" when below 0, "within" otherwise, None without an interval (bootstrap 0) or a number.
`overall_summary` averages the headline differences over tasks, the interval coming from replicate r of the
mean = the mean over tasks of replicate r (tasks are independent test sets).
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

from .bootstrap import Difference, Estimate, mean_difference, paired_difference

WORDS = ("better", "within", "worse")
AUROC_KEYS = ("macro_auroc", "mean_auroc")


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _shots(key: str) -> int:
    head = key.split("/")[0]
    return int(head.split("-")[0]) if head.endswith("-shot") and head.split("-")[0].isdigit() else -1


def headline_metric(metrics: Iterable[str]) -> str | None:
    """The metric researchers quote for a task, from its metric keys.

    Retrieval: `mean_recall` (R@1/5/10 both ways, averaged). Zero-shot and fine-tuning: `macro_auroc`
    (single-label) or `mean_auroc` (multi-label). Linear probe: the same AUROC of the `full` setting, else of the
    largest few-shot setting. Else the first metric.
    """
    metrics = list(metrics)
    if "mean_recall" in metrics:
        return "mean_recall"
    for key in AUROC_KEYS:
        if key in metrics:
            return key
    for key in AUROC_KEYS:
        probe = [m for m in metrics if m.endswith("/" + key) and m.count("/") == 1]
        if probe:
            full = [m for m in probe if m.startswith("full/")]
            return full[0] if full else max(probe, key=_shots)
    return metrics[0] if metrics else None


def best_model(row: Mapping[str, Estimate], names: Sequence[str]) -> str | None:
    """The model among `names` with the largest finite point estimate (the first of equals); None if none."""
    best = None
    for name in names:
        if name in row and _finite(row[name].point) and (best is None or row[name].point > row[best].point):
            best = name
    return best


def verdict_word(diff: Difference | None) -> str | None:
    """"better" if the interval's low end is > 0, "worse" if its high end is < 0, else "within"; None without an
    interval or a difference."""
    if diff is None or not all(_finite(v) for v in (diff.value, diff.ci_low, diff.ci_high)):
        return None
    if diff.ci_low > 0:
        return "better"
    if diff.ci_high < 0:
        return "worse"
    return "within"


def metric_differences(row: Mapping[str, Estimate], student: str | None, teachers: Sequence[str],
                       baselines: Sequence[str], level: float = 0.95) -> dict:
    """{"student_minus_best_teacher": (teacher, Difference) | None, "student_minus_baseline": {B: Difference},
    "student_minus_teacher": {T: Difference}} (every teacher, e.g. for a teacher's own domain task)."""
    if student is None or student not in row:
        return {"student_minus_best_teacher": None, "student_minus_baseline": {}, "student_minus_teacher": {}}
    best = best_model(row, teachers)
    each = {t: paired_difference(row[student], row[t], level) for t in teachers if t in row}
    return {"student_minus_best_teacher": None if best is None else (best, each[best]),
            "student_minus_baseline": {b: paired_difference(row[student], row[b], level)
                                       for b in baselines if b in row},
            "student_minus_teacher": each}


def _pct(level: float) -> str:
    return f"{100 * level:g}%"


def _teacher_phrase(student: str, teacher: str, diff: Difference, word: str | None, level: float) -> str:
    if word == "better":
        return (f"{student} is better than every teacher beyond the {_pct(level)} interval "
                f"({diff} over best teacher {teacher})")
    if word == "worse":
        return f"{student} is worse than the best teacher {teacher} beyond the {_pct(level)} interval ({diff})"
    if word == "within":
        return f"{student} is within the {_pct(level)} interval of the best teacher {teacher} ({diff})"
    return f"{student} vs the best teacher {teacher}: {diff} (no interval)"


def _baseline_phrase(baseline: str, diff: Difference, word: str | None) -> str:
    if word == "better":
        return f"better than baseline {baseline} beyond the interval ({diff})"
    if word == "worse":
        return f"worse than baseline {baseline} beyond the interval ({diff})"
    if word == "within":
        return f"within the interval of baseline {baseline} ({diff})"
    return f"{diff} against baseline {baseline} (no interval)"


def verdict(metric: str | None, student: str | None, diffs: Mapping, level: float = 0.95) -> dict | None:
    """A task's verdict from `metric_differences` of its headline metric; None without a student or metric."""
    if student is None or metric is None:
        return None
    best = diffs.get("student_minus_best_teacher")
    vs_teachers = None if best is None else verdict_word(best[1])
    vs_baselines = {b: verdict_word(d) for b, d in diffs.get("student_minus_baseline", {}).items()}
    parts = [] if best is None else [_teacher_phrase(student, best[0], best[1], vs_teachers, level)]
    base = [_baseline_phrase(b, d, vs_baselines[b]) for b, d in diffs.get("student_minus_baseline", {}).items()]
    if base and not parts:
        base[0] = f"{student} is {base[0]}"
    text = "; ".join(parts + base) if parts or base else f"{student} has nothing to be compared with"
    return {"metric": metric, "vs_teachers": vs_teachers, "vs_baselines": vs_baselines, "text": text}


def overall_summary(results: Mapping[str, Mapping[str, Mapping[str, Estimate]]], student: str | None,
                    teachers: Sequence[str], baselines: Sequence[str] = (),
                    headlines: Mapping[str, str | None] | None = None, level: float = 0.95) -> dict | None:
    """The headline paired differences averaged over tasks, with intervals and verdicts.

    `results[task][model][metric]` are Estimates holding their replicates (as `run_eval` returns them in
    `report.estimates`); `headlines[task]` defaults to `headline_metric` of the task's metrics. A task enters a
    comparison when both models have a finite point estimate of its headline metric. Returns None without a student,
    else {"metric": "headline", "headlines": {task: metric}, "level",
    "student_minus_best_teacher": {"value", "ci", "verdict", "tasks": [task], "teachers": {task: best}} | None,
    "student_minus_baseline": {B: {"value", "ci", "verdict", "tasks": [task]} | None}, "text"}.
    """
    if student is None:
        return None
    heads: dict[str, str | None] = {}
    vs_teacher: dict[str, tuple[str, Difference]] = {}
    vs_base: dict[str, dict[str, Difference]] = {b: {} for b in baselines}
    for task, per_model in results.items():
        names = list(dict.fromkeys(m for model in per_model.values() for m in model))
        head = (headlines or {}).get(task) or headline_metric(names)
        heads[task] = head
        if head is None:
            continue
        row = {name: est[head] for name, est in per_model.items() if head in est}
        if student not in row or not _finite(row[student].point):
            continue
        d = metric_differences(row, student, teachers, baselines, level)
        if d["student_minus_best_teacher"] is not None:
            vs_teacher[task] = d["student_minus_best_teacher"]
        for b, diff in d["student_minus_baseline"].items():
            if _finite(diff.value):
                vs_base[b][task] = diff

    def summary(diffs: Mapping[str, Difference]) -> tuple[dict, Difference] | None:
        if not diffs:
            return None
        mean = mean_difference(list(diffs.values()), level)
        return {**mean.to_dict(), "verdict": verdict_word(mean), "tasks": list(diffs)}, mean

    out: dict = {"metric": "headline", "headlines": heads, "level": level}
    teach = summary({t: d for t, (_, d) in vs_teacher.items()})
    out["student_minus_best_teacher"] = None if teach is None else {
        **teach[0], "teachers": {t: name for t, (name, _) in vs_teacher.items()}}
    base = {b: summary(diffs) for b, diffs in vs_base.items()}
    out["student_minus_baseline"] = {b: None if s is None else s[0] for b, s in base.items()}
    parts = []
    if teach is not None:
        n = len(teach[0]["tasks"])
        word = teach[0]["verdict"]
        how = {"better": f"better than the best teacher beyond the {_pct(level)} interval",
               "worse": f"worse than the best teacher beyond the {_pct(level)} interval",
               "within": f"within the {_pct(level)} interval of the best teacher"}.get(word, "compared with the "
                                                                                     "best teacher (no interval)")
        parts.append(f"Averaged over {n} task{'s' * (n != 1)}' headline metrics, {student} is {how} "
                     f"({teach[1]} mean difference)")
    for b, s in base.items():
        if s is None:
            continue
        word = s[0]["verdict"]
        how = {"better": f"better than baseline {b} beyond the interval",
               "worse": f"worse than baseline {b} beyond the interval",
               "within": f"within the interval of baseline {b}"}.get(word, f"compared with baseline {b} "
                                                                           "(no interval)")
        parts.append(f"{how} ({s[1]} over {len(s[0]['tasks'])} task{'s' * (len(s[0]['tasks']) != 1)})")
    if parts and teach is None:
        parts[0] = f"Averaged over tasks' headline metrics, {student} is {parts[0]}"
    out["text"] = "; ".join(parts) if parts else f"{student} has nothing to be compared with"
    return out
