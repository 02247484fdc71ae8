"""`multi_teacher.py`'s verdicts: per task and over domains, from `distill eval` reports of every training seed, in
words, JSON and a plot.

The goal (issues 7 and 17): on held-out test data the student beats the from-scratch baseline beyond the 95%
interval on the mean over domains, and no domain's own teacher is better than the student beyond the interval on
that domain's home task. Every interval here covers training seeds and test rows together (`mt_stats`: a two-level,
paired bootstrap; with one seed it is `distill eval`'s paired row bootstrap). Tasks where every model sits within the
chance band are flagged and left out of the mean (`mt_stats.at_chance`). Variants are ranked on the dev tasks
(`--pick-on dev`), and the chosen variant's headline quotes its test tasks only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.mt_confidence import table as confidence_table
from benchmarks.mt_routing import report_table, routing_table
from benchmarks.mt_stats import SeedValues, at_chance, domain_weights, interval, seed_draws, weighted_sum
from distill.eval import Difference, verdict_word

MEAN_TASK = "mean over domains"
CHANCE_RULE = (
    "a task is at chance when every model compared on it (the variant's student, baseline and reference "
    "of every seed, and every teacher) has a 95% row interval containing the task's chance level; such "
    "tasks are flagged and left out of the mean over domains"
)
METHOD = (
    "value: the mean over training seeds; 95% interval: a two-level paired bootstrap, each replicate drawing the "
    "seeds with replacement (one draw shared by every task and model) and one resample of the test rows shared "
    "by every model and seed (benchmarks/mt_stats.py); with one seed, the paired row bootstrap of `distill eval`"
)


@dataclass(frozen=True)
class TaskInfo:
    """Where a task belongs, for the verdicts: its domain, its test set, and whose home task it is."""

    domain: str  # the domain it tests (the mean over domains); a task of no domain: its own name
    test_set: str  # tasks with the same test_set read the same test rows (they count once in the mean)
    own: str | None = None  # the domain whose teacher must not beat the student here (that domain's home task)


def _num(x):
    return None if x is None or (isinstance(x, (float, np.floating)) and not math.isfinite(x)) else float(x)


def _dj(d, **extra) -> dict | None:
    """A Difference as {"value", "ci": [lo, hi]} (NaN as null), plus `extra` keys."""
    if d is None:
        return None
    return {"value": _num(d.value), "ci": [_num(d.ci_low), _num(d.ci_high)], **extra}


def word(diff: dict | None) -> str | None:
    """better / within / worse: the 95% interval above 0, around 0, below 0."""
    if not diff or None in diff["ci"] or diff["value"] is None:
        return None
    return verdict_word(Difference(diff["value"], *diff["ci"]))


def _finite(x) -> bool:
    return x is not None and math.isfinite(x)


def verdict_entries(
    reports: Sequence,
    student: str,
    baseline: str,
    info: Mapping[str, TaskInfo],
    seeds: Sequence[int],
    draw_seed: int = 0,
    level: float = 0.95,
    teachers: Sequence[str] | None = None,
    others: Sequence[str] | None = None,
) -> list[dict]:
    """One entry per task (its headline metric) and a last one for the mean over domains.

    `reports[i]`: the `distill eval` report (an EvalReport, holding `.estimates` with bootstrap replicates) of the
    models trained with `seeds[i]`, all on the same tasks with the same eval seed; model names are the same in
    every report. `teachers` and `others` (other baselines, e.g. `reference`) default to the report's roles; give
    them when one report holds several students. `info[task]` says the task's domain, test set and home-task owner
    (absent: a domain and test set of its own)."""
    if not reports or len(reports) != len(seeds):
        raise ValueError(f"need one report per seed, got {len(reports)} reports for seeds {list(seeds)}")
    first = reports[0]
    teachers = list(first["teachers"] if teachers is None else teachers)
    others = [b for b in (first.get("baselines", []) if others is None else others) if b != baseline]
    draws: dict[int, np.ndarray] = {}

    def iv(v: SeedValues | None):
        if v is None:
            return None
        r = 0 if v.replicates is None else v.replicates.shape[1]
        if r not in draws:
            draws[r] = seed_draws(len(seeds), r, draw_seed)
        return interval(v, draws[r] if v.n_seeds == len(seeds) else None, level)

    entries: list[dict] = []
    vs_base: dict[str, SeedValues] = {}
    vs_best: dict[str, SeedValues] = {}
    vs_other: dict[str, dict[str, SeedValues]] = {b: {} for b in others}
    for name, task in first["tasks"].items():
        metric = task.get("headline")
        if metric is None:
            continue
        ti = info.get(name, TaskInfo(name, name))

        def values(model: str, name: str = name, metric: str = metric) -> SeedValues | None:  # called in this loop
            ests = [r.estimates.get(name, {}).get(model, {}).get(metric) for r in reports]
            return None if any(e is None for e in ests) else SeedValues.of(ests)

        def model_entry(model: str | None, v: SeedValues | None) -> dict | None:
            if model is None or v is None:
                return None
            d = iv(v)
            return {"name": model, "value": _num(d.value), "ci": [_num(d.ci_low), _num(d.ci_high)]}

        s, b = values(student), values(baseline)
        tv = {t: v for t in teachers if (v := values(t)) is not None and _finite(float(np.mean(v.points)))}
        best = max(tv, key=lambda t: float(np.mean(tv[t].points)), default=None)
        d_base = s - b if s is not None and b is not None else None
        d_best = s - tv[best] if s is not None and best is not None else None
        d_own = s - tv[ti.own] if s is not None and ti.own in tv else None
        ov = {o: v for o in others if (v := values(o)) is not None}
        d_other = {o: s - v for o, v in ov.items()} if s is not None else {}
        chance = _num(task.get("chance", {}).get(metric))
        compared = [student, baseline, *others, *teachers]  # not other variants: a rerun with more keeps the flag
        band = [
            (e.ci_low, e.ci_high)
            for r in reports
            for m in compared
            if (e := r.estimates.get(name, {}).get(m, {}).get(metric)) is not None
        ]
        flagged = at_chance(band, chance)
        per_seed = []
        for i, sd in enumerate(seeds):
            row = {
                "seed": sd,
                "student": None if s is None else _num(s.points[i]),
                "baseline": None if b is None else _num(b.points[i]),
            }
            row.update({o: _num(v.points[i]) for o, v in ov.items()})
            row["student_minus_baseline"] = _dj(iv(d_base.seed(i))) if d_base is not None else None
            row["student_minus_own_teacher"] = _dj(iv(d_own.seed(i))) if d_own is not None else None
            per_seed.append(row)
        e_base, e_best, e_own = iv(d_base), iv(d_best), iv(d_own)
        entry = {
            "task": name,
            "metric": metric,
            "domain": ti.domain,
            "test_set": ti.test_set,
            "own_domain": ti.own,
            "chance": chance,
            "at_chance": flagged,
            "student": model_entry(student, s),
            "baseline": model_entry(baseline, b),
            "best_teacher": model_entry(best, None if best is None else tv[best]),
            "student_minus_best_teacher": _dj(e_best, teacher=best) if e_best is not None else None,
            "student_minus_baseline": _dj(e_base),
            "student_minus_other_baselines": {o: _dj(iv(d)) for o, d in d_other.items()},
            "student_minus_own_teacher": _dj(e_own, teacher=ti.own) if e_own is not None else None,
            "seeds": per_seed,
        }
        entry.update(
            vs_teachers=word(entry["student_minus_best_teacher"]),
            vs_baseline=word(entry["student_minus_baseline"]),
            vs_own_teacher=word(entry["student_minus_own_teacher"]),
        )
        entries.append(entry)
        if not flagged:
            if d_base is not None and _finite(float(np.mean(d_base.points))):
                vs_base[name] = d_base
            if d_best is not None:
                vs_best[name] = d_best
            for o, d in d_other.items():
                vs_other[o][name] = d
    domain = {e["task"]: e["domain"] for e in entries}
    test_set = {e["task"]: e["test_set"] for e in entries}

    def mean(diffs: Mapping[str, SeedValues]) -> tuple[SeedValues | None, dict[str, float]]:
        if not diffs:
            return None, {}
        w = domain_weights(list(diffs), domain, test_set)
        return weighted_sum(diffs, w), w

    m_base, w_base = mean(vs_base)
    m_best, _ = mean(vs_best)
    doms: dict[str, list[str]] = {}
    for t in w_base:
        doms.setdefault(domain[t], []).append(t)
    mean_entry: dict[str, Any] = {
        "task": MEAN_TASK,
        "metric": "headline",
        "domain": None,
        "test_set": None,
        "own_domain": None,
        "chance": None,
        "at_chance": False,
        "domains": doms,
        "weights": {t: round(w, 6) for t, w in w_base.items()},
        "left_out_at_chance": [e["task"] for e in entries if e["at_chance"]],
        "student": None,
        "baseline": None,
        "best_teacher": None,
        "student_minus_best_teacher": _dj(iv(m_best)),
        "student_minus_baseline": _dj(iv(m_base)),
        "student_minus_other_baselines": {o: _dj(iv(mean(d)[0])) for o, d in vs_other.items()},
        "student_minus_own_teacher": None,
        "seeds": [
            {"seed": sd, "student_minus_baseline": None if m_base is None else _dj(iv(m_base.seed(i)))}
            for i, sd in enumerate(seeds)
        ],
    }
    mean_entry.update(
        vs_teachers=word(mean_entry["student_minus_best_teacher"]),
        vs_baseline=word(mean_entry["student_minus_baseline"]),
        vs_own_teacher=None,
    )
    entries.append(mean_entry)
    return entries


def goal(entries: list[dict]) -> dict:
    """Whether the issue's goal is met on these (test) entries, and the reasons in words."""
    mean = entries[-1]
    beats = mean["vs_baseline"] == "better"
    below = [e["task"] for e in entries[:-1] if e["vs_own_teacher"] == "worse"]
    unknown = [e["task"] for e in entries[:-1] if e["own_domain"] and e["vs_own_teacher"] is None]
    met = beats and not below and not unknown
    why = [f"{MEAN_TASK} vs baseline: {fmt(mean['student_minus_baseline'])} ({mean['vs_baseline']})"]
    why.append(
        "an own-domain teacher better than the student beyond the interval on: "
        + (", ".join(below) if below else "no task")
    )
    return {"met": met, "beats_baseline_on_mean": beats, "below_own_teacher": below, "text": "; ".join(why)}


