"""`distill eval`'s library entry point: every model on every task, then the report.

Models are loaded one at a time (several ViT-B teachers need not fit together); datasets are read and validated
once, before any model is loaded, so a bad task file fails in seconds rather than after an hour of encoding.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from distill.audit_record import training_audit
from distill.config.eval_job import EvalJob

# The built-in task kinds register themselves in EVALUATORS when their modules are imported (distill/eval/kinds.py)
from distill.eval import finetune, linear_probe, retrieval, zeroshot  # noqa: F401
from distill.eval.bootstrap import Estimate
from distill.eval.chance import chance_levels, majority_levels
from distill.eval.context import EvalContext
from distill.eval.datasets import SplitData, load_splits
from distill.eval.embeddings import EmbeddingCache
from distill.eval.kinds import EVALUATORS
from distill.eval.report import EvalReport, build_report, write_report
from distill.eval.tasks import TaskCfg, load_task
from student.shown_paths import shown_if_absolute, shown_path, shown_spec
from teachers import load_teacher, resolve_spec

log = logging.getLogger(__name__)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    return device


def is_our_export(spec: str) -> bool:
    """True for a `local-dir:` folder written by `distill export` (its model card or config names us)."""
    try:
        parsed = resolve_spec(spec)
    except (ValueError, KeyError):
        return False
    if parsed.kind != "local-dir":
        return False
    folder = Path(parsed.target)
    card, cfg = folder / "README.md", folder / "open_clip_config.json"
    if card.is_file() and "biomed-distill" in card.read_text(errors="replace"):
        return True
    try:
        return "biomed_distill" in json.loads(cfg.read_text())
    except (OSError, ValueError):
        return False


def pick_student(job: EvalJob) -> str:
    """job.student, else the first model exported by us, else the first model (baselines never)."""
    if job.student is not None:
        return job.student
    candidates = [name for name in job.models if name not in job.baselines]
    ours = [name for name in candidates if is_our_export(job.models[name])]
    return ours[0] if ours else candidates[0]


def _audit(audited: dict[str, str], task: str) -> dict[str, str]:
    return {"audit": audited[task]} if task in audited else {}


def _task_info(task: TaskCfg, splits: dict[str, SplitData], out: Path) -> dict:
    """The task as report.json describes it, its files relative to the report folder `out` (or by name)."""
    builtin = task.source.startswith("built-in task ")
    source = task.source.split(" (", 1)[0] if builtin else shown_path(task.source, out)
    dataset = task.dataset_path
    return {
        "kind": task.kind,
        "source": source,
        "dataset": shown_path(dataset, out) if isinstance(dataset, Path) else shown_if_absolute(str(dataset), out),
        "n": {r: len(d) for r, d in splits.items()},
        "classes": list(task.classes),
        "multilabel": task.multilabel,
    }


def run_eval(job: EvalJob) -> EvalReport:
    """Evaluate every model on every task; write report.json, report.md and charts/ into job.out.

    Returns the report.json dict; its `.estimates[task][model][metric]` keep the bootstrap replicates in memory
    (for `compare.overall_summary` on other subsets of tasks or models).
    """
    out = Path(job.out)
    tasks = [load_task(t, max_samples=job.max_samples) for t in job.tasks]
    names = [t.name for t in tasks]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ValueError(f"two tasks share the name {sorted(dup)[0]!r}; task names must be unique")
    data = {t.name: load_splits(t) for t in tasks}  # validate every dataset before loading any model
    device = resolve_device(job.device)
    ctx = EvalContext(
        device=device,
        batch_size=job.batch_size,
        num_workers=job.num_workers,
        bootstrap=job.bootstrap,
        seed=job.seed,
        cache=EmbeddingCache(job.cache_dir),
    )

    results: dict[str, dict[str, dict[str, Estimate]]] = {t.name: {} for t in tasks}
    models: dict[str, dict] = {}
    for name, spec in job.models.items():
        log.info("loading model %s (%s) on %s", name, spec, device)
        model = load_teacher(spec, device=device, trust_remote_code=job.trust_remote_code)
        models[name] = {"spec": shown_spec(spec, out), "embed_dim": model.embed_dim}
        for task in tasks:
            log.info("%s: %s (%s)", name, task.name, task.kind)
            results[task.name][name] = EVALUATORS.get(task.kind).evaluate(task, model, name, data[task.name], ctx)
        ctx.cache.drop_model(name)
        del model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    settings = {
        "bootstrap": job.bootstrap,
        "seed": job.seed,
        "device": device,
        "max_samples": job.max_samples,
        "confidence": 0.95,
    }
    chance = {
        t.name: chance_levels(t, data[t.name]["test"], dict.fromkeys(m for r in results[t.name].values() for m in r))
        for t in tasks
    }
    majority = {t.name: majority_levels(t, data[t.name]["test"], chance[t.name]) for t in tasks}
    student = pick_student(job)
    audited = training_audit(job.models.get(student), [t.name for t in tasks])  # {} unless our export
    never = [t for t, said in audited.items() if said.startswith("never")]
    if never:
        log.warning(
            "%s: task(s) %s were never audited against the student's training corpus; a copy of their images in it "
            "would inflate the student's numbers (run `distill audit --features FEATURES.h5 --data CORPUS --task "
            "TASK`, docs/audit.md)",
            student,
            ", ".join(never),
        )
    report = build_report(
        models,
        student,
        {t.name: {**_task_info(t, data[t.name], out), **_audit(audited, t.name)} for t in tasks},
        results,
        settings,
        baselines=job.baselines,
        chance=chance,
        majority=majority,
    )
    paths = write_report(report, out)
    log.debug("report written to %s", paths["md"])  # `distill eval` prints it, after the verdicts
    return report
