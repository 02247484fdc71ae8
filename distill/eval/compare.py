"""Student against teachers and baselines: paired differences, verdicts per task and the mean over tasks.

Pure functions of `Estimate`s (with their bootstrap replicates, see `bootstrap.py`). Each task has one headline
metric (`headline_metric`); its paired difference student - best teacher (the teacher with the largest point
estimate on that task) and student - each baseline gives a verdict word: "better" when the interval lies above 0,
"worse" when below 0, "within" otherwise, None without an interval (bootstrap 0) or a number.
`overall_summary` averages the headline differences over tasks, the interval coming from replicate r of the
mean = the mean over tasks of replicate r (tasks are independent test sets). `task_flags` finds the models whose
numbers say little (headline interval below chance; one predicted class), and every verdict that compares with
such a model, or is about such a student, says so in the same text.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from distill.eval.bootstrap import Difference, Estimate, mean_difference, paired_difference

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
    """ "better" if the interval's low end is > 0, "worse" if its high end is < 0, else "within"; None without an
    interval or a difference."""
    if diff is None or not all(_finite(v) for v in (diff.value, diff.ci_low, diff.ci_high)):
        return None
    if diff.ci_low > 0:
        return "better"
    if diff.ci_high < 0:
        return "worse"
    return "within"


def metric_differences(
    row: Mapping[str, Estimate],
    student: str | None,
    teachers: Sequence[str],
    baselines: Sequence[str],
    level: float = 0.95,
) -> dict:
    """{"student_minus_best_teacher": (teacher, Difference) | None, "student_minus_baseline": {B: Difference},
    "student_minus_teacher": {T: Difference}} (every teacher, e.g. for a teacher's own domain task)."""
    if student is None or student not in row:
        return {"student_minus_best_teacher": None, "student_minus_baseline": {}, "student_minus_teacher": {}}
    best = best_model(row, teachers)
    each = {t: paired_difference(row[student], row[t], level) for t in teachers if t in row}
    return {
        "student_minus_best_teacher": None if best is None else (best, each[best]),
        "student_minus_baseline": {b: paired_difference(row[student], row[b], level) for b in baselines if b in row},
        "student_minus_teacher": each,
    }


@dataclass(frozen=True)
class Flags:
    """The models of one task whose numbers say little, named in the verdict beside any comparison with them.

    `below_chance`: the headline metric's interval lies entirely below its chance level (an AUROC of 0.19 when
    chance is 0.5: the model ranks backwards; beating it is no achievement). Without an interval (bootstrap 0)
    nothing is flagged. `one_class`: in the headline's setting the model gives every test image the same class
    (`Estimate.classes_predicted` == 1), so its accuracy-type metrics are those of a constant answer."""

    metric: str | None = None
    chance: float | None = None
    below_chance: dict[str, Estimate] = field(default_factory=dict)  # model -> its headline estimate
    one_class: dict[str, tuple[str, Estimate]] = field(default_factory=dict)  # model -> (metric, its estimate)

    def to_dict(self) -> dict:
        return {"below_chance": list(self.below_chance), "one_class": list(self.one_class)}

    def notes(self, model: str, who: str) -> list[str]:
        """What to say about `model` (called `who` in the sentence): '{who} is below chance (...)', ..."""
        out = []
        if model in self.below_chance:
            out.append(
                f"{who} is below chance ({self.metric} {self.below_chance[model]} against chance {self.chance:.3f})"
            )
        if model in self.one_class:
            metric, est = self.one_class[model]
            out.append(f"{who} predicts one class for every test image ({metric} {est})")
        return out


def below_chance(e: Estimate, chance: float | None) -> bool:
    """Whether `e`'s whole interval lies below `chance` (no interval, or no chance level: False)."""
    return chance is not None and _finite(e.ci_high) and e.ci_high < chance


def task_flags(metrics: Mapping[str, Mapping[str, Estimate]], head: str | None, chance: float | None = None) -> Flags:
    """`Flags` of a task from `metrics[metric][model]` Estimates, its headline metric and that metric's chance."""
    if head is None:
        return Flags()
    below = {m: e for m, e in metrics.get(head, {}).items() if below_chance(e, chance)}
    prefix = head.rsplit("/", 1)[0] + "/" if "/" in head and not head.startswith("auroc/") else ""
    keys = [prefix + p for p in ("balanced_accuracy", "accuracy", "macro_f1") if prefix + p in metrics]
    one = {}
    for key in keys:
        for model, e in metrics[key].items():
            if e.classes_predicted == 1 and model not in one:
                one[model] = (key, e)
    return Flags(head, chance, below, one)


def _pct(level: float) -> str:
    return f"{100 * level:g}%"


def _teacher_phrase(student: str, teacher: str, diff: Difference, word: str | None, level: float) -> str:
    if word == "better":
        return (
            f"{student} is better than every teacher beyond the {_pct(level)} interval "
            f"({diff} over best teacher {teacher})"
        )
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


def _though(phrase: str, notes: list[str]) -> str:
    return phrase + (", though " + " and ".join(notes) if notes else "")


def verdict(
    metric: str | None, student: str | None, diffs: Mapping, level: float = 0.95, flags: Flags | None = None
) -> dict | None:
    """A task's verdict from `metric_differences` of its headline metric; None without a student or metric.

    With `flags`, a comparison with a below-chance or one-class model says so in the same sentence, and the
    student's own flags end the text ("caution: ..."), so no "better" stands unqualified."""
    if student is None or metric is None:
        return None
    flags = flags or Flags()
    best = diffs.get("student_minus_best_teacher")
    vs_teachers = None if best is None else verdict_word(best[1])
    vs_baselines = {b: verdict_word(d) for b, d in diffs.get("student_minus_baseline", {}).items()}
    parts = (
        []
        if best is None
        else [_though(_teacher_phrase(student, best[0], best[1], vs_teachers, level), flags.notes(best[0], best[0]))]
    )
    base = [
        _though(_baseline_phrase(b, d, vs_baselines[b]), flags.notes(b, b))
        for b, d in diffs.get("student_minus_baseline", {}).items()
    ]
    if base and not parts:
        base[0] = f"{student} is {base[0]}"
    text = "; ".join(parts + base) if parts or base else f"{student} has nothing to be compared with"
    text += "".join(f"; caution: {n}" for n in flags.notes(student, student))
    return {"metric": metric, "vs_teachers": vs_teachers, "vs_baselines": vs_baselines, "text": text, **flags.to_dict()}


def overall_cautions(student: str, compared: Mapping[str, Sequence[str]], flags: Mapping[str, Flags]) -> list[str]:
    """Clauses for the overall text: which compared models (`compared[model]`: the tasks it enters the mean on)
    and the student are below chance or predict one class, on which tasks."""
    out = []
    for model in [student, *compared]:
        tasks = list(flags) if model == student else compared[model]
        for what, attr in (("below chance", "below_chance"), ("predicts one class", "one_class")):
            hit = [t for t in tasks if model in getattr(flags[t], attr)]
            if hit:
                out.append(
                    f"{'caution: ' if model == student else 'note: '}{model} "
                    f"{'is ' if attr == 'below_chance' else ''}{what} on {', '.join(hit)}"
                )
    return out


def _over(tasks: Sequence[str], heads: Mapping[str, str | None]) -> str:
    """'Averaged over 3 tasks' headline metrics', or for one task 'On TASK's headline metric (METRIC)'."""
    if len(tasks) == 1:
        return f"On {tasks[0]}'s headline metric ({heads.get(tasks[0])})"
    return f"Averaged over {len(tasks)} tasks' headline metrics"


def overall_summary(
    results: Mapping[str, Mapping[str, Mapping[str, Estimate]]],
    student: str | None,
    teachers: Sequence[str],
    baselines: Sequence[str] = (),
    headlines: Mapping[str, str | None] | None = None,
    level: float = 0.95,
    flags: Mapping[str, Flags] | None = None,
) -> dict | None:
    """The headline paired differences averaged over tasks, with intervals and verdicts.

    `results[task][model][metric]` are Estimates holding their replicates (as `run_eval` returns them in
    `report.estimates`); `headlines[task]` defaults to `headline_metric` of the task's metrics. A task enters a
    comparison when both models have a finite point estimate of its headline metric. Returns None without a student,
    else {"metric": "headline", "headlines": {task: metric}, "level",
    "student_minus_best_teacher": {"value", "ci", "verdict", "tasks": [task], "teachers": {task: best}} | None,
    "student_minus_baseline": {B: {"value", "ci", "verdict", "tasks": [task]} | None}, "text"}. With `flags`
    (`task_flags` per task) the text also names the compared models and the student where they are below chance
    or predict one class.
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
    out["student_minus_best_teacher"] = (
        None if teach is None else {**teach[0], "teachers": {t: name for t, (name, _) in vs_teacher.items()}}
    )
    base = {b: summary(diffs) for b, diffs in vs_base.items()}
    out["student_minus_baseline"] = {b: None if s is None else s[0] for b, s in base.items()}
    parts = []
    if teach is not None:
        n = len(teach[0]["tasks"])
        word = teach[0]["verdict"]
        how = {
            "better": f"better than the best teacher beyond the {_pct(level)} interval",
            "worse": f"worse than the best teacher beyond the {_pct(level)} interval",
            "within": f"within the {_pct(level)} interval of the best teacher",
        }.get(word, "compared with the best teacher (no interval)")
        parts.append(
            f"{_over(teach[0]['tasks'], heads)}, {student} is {how} ({teach[1]} {'mean ' if n > 1 else ''}difference)"
        )
    for b, s in base.items():
        if s is None:
            continue
        word = s[0]["verdict"]
        how = {
            "better": f"better than baseline {b} beyond the interval",
            "worse": f"worse than baseline {b} beyond the interval",
            "within": f"within the interval of baseline {b}",
        }.get(word, f"compared with baseline {b} (no interval)")
        k = len(s[0]["tasks"])
        parts.append(f"{how} ({s[1]} {f'over {k} tasks' if k > 1 else 'on ' + s[0]['tasks'][0]})")
    if parts and teach is None:
        used = list(dict.fromkeys(t for s in base.values() if s is not None for t in s[0]["tasks"]))
        parts[0] = f"{_over(used, heads)}, {student} is {parts[0]}"
    if flags:
        compared: dict[str, list[str]] = {}
        for t, (name, _) in vs_teacher.items():
            compared.setdefault(name, []).append(t)
        for b, s in base.items():
            if s is not None:
                compared.setdefault(b, []).extend(s[0]["tasks"])
        parts += overall_cautions(student, compared, {t: flags.get(t, Flags()) for t in results})
    out["text"] = "; ".join(parts) if parts else f"{student} has nothing to be compared with"
    return out