def fmt(d: dict | None) -> str:
    if not d or d.get("value") is None:
        return "n/a"
    lo, hi = d["ci"]
    ci = f" [{lo:+.3f}, {hi:+.3f}]" if lo is not None and hi is not None else ""
    return f"{d['value']:+.3f}{ci}"


def verdict_line(e: dict) -> str:
    s = e["student"]
    if e["task"] == MEAN_TASK:
        doms = ", ".join(f"{d} ({' + '.join(ts)})" for d, ts in e.get("domains", {}).items()) or "none"
        head = f"**{MEAN_TASK}** (headline metrics; domains {doms})"
    else:
        head = (
            f"**{e['task']}** ({e['metric']}" + (f", chance {e['chance']:.3f}" if e["chance"] is not None else "") + ")"
        )
    parts = []
    if e.get("at_chance"):
        parts.append("AT CHANCE for every model (left out of the mean)")
    if s and s["value"] is not None:
        parts.append(f"student {s['value']:.3f}")
    parts.append(f"vs baseline {fmt(e['student_minus_baseline'])}: {e['vs_baseline'] or 'n/a'}")
    best = e["student_minus_best_teacher"]
    if best:
        who = f" ({best['teacher']})" if best.get("teacher") else ""
        parts.append(f"vs best teacher{who} {fmt(best)}: {e['vs_teachers'] or 'n/a'}")
    if e["student_minus_own_teacher"]:
        parts.append(
            f"vs its own-domain teacher {e['own_domain']} {fmt(e['student_minus_own_teacher'])}: {e['vs_own_teacher']}"
        )
    return f"- {head}: " + "; ".join(parts)


