"""`multi_teacher.py`'s verdicts: per task and over tasks, from `distill eval` reports, in words, JSON and a plot.

The goal (issue 7): on held-out data the student beats the from-scratch baseline beyond the paired 95% interval on
the mean over tasks, and is not below any teacher on that teacher's own domain task beyond the interval. Every
difference here is paired: the same bootstrap resamples of the test rows for both models (`distill eval`).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from benchmarks.mt_confidence import table as confidence_table


def _num(x):
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else x


def _diff(d: dict | None, name_key: str | None = None) -> dict | None:
    if not d:
        return None
    out = {"value": _num(d.get("value")), "ci": [_num(c) for c in d.get("ci", [None, None])]}
    if name_key and d.get(name_key) is not None:
        out[name_key] = d[name_key]
    return out


def word(diff: dict | None) -> str | None:
    """better / within / worse: the paired 95% interval above 0, around 0, below 0."""
    from distill.eval import Difference, verdict_word

    if not diff or None in diff["ci"] or diff["value"] is None:
        return None
    return verdict_word(Difference(diff["value"], *diff["ci"]))


def _model(task: dict, metric: str, name: str | None) -> dict | None:
    e = task["metrics"].get(metric, {}).get(name) if name else None
    if e is None:
        return None
    return {"name": name, "value": _num(e.get("point")), "ci": [_num(e.get("ci_low")), _num(e.get("ci_high"))]}


def verdict_entries(report: dict, student: str, baseline: str, own: dict[str, str]) -> list[dict]:
    """One entry per task (its headline metric) and one for the mean over tasks.

    `own`: task name -> the domain whose teacher (of the same name) that task is the home task of.
    """
    entries = []
    for name, task in report["tasks"].items():
        metric = task["headline"]
        diffs = task.get("differences", {}).get(metric, {})
        best = _diff(diffs.get("student_minus_best_teacher"), "teacher")
        vs_base = _diff(diffs.get("student_minus_baseline", {}).get(baseline))
        others = {b: _diff(d) for b, d in diffs.get("student_minus_baseline", {}).items() if b != baseline}
        home = own.get(name)
        vs_home = _diff(diffs.get("student_minus_teacher", {}).get(home)) if home else None
        if vs_home is not None:
            vs_home["teacher"] = home
        entries.append({
            "task": name, "metric": metric, "own_domain": home,
            "chance": _num(task.get("chance", {}).get(metric)),
            "student": _model(task, metric, student), "baseline": _model(task, metric, baseline),
            "best_teacher": _model(task, metric, best["teacher"] if best else None),
            "student_minus_best_teacher": best, "student_minus_baseline": vs_base,
            "student_minus_other_baselines": others, "student_minus_own_teacher": vs_home,
            "vs_teachers": word(best), "vs_baseline": word(vs_base), "vs_own_teacher": word(vs_home)})
    overall = report.get("overall", {})
    mean_base = _diff(overall.get("student_minus_baseline", {}).get(baseline))
    mean_best = _diff(overall.get("student_minus_best_teacher"))
    entries.append({"task": "mean over tasks", "metric": "headline", "own_domain": None, "chance": None,
                    "student": None, "baseline": None, "best_teacher": None,
                    "student_minus_best_teacher": mean_best, "student_minus_baseline": mean_base,
                    "student_minus_other_baselines": {b: _diff(d) for b, d in overall.get(
                        "student_minus_baseline", {}).items() if b != baseline},
                    "student_minus_own_teacher": None, "vs_teachers": word(mean_best),
                    "vs_baseline": word(mean_base), "vs_own_teacher": None})
    return entries


def goal(entries: list[dict]) -> dict:
    """Whether the issue's goal is met, and the reasons in words."""
    mean = entries[-1]
    beats = mean["vs_baseline"] == "better"
    below = [e["task"] for e in entries[:-1] if e["vs_own_teacher"] == "worse"]
    unknown = [e["task"] for e in entries[:-1] if e["own_domain"] and e["vs_own_teacher"] is None]
    met = beats and not below and not unknown
    why = [f"mean over tasks vs baseline: {fmt(mean['student_minus_baseline'])} ({mean['vs_baseline']})"]
    why.append("below its own-domain teacher beyond the interval on: " + (", ".join(below) if below else "no task"))
    return {"met": met, "beats_baseline_on_mean": beats, "below_own_teacher": below, "text": "; ".join(why)}


def fmt(d: dict | None) -> str:
    if not d or d.get("value") is None:
        return "n/a"
    lo, hi = d["ci"]
    ci = f" [{lo:+.3f}, {hi:+.3f}]" if lo is not None and hi is not None else ""
    return f"{d['value']:+.3f}{ci}"


def verdict_line(e: dict) -> str:
    s = e["student"]
    head = f"**{e['task']}** ({e['metric']}" + (f", chance {e['chance']:.3f}" if e["chance"] is not None else "") + ")"
    parts = []
    if s and s["value"] is not None:
        parts.append(f"student {s['value']:.3f}")
    parts.append(f"vs baseline {fmt(e['student_minus_baseline'])}: {e['vs_baseline'] or 'n/a'}")
    best = e["student_minus_best_teacher"]
    if best:
        who = f" ({best['teacher']})" if best.get("teacher") else ""
        parts.append(f"vs best teacher{who} {fmt(best)}: {e['vs_teachers'] or 'n/a'}")
    if e["student_minus_own_teacher"]:
        parts.append(f"vs its own-domain teacher {e['own_domain']} {fmt(e['student_minus_own_teacher'])}: "
                     f"{e['vs_own_teacher']}")
    return f"- {head}: " + "; ".join(parts)


