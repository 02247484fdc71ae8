"""The evaluation report: `report.json` (every number), `report.md` (tables) and PNG charts beside them.

Layout of report.json::

    {"format": "biomed-distill-eval", "version": 1, "student": NAME | null, "baselines": [NAME, ...],
     "teachers": [NAME, ...],                                   # every model that is neither student nor baseline
     "models": {NAME: {"spec", "role": "student" | "baseline" | "teacher", "embed_dim"}}, "settings": {...},
     "tasks": {TASK: {"kind", "source", "dataset", "n": {split: rows}, "classes",
                      "metrics": {METRIC: {MODEL: {"point", "ci_low", "ci_high", "n"}}},
                      "headline": METRIC | null,                # the metric the verdict is about
                      "chance": {METRIC: expected value of a random scorer | null},
                      "majority": {ACCURACY METRIC: accuracy of always answering the commonest test class},
                      "flags": {"below_chance": [MODEL], "one_class": [MODEL]},  # see compare.Flags
                      "gain": {METRIC: student point - best teacher point | null},
                      "differences": {METRIC: {                 # paired bootstrap, same resamples for every model
                          "student_minus_best_teacher": {"teacher": NAME, "value": x, "ci": [lo, hi]} | null,
                          "student_minus_baseline": {BASELINE: {"value": x, "ci": [lo, hi]}},
                          "student_minus_teacher": {TEACHER: {"value": x, "ci": [lo, hi]}}}},
                      "verdict": {"metric", "vs_teachers": "better" | "within" | "worse" | null,
                                  "vs_baselines": {BASELINE: word | null}, "text",
                                  "below_chance": [MODEL], "one_class": [MODEL]} | null}},
     "overall": {"metric": "headline", "headlines": {TASK: METRIC}, "level",
                 "student_minus_best_teacher": {"value", "ci", "verdict", "tasks", "teachers": {TASK: NAME}} | null,
                 "student_minus_baseline": {BASELINE: {"value", "ci", "verdict", "tasks"} | null}, "text"} | null,
     "results": {MODEL: {TASK: {METRIC: point | null}}}}   # the point estimates alone (model cards read these)

Every metric is higher-is-better, so "best" is the largest point estimate. NaN is written as null. An estimate of
a metric of predictions (accuracy, balanced accuracy, macro-F1) also holds "classes_predicted". Paths (model
folders, datasets) are written relative to REPORT_DIR or by name (`student.shown_paths`), never absolute.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from distill import __version__
from distill.eval.bootstrap import Difference, Estimate
from distill.eval.compare import (
    Flags,
    below_chance,
    best_model,
    headline_metric,
    metric_differences,
    overall_summary,
    task_flags,
    verdict,
)
from distill.eval.plots import estimate_of, model_label, plot_task

FORMAT = "biomed-distill-eval"


class EvalReport(dict):
    """The report.json dict, plus `estimates[task][model][metric]`: the Estimates with their bootstrap replicates
    (in memory only), for `compare.overall_summary` over any subset of tasks or models."""

    estimates: Mapping[str, Mapping[str, Mapping[str, Estimate]]]


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def student_gain(row: Mapping[str, Estimate], student: str | None, teachers: list[str]) -> float | None:
    """Student's point estimate minus the best teacher's; None without a student, teachers or numbers."""
    if student is None or student not in row or not _finite(row[student].point):
        return None
    best = best_model(row, teachers)
    return None if best is None else row[student].point - row[best].point


def _differences_json(d: dict) -> dict:
    best = d["student_minus_best_teacher"]
    return {
        "student_minus_best_teacher": None if best is None else {"teacher": best[0], **best[1].to_dict()},
        "student_minus_baseline": {b: diff.to_dict() for b, diff in d["student_minus_baseline"].items()},
        "student_minus_teacher": {t: diff.to_dict() for t, diff in d["student_minus_teacher"].items()},
    }


def roles(models: Sequence[str], student: str | None, baselines: Sequence[str] = ()) -> dict[str, str]:
    """{model: "student" | "baseline" | "teacher"}."""
    return {m: "student" if m == student else "baseline" if m in baselines else "teacher" for m in models}


def build_report(
    models: Mapping[str, dict],
    student: str | None,
    tasks: Mapping[str, dict],
    results: Mapping[str, Mapping[str, Mapping[str, Estimate]]],
    settings: dict,
    baselines: Sequence[str] = (),
    chance: Mapping[str, Mapping[str, float | None]] | None = None,
    majority: Mapping[str, Mapping[str, float]] | None = None,
) -> EvalReport:
    """Assemble the report. `results[task][model][metric]` are Estimates; `tasks[task]` its description;
    `chance[task][metric]` the chance levels (`chance.chance_levels`), `majority[task][metric]` accuracy's
    majority-class levels (`chance.majority_levels`)."""
    role = roles(list(models), student, baselines)
    teachers = [m for m, r in role.items() if r == "teacher"]
    baselines = [m for m, r in role.items() if r == "baseline"]
    level = settings.get("confidence", 0.95)
    out_tasks = {}
    flags: dict[str, Flags] = {}
    for task, info in tasks.items():
        per_model = results.get(task, {})
        metric_names = list(dict.fromkeys(m for model in per_model.values() for m in model))
        metrics = {
            m: {name: per_model[name][m] for name in models if m in per_model.get(name, {})} for m in metric_names
        }
        diffs = {m: metric_differences(row, student, teachers, baselines, level) for m, row in metrics.items()}
        head = headline_metric(metric_names)
        task_chance = (chance or {}).get(task, {})
        flags[task] = task_flags(metrics, head, None if head is None else task_chance.get(head))
        out_tasks[task] = {
            **info,
            "metrics": {m: {k: e.to_dict() for k, e in row.items()} for m, row in metrics.items()},
            "headline": head,
            "chance": {m: task_chance.get(m) for m in metric_names},
            "majority": dict((majority or {}).get(task, {})),
            "flags": flags[task].to_dict(),
            "gain": {m: student_gain(row, student, teachers) for m, row in metrics.items()},
            "differences": ({m: _differences_json(d) for m, d in diffs.items()} if student is not None else {}),
            "verdict": verdict(head, student, {} if head is None else diffs.get(head, {}), level, flags[task]),
        }
    points = {
        m: {t: {k: row[m]["point"] for k, row in info["metrics"].items() if m in row} for t, info in out_tasks.items()}
        for m in models
    }
    report = EvalReport(
        {
            "format": FORMAT,
            "version": 1,
            "created_by": __version__,
            "student": student,
            "baselines": baselines,
            "teachers": teachers,
            "models": {k: {**v, "role": role[k]} for k, v in models.items()},
            "settings": settings,
            "tasks": out_tasks,
            "overall": overall_summary(
                {t: results.get(t, {}) for t in tasks},
                student,
                teachers,
                baselines,
                {t: out_tasks[t]["headline"] for t in out_tasks},
                level,
                flags,
            ),
            "results": points,
        }
    )
    report.estimates = results
    return report


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def _diff_text(d: dict | None) -> str:
    if d is None:
        return "n/a"
    nan = float("nan")
    lo, hi = (nan if v is None else v for v in d["ci"])
    return str(Difference(nan if d["value"] is None else d["value"], lo, hi))


def markdown_table(report: dict, task: str) -> str:
    """One row per metric, one column per model ('0.812 [0.78, 0.84]', the best per row in bold), the chance
    level (accuracy: also its majority-class level), then the student's paired differences: minus the best
    teacher, minus each baseline. A value whose interval lies below chance is marked '(below chance)', a metric of
    predictions from a model that predicts one class '(one class)'."""
    models, student = list(report["models"]), report["student"]
    baselines = [m for m in report.get("baselines", []) if m in report["models"]]
    n_teachers = len(report.get("teachers", []))
    t = report["tasks"][task]
    role = {m: v.get("role", "teacher") for m, v in report["models"].items()}
    show_gain = student is not None and n_teachers > 0
    show_base = student is not None and bool(baselines)
    header = ["task", "metric"] + [model_label(m, role[m], len(models)) for m in models] + ["chance"]
    if show_gain:
        header.append(f"{student} − best teacher")
    if show_base:
        header += [f"{student} − {b}" for b in baselines]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for metric, row in t["metrics"].items():
        ests = {m: estimate_of(row[m]) for m in models if m in row}
        pts = [e.point for e in ests.values() if _finite(e.point)]
        best = max(pts) if pts else None
        cells = []
        for m in models:
            if m not in ests:
                cells.append("")
                continue
            text = str(ests[m])
            top = best is not None and math.isclose(ests[m].point, best, rel_tol=0, abs_tol=1e-12)
            text = f"**{text}**" if top and len(models) > 1 else text
            c = t.get("chance", {}).get(metric)
            marks = ["below chance"] if below_chance(ests[m], c) else []
            marks += ["one class"] if row[m].get("classes_predicted") == 1 else []
            cells.append(text + (f" ({', '.join(marks)})" if marks else ""))
        c, maj = t.get("chance", {}).get(metric), t.get("majority", {}).get(metric)
        line = (
            [task, metric]
            + cells
            + [("" if c is None else f"{c:.3f}") + ("" if maj is None else f" (majority {maj:.3f})")]
        )
        diffs = t.get("differences", {}).get(metric, {})
        if show_gain:
            d = diffs.get("student_minus_best_teacher")
            line.append(_diff_text(d) + (f" (vs {d['teacher']})" if d is not None and n_teachers > 1 else ""))
        if show_base:
            line += [_diff_text(diffs.get("student_minus_baseline", {}).get(b)) for b in baselines]
        lines.append("| " + " | ".join(line) + " |")
    return "\n".join(lines)


def overall_markdown(report: dict) -> list[str]:
    """The "Overall" section: mean over tasks of the headline paired differences, with intervals and verdicts."""
    o = report.get("overall")
    if not o:
        return []
    student = report["student"]
    lines = [
        "",
        "## Overall",
        "",
        o["text"] + ".",
        "",
        "| comparison | mean difference [95% CI] | verdict | tasks |",
        "|---|---|---|---|",
    ]
    rows = [(f"{student} − best teacher", o.get("student_minus_best_teacher"))]
    rows += [(f"{student} − {b}", d) for b, d in o.get("student_minus_baseline", {}).items()]
    for name, d in rows:
        if d is not None:
            lines.append(f"| {name} | {_diff_text(d)} | {d['verdict'] or 'n/a'} | {', '.join(d['tasks'])} |")
    heads = ", ".join(f"{t} {m}" for t, m in o.get("headlines", {}).items() if m)
    lines += [
        "",
        f"Headline metric per task: {heads}. Replicate r of the mean is the mean over tasks of each "
        "task's replicate r (tasks are independent test sets); better/worse: the interval lies above/below 0.",
    ]
    return lines


def _flag_text(report: dict, task: str) -> str:
    """'caution: A is below chance (...); B predicts one class ...' for a task without a verdict (no student)."""
    t = report["tasks"][task]
    head, c = t.get("headline"), t.get("chance", {}).get(t.get("headline"))
    notes = []
    for m in t.get("flags", {}).get("below_chance", []):
        notes.append(f"{m} is below chance ({head} {estimate_of(t['metrics'][head][m])} against chance {c:.3f})")
    for m in t.get("flags", {}).get("one_class", []):
        key = next((k for k, row in t["metrics"].items() if row.get(m, {}).get("classes_predicted") == 1), head)
        notes.append(f"{m} predicts one class for every test image ({key} {estimate_of(t['metrics'][key][m])})")
    return "; ".join(f"caution: {n}" for n in notes)


def task_sentence(report: dict, task: str) -> tuple[str, str] | None:
    """(what, sentence): ("(headline metric M)", the verdict) or, without a student, ("", 'caution: ...');
    None when there is nothing to say."""
    t = report["tasks"][task]
    v = t.get("verdict")
    if v:
        return f"(headline metric {v['metric']})", f"{v['text']}."
    flags = _flag_text(report, task)
    return ("", f"{flags}.") if flags else None


def console_lines(report: dict) -> list[str]:
    """What `distill eval` prints when done: each task's verdict (or cautions) and the overall sentence."""
    said = {task: task_sentence(report, task) for task in report["tasks"]}
    lines = [f"{task}{' ' + s[0] if s[0] else ''}: {s[1]}" for task, s in said.items() if s]
    o = report.get("overall")
    if o and len(report["tasks"]) > 1:
        lines.append(f"Overall: {o['text']}.")
    return lines