def _score(r: dict, split: str) -> float:
    entries = r.get(split) or []
    d = entries[-1]["student_minus_baseline"] if entries else None
    return d["value"] if d and d.get("value") is not None else -math.inf


def ranked(results: Mapping[str, dict], pick_on: str) -> list[str]:
    """Variant names by the mean over domains of student - baseline on the `pick_on` entries ("dev" or "test"),
    best first (ties keep the given order; a variant without that number ranks last)."""
    return sorted(results, key=lambda n: -_score(results[n], pick_on))


def pick_variant(results: Mapping[str, dict], pick_on: str) -> str:
    """The variant the headline is about: the best of `ranked`."""
    if pick_on not in ("dev", "test"):
        raise ValueError(f"--pick-on must be dev or test, got {pick_on!r}")
    return ranked(results, pick_on)[0]


def ablation_table(results: Mapping[str, dict], pick_on: str = "dev") -> str:
    """Variants (ranked on `pick_on`, the picked one first) x columns: dev mean - baseline, test mean - baseline,
    every test task's student - baseline and student - own teacher, goal (test)."""
    names = ranked(results, pick_on)
    first = results[names[0]]["test"]
    tasks = first[:-1]
    has_dev = any(results[n].get("dev") for n in names)
    head = [
        "variant",
        "baseline saw",
        *(["dev: mean - baseline"] if has_dev else []),
        "test: mean - baseline",
        *[f"{e['task']} - baseline" + (" (at chance)" if e["at_chance"] else "") for e in tasks],
        *[f"{e['task']} - own teacher" for e in tasks if e["own_domain"]],
        "goal (test)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, name in enumerate(names):
        r = results[name]
        es = r["test"]
        row = [f"**{name}** (picked)" if i == 0 else name, r.get("baseline_saw", "")]
        if has_dev:
            row.append(fmt(r["dev"][-1]["student_minus_baseline"]) if r.get("dev") else "n/a")
        row.append(fmt(es[-1]["student_minus_baseline"]))
        row += [fmt(e["student_minus_baseline"]) for e in es[:-1]]
        row += [fmt(e["student_minus_own_teacher"]) for e in es[:-1] if e["own_domain"]]
        row.append("met" if goal(es)["met"] else "not met")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def seeds_table(entries: list[dict]) -> str:
    """Per task, student - baseline for each training seed alone (row interval), then over seeds and rows."""
    seeds = [s["seed"] for s in entries[-1]["seeds"]]
    head = ["task", *[f"seed {s}" for s in seeds], "all seeds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in entries:
        lines.append(
            "| "
            + " | ".join(
                [e["task"], *[fmt(s["student_minus_baseline"]) for s in e["seeds"]], fmt(e["student_minus_baseline"])]
            )
            + " |"
        )
    return "\n".join(lines)


def plot_ablation(results: Mapping[str, dict], path: Path) -> Path:
    """Forest plot: per variant, student - baseline on every test task and on the mean, with 95% intervals."""
    import matplotlib  # noqa: PLC0415 (lazy: only a run with several variants draws a plot)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 (lazy: only a run with several variants draws a plot)

    names = list(results)
    tasks = [e["task"] for e in results[names[0]]["test"]]
    fig, ax = plt.subplots(figsize=(8, 0.5 + 0.45 * len(names) * len(tasks) / 2 + 1))
    y: float = 0
    ticks, labels = [], []
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ti, task in enumerate(tasks):
        for name in names:
            e = next(x for x in results[name]["test"] if x["task"] == task)
            d = e["student_minus_baseline"]
            if d and d["value"] is not None and None not in d["ci"]:
                ax.errorbar(
                    d["value"],
                    y,
                    xerr=[[d["value"] - d["ci"][0]], [d["ci"][1] - d["value"]]],
                    fmt="o",
                    color=colours[names.index(name) % len(colours)],
                    capsize=3,
                    label=name if ti == 0 else None,
                    ms=6 if task == MEAN_TASK else 4,
                )
            ticks.append(y)
            labels.append(f"{task}{' (at chance)' if e['at_chance'] else ''} | {name}")
            y -= 1
        y -= 0.6
    ax.axvline(0, color="grey", ls="--", lw=1)
    ax.set_yticks(ticks, labels, fontsize=7)
    ax.set_xlabel("student - baseline (headline metric), 95% interval over seeds and test rows")
    ax.set_title("Student - baseline on the test tasks\n(right of the dashed line: the student is better)", fontsize=10)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _setup_lines(setup: dict, chosen: str, n_variants: int, pick_on: str) -> list[str]:
    f = setup["flags"]
    seeds = setup["seeds"]
    lines = [
        f"Budget `{f['budget']}`; {setup['sizes']}; student corpus {f['student_fraction']:.0%} of each domain; "
        f"corpora, teachers and cache from seed {f['seed']}; students, baselines"
        f"{' and references' if f['reference'] else ''} trained with seed{'s' * (len(seeds) > 1)} "
        f"{', '.join(map(str, seeds))}; {setup['threads']} torch threads, "
        f"{setup['timings_s']['total']:.0f} s in all.",
        "",
        f"The baseline saw {setup['baseline_saw'][chosen]}; the reference (from scratch on all the training "
        "data, which the cache does not cover) saw its own crops.",
    ]
    if setup.get("dev_tasks"):
        lines += [
            "",
            f"Dev tasks ({', '.join(setup['dev_tasks'])}): {f['dev_fraction']:.0%} of each domain's "
            "training part, taken from the end of its seeded stratified ranking, so disjoint from the test "
            "set and from the student's corpus (the start of that ranking). They only rank student variants: "
            "the teachers and the reference trained on the whole training part, dev rows included.",
        ]
    if n_variants > 1:
        how = (
            "on the dev tasks"
            if pick_on == "dev"
            else "on the TEST tasks themselves (--pick-on test: the headline below is optimistic)"
        )
        lines += [
            "",
            f"`{chosen}` was picked among {n_variants} variants by its mean over domains of student - "
            f"baseline {how} (`ablation.md` ranks them); everything below is its test tasks only.",
        ]
    return lines


def routing_sections(setup: dict) -> list[str]:
    """report.md's issue-20 sections: the teacher report of the cache, and where auto routing sent each domain."""
    lines = []
    if setup.get("teacher_report"):
        lines += [
            "## Which teacher knows which domain, from the cache alone (`distill teachers`)",
            "",
            "Skill (image-to-text top-1 within pools of 64, minus the hits of the teacher's own choices at random) "
            "per slice: by the domain column, then by as many k-means clusters as domains "
            f"({setup['teacher_report']['clustered']}), with the domains of each cluster's rows.",
            "",
            report_table(setup["teacher_report"]),
            "",
        ]
    if setup.get("auto_routing_by_domain"):
        lines += [
            "## Where label-free routing sent each domain's rows (`loss.routing.auto`)",
            "",
            "Mean over seeds; the students never saw the domain column, it is read here only to check them.",
            "",
            routing_table(setup["auto_routing_by_domain"]),
            "",
        ]
    return lines


def write_outputs(out: Path, results: Mapping[str, dict], setup: dict, pick_on: str = "dev") -> dict[str, Path]:
    """OUT/report.md + OUT/verdict.json for the picked variant (test tasks only); OUT/ablation.{md,json,png} for
    all of them, ranked on `pick_on`. `results[name]`: {"variant", "test": entries, "dev": entries, "baseline_saw"};
    the eval report of seed `seeds[0]` (OUT/eval/seed-S/report.md, every model side by side) is embedded."""
    chosen = pick_variant(results, pick_on)
    entries = results[chosen]["test"]
    g = goal(entries)
    verdict = out / "verdict.json"
    verdict.write_text(json.dumps(entries, indent=2) + "\n")
    seed0 = setup["seeds"][0]
    eval_md = (out / "eval" / f"seed-{seed0}" / "report.md").read_text()
    flagged = entries[-1]["left_out_at_chance"]
    lines = [
        f"# Multi-teacher benchmark: student `{chosen}`",
        "",
        *_setup_lines(setup, chosen, len(results), pick_on),
        "",
        f"**Goal {'met' if g['met'] else 'not met'}**: {g['text']}.",
        "",
        "## Verdict per test task",
        "",
        *[verdict_line(e) for e in entries],
        "",
        f"Intervals: {METHOD}. 'better' and 'worse' mean the 95% interval excludes 0. The mean is over domains "
        "(each domain weighs the same; tasks sharing a test set are averaged first and count once). Chance: "
        f"{CHANCE_RULE}. At chance here: {', '.join(flagged) if flagged else 'none'}.",
        "",
        "## Each seed alone",
        "",
        "Student - baseline per training seed (row interval of that seed), then over "
        "all seeds and rows; `verdict.json` has every seed's values under `seeds`.",
        "",
        seeds_table(entries),
        "",
        "## Label-free confidence weighting against routing",
        "",
        "Mean weight that `loss.combine.mode: confidence` gives each teacher (columns) on the rows of each "
        "domain (rows), on random batches of the cached features; routing puts all of it on the domain's own "
        "teacher.",
        "",
        confidence_table(setup["confidence_by_domain"]),
        "",
        *routing_sections(setup),
        f"## The `distill eval` report of seed {seed0}",
        "",
        "(One seed, test tasks, every variant, baseline and teacher side by side: its `student` is the first "
        "variant and every other non-teacher model is listed as a baseline; its 'Overall' is the plain mean "
        "over tasks with a row-only interval. The verdicts above are the ones to quote; OUT/eval/seed-S/ holds "
        "each seed's test report, OUT/eval/seed-S/dev/ its dev report.)",
        "",
        eval_md.replace("\n# ", "\n### ").replace("\n## ", "\n### ").removeprefix("# "),
        "",
        "## Setup",
        "",
        "```json",
        json.dumps({k: setup[k] for k in ("budget", "timings_s", "teachers", "routing")}, indent=2),
        "```",
    ]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    paths = {"report": report, "verdict": verdict}
    if len(results) > 1:
        table = ablation_table(results, pick_on)
        notes = "\n".join(
            f"- `{n}`: {r['variant'].note or ' '.join(r['variant'].overrides)}" for n, r in results.items()
        )
        (out / "ablation.md").write_text(
            f"# Ablation ({setup['flags']['budget']} budget)\n\n{setup['sizes']}; seeds "
            f"{', '.join(map(str, setup['seeds']))}. Variants ranked by the mean over domains of student - baseline "
            f"on the {pick_on} tasks (picked: `{chosen}`); then the test tasks' student - baseline and student - "
            f"own-domain teacher on each headline metric. Intervals: {METHOD}. Chance: {CHANCE_RULE}.\n\n{table}\n\n"
            f"{notes}\n\nConfidence weights by domain (see report.md):\n\n"
            f"{confidence_table(setup['confidence_by_domain'])}\n\n" + "\n".join(routing_sections(setup))
        )
        (out / "ablation.json").write_text(
            json.dumps(
                {
                    "setup": setup,
                    "pick_on": pick_on,
                    "picked": chosen,
                    "ranking": ranked(results, pick_on),
                    "variants": {
                        n: {
                            "note": r["variant"].note,
                            "overrides": list(r["variant"].overrides),
                            "baseline_saw": r.get("baseline_saw"),
                            "goal": goal(r["test"]),
                            "entries": r["test"],
                            "dev_entries": r.get("dev") or [],
                        }
                        for n, r in results.items()
                    },
                },
                indent=2,
                default=str,
            )
            + "\n"
        )
        paths["ablation"] = out / "ablation.md"
        paths["plot"] = plot_ablation(results, out / "ablation.png")
    return paths