def ablation_table(results: dict) -> str:
    """Variants x tasks: student - baseline and student - own teacher with intervals; the mean over tasks."""
    first = next(iter(results.values()))["entries"]
    tasks = [e["task"] for e in first[:-1]]
    head = ["variant", "mean - baseline", *[f"{t} - baseline" for t in tasks],
            *[f"{e['task']} - own teacher" for e in first[:-1] if e["own_domain"]], "goal"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        es = r["entries"]
        row = [name, fmt(es[-1]["student_minus_baseline"])]
        row += [fmt(e["student_minus_baseline"]) for e in es[:-1]]
        row += [fmt(e["student_minus_own_teacher"]) for e in es[:-1] if e["own_domain"]]
        row.append("met" if goal(es)["met"] else "not met")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot_ablation(results: dict, path: Path) -> Path:
    """Forest plot: per variant, student - baseline on every task and on the mean, with 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    tasks = [e["task"] for e in results[names[0]]["entries"]]
    fig, ax = plt.subplots(figsize=(8, 0.5 + 0.45 * len(names) * len(tasks) / 2 + 1))
    y, ticks, labels = 0, [], []
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ti, task in enumerate(tasks):
        for name in names:
            e = next(x for x in results[name]["entries"] if x["task"] == task)
            d = e["student_minus_baseline"]
            if d and d["value"] is not None and None not in d["ci"]:
                ax.errorbar(d["value"], y, xerr=[[d["value"] - d["ci"][0]], [d["ci"][1] - d["value"]]], fmt="o",
                            color=colours[names.index(name) % len(colours)], capsize=3,
                            label=name if ti == 0 else None, ms=6 if task == "mean over tasks" else 4)
            ticks.append(y)
            labels.append(f"{task} | {name}")
            y -= 1
        y -= 0.6
    ax.axvline(0, color="grey", ls="--", lw=1)
    ax.set_yticks(ticks, labels, fontsize=7)
    ax.set_xlabel("student - baseline (headline metric), paired 95% interval")
    ax.set_title("Student - baseline, paired 95% CI\n(right of the dashed line: the student is better)", fontsize=10)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_outputs(out: Path, results: dict, setup: dict) -> dict[str, Path]:
    """OUT/report.md + OUT/verdict.json for the first variant; OUT/ablation.{md,json,png} for all of them."""
    first_name = next(iter(results))
    first = results[first_name]
    g = goal(first["entries"])
    verdict = out / "verdict.json"
    verdict.write_text(json.dumps(first["entries"], indent=2) + "\n")
    eval_md = (out / "variants" / first_name / "report.md").read_text()
    lines = [f"# Multi-teacher benchmark: student `{first_name}`", "",
             f"Budget `{setup['flags']['budget']}`, student corpus {setup['flags']['student_fraction']:.0%} of each "
             f"domain, seed {setup['flags']['seed']} (students {setup['student_seed']}), {setup['threads']} torch threads, "
             f"{setup['timings_s']['total']:.0f} s in all.", "",
             f"**Goal {'met' if g['met'] else 'not met'}**: {g['text']}.", "", "## Verdict per task", "",
             *[verdict_line(e) for e in first["entries"]], "",
             "Differences are paired (the same bootstrap resamples of the test rows for both models); 'better' "
             "and 'worse' mean the 95% interval excludes 0. Each task's interval covers test-set sampling only, "
             "not training seeds.", "", "## The `distill eval` report", "",
             "## Label-free confidence weighting against routing", "",
             "Mean weight that `loss.combine.mode: confidence` gives each teacher (columns) on the rows of each "
             "domain (rows), on random batches of the cached features; routing puts all of it on the domain's own "
             "teacher.", "", confidence_table(setup["confidence_by_domain"]), "",
             eval_md.replace("\n# ", "\n### ").replace("\n## ", "\n### ").removeprefix("# "),
             "", "## Setup", "", "```json", json.dumps({k: setup[k] for k in ("budget", "timings_s", "teachers",
                                                                               "routing")}, indent=2), "```"]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    paths = {"report": report, "verdict": verdict}
    if len(results) > 1:
        table = ablation_table(results)
        notes = "\n".join(f"- `{n}`: {r['variant'].note or ' '.join(r['variant'].overrides)}"
                          for n, r in results.items())
        (out / "ablation.md").write_text(
            f"# Ablation ({setup['flags']['budget']} budget)\n\nstudent - baseline and student - own-domain "
            f"teacher on each task's headline metric, paired 95% intervals.\n\n{table}\n\n{notes}\n\n"
            f"Confidence weights by domain (see report.md):\n\n{confidence_table(setup['confidence_by_domain'])}\n")
        (out / "ablation.json").write_text(json.dumps(
            {"setup": setup, "variants": {n: {"note": r["variant"].note, "overrides": list(r["variant"].overrides),
                                              "goal": goal(r["entries"]), "entries": r["entries"]}
                                          for n, r in results.items()}}, indent=2, default=str) + "\n")
        paths["ablation"] = out / "ablation.md"
        paths["plot"] = plot_ablation(results, out / "ablation.png")
    return paths