def write_markdown(report: dict, out: Path, charts: Mapping[str, str]) -> Path:
    s = report["settings"]
    level = s.get("confidence", 0.95)
    lines = ["# Evaluation report", ""]
    if report["student"] and (report["teachers"] or report.get("baselines")):
        who = [f"Student: **{report['student']}**"]
        if report.get("baselines"):
            who.append(f"baselines: {', '.join(report['baselines'])}")
        if report["teachers"]:
            who.append(f"teachers: {', '.join(report['teachers'])}")
        lines.append(
            "; ".join(who) + ". After the models come the chance level (the expected score of a random "
            "scorer; for accuracy also the majority-class level, the accuracy of always answering the "
            "commonest test class) and the student's paired differences (student − best teacher, "
            f"student − each baseline) with {100 * level:g}% intervals from the same bootstrap resamples "
            "for every model."
        )
    lines += [
        f"Values: point estimate [{100 * level:g}% CI], percentile bootstrap over test samples "
        f"({s.get('bootstrap')} resamples, seed {s.get('seed')}); the best per row in bold.",
        "",
        "## Models",
        "",
        "| model | role | spec |",
        "|---|---|---|",
    ]
    lines += [f"| {k} | {v['role']} | `{v['spec']}` |" for k, v in report["models"].items()]
    lines += overall_markdown(report)
    for task, t in report["tasks"].items():
        sizes = ", ".join(f"{k} {v}" for k, v in t.get("n", {}).items())
        lines += [
            "",
            f"## {task}",
            "",
            f"{t.get('kind')} on `{t.get('dataset')}` ({sizes})",
            "",
            markdown_table(report, task),
        ]
        said = task_sentence(report, task)
        if said:
            lines += ["", f"**Verdict** {said[0]}: {said[1]}" if t.get("verdict") else f"**Note**: {said[1]}"]
        if t.get("audit"):  # distill audit's record for the student's training corpus (distill.audit_record)
            lines += ["", f"**Audit**: {t['audit']}."]
        if task in charts:
            lines += ["", f"![{task}]({charts[task]})"]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
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
