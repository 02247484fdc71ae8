"""Does a student distilled from domain teachers beat training from scratch, and match each teacher at home?

    python benchmarks/multi_teacher.py --budget smoke            # every stage, under 5 minutes on 2 cores
    python benchmarks/multi_teacher.py --budget cpu --ablation   # the investigation (benchmarks/results/)
    python benchmarks/multi_teacher.py --budget gpu --teacher dermoscopy=hf-hub:ORG/REPO --task derm=my.yaml

The design gives the teachers knowledge the student's corpus lacks, as in the real setting: each domain's teacher
(wider and deeper than the student, trained longer) sees ALL of its domain's training data; the student's corpus
is only `--student-fraction` of each domain. The baseline is the same student trained contrastively on that same
corpus with the same steps, batch, seed and vocabulary; a `reference` student trained from scratch on all the
data shows what the missing data is worth. Teachers and test sets can be replaced: `--teacher NAME=SPEC` uses a
pretrained model (NAME a domain: that domain's teacher; any other NAME: a general teacher routed to every
domain), `--domain-file` adds domains, `--task [DOMAIN=]YAML` adds evaluation tasks.

Everything lands in `--workdir` (default OUT/work) under names derived from the settings, so a rerun with more
variants trains only the new students. Output: OUT/report.md (the `distill eval` report of the first variant
plus a verdict line per task), OUT/verdict.json, and with several variants OUT/ablation.md, OUT/ablation.json and
OUT/ablation.png; every variant's full report is in OUT/variants/NAME/.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from benchmarks.bench_common import machine, parse_flags, quiet_libraries  # noqa: E402
from benchmarks.mt_setup import (  # noqa: E402
    ABLATION_VARIANTS, BUDGETS, BUILTIN_DOMAINS, DEFAULT_VARIANTS, ROUTING, VARIANTS, Budget, Domain, SetupError,
    TeacherPlan, Variant, load_domain_file, load_variant_file, plan_teachers, resolve_domain, routing_value,
    tiny_overrides)
from benchmarks.mt_confidence import confidence_by_domain  # noqa: E402
from benchmarks.mt_verdict import verdict_entries, write_outputs  # noqa: E402

log = logging.getLogger("multi_teacher")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@dataclass(frozen=True)
class Flags:
    budget: str = "cpu"                 # smoke (CI, < 5 min) | cpu (< 45 min, 2 cores) | gpu (a lent GPU)
    out: str = "multi-teacher-out"      # report.md, verdict.json, ablation.* and variants/ land here
    workdir: str = ""                   # corpora, teachers, cache, runs (default OUT/work); reused by reruns
    data_root: str = "../shared/data"   # where the built-in domains' files are
    domains: tuple[str, ...] = ()       # built-in domains to use (default: radiology,dermoscopy,chest_xray,breast_us)
    domain_file: tuple[str, ...] = ()   # YAML domains (name, source, tasks, holdout); repeatable
    teacher: tuple[str, ...] = ()       # NAME=SPEC pretrained teachers instead of training (repeatable)
    task: tuple[str, ...] = ()          # [DOMAIN=]TASK.yaml extra evaluation tasks (repeatable)
    variant: tuple[str, ...] = ()       # student variants by name (default: the recommended recipe)
    variant_file: tuple[str, ...] = ()  # YAML: NAME -> [section.key=value, ...] more variants (repeatable)
    ablation: bool = False              # run every built-in ablation variant
    student_fraction: float = 0.2       # the student's corpus: this fraction of each domain's training data
    seed: int = 0                       # corpora, teachers, stored views, eval bootstrap
    student_seed: int = -1              # the students' (and baseline's, reference's) training seed (-1: --seed);
                                        # rerun with others to see seed-to-seed spread, teachers and cache reused
    threads: int = 0                    # torch threads (0: all usable cores)
    num_workers: int = -1               # DataLoader workers (-1: 0 for smoke, 1 otherwise)
    views: int = 4                      # stored augmented views per image in the cache (0: none)
    reference: bool = True              # also train the from-scratch student on all the data
    device: str = "auto"                # eval and cache device
    teacher_steps: int = 0              # 0: the budget's value (same for the next flags)
    student_steps: int = 0
    image_size: int = 0
    batch_size: int = 0
    max_rows_per_domain: int = -1       # -1: the budget's value; 0: every row


# -- small helpers ----------------------------------------------------------------------------------------
def sizes(flags: Flags) -> Budget:
    """The budget with the flags that were set (non-zero) replacing its numbers."""
    if flags.budget not in BUDGETS:
        raise SetupError(f"--budget {flags.budget!r} is unknown; use one of {', '.join(BUDGETS)}")
    b = BUDGETS[flags.budget]
    given = {k: getattr(flags, k) for k in ("teacher_steps", "student_steps", "image_size", "batch_size")}
    b = dataclasses.replace(b, **{k: v for k, v in given.items() if v})
    if flags.max_rows_per_domain >= 0:
        b = dataclasses.replace(b, max_rows_per_domain=flags.max_rows_per_domain)
    return b


def set_threads(flags: Flags) -> int:
    """One explicit thread count for this process (torch's default oversubscribes a shared small machine)."""
    import torch

    from distill.build_run import resolve_threads

    n, _ = resolve_threads(flags.threads or None, num_local_processes=1, env={})  # the flag, else every usable core
    torch.set_num_threads(n)
    os.environ.setdefault("OMP_NUM_THREADS", str(n))  # the trainer reads it and keeps this count
    return n


def digest(*parts) -> str:
    """A short name for a setting, so a changed setting never resumes another setting's run."""
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:8]


def stage(msg: str) -> None:
    print(f"[multi_teacher {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _pairs(values: tuple[str, ...], flag: str) -> dict[str, str]:
    out = {}
    for v in values:
        name, eq, spec = v.partition("=")
        if not eq or not name or not spec:
            raise SetupError(f"--{flag} {v!r}: expected NAME=VALUE")
        out[name] = spec
    return out


# -- corpora ----------------------------------------------------------------------------------------------
def _source(domain: Domain, part: tuple[float, float], fraction: float, max_rows: int, seed: int):
    from cache.corpus_build import CorpusSource

    src = dict(domain.source)
    src.setdefault("name", domain.name)
    src["domain"] = domain.name
    src["templates"] = tuple(src["templates"])
    if src.get("class_names") is not None:
        src["class_names"] = tuple(src["class_names"])
    lo, hi = part  # a fraction of a part is the start of it: parts share one seeded, stratified ranking
    return CorpusSource(**src, part=(lo, lo + (hi - lo) * fraction), max_rows=max_rows or None)


def build_corpora(domains: list[Domain], flags: Flags, b: Budget, work: Path) -> dict[str, Path]:
    """teacher-DOMAIN, test-DOMAIN (held-out parts), student and all corpora; each built once per setting."""
    from cache.corpus_build import build_corpus

    out: dict[str, Path] = {}

    def build(name: str, sources: list, shuffle: bool = True) -> Path:
        d = work / "corpora" / f"{name}-{digest(repr(sources), flags.seed)}"
        csv = d / "corpus.csv"
        if not csv.is_file():
            build_corpus(sources, d, seed=flags.seed, shuffle=shuffle)
        return csv

    train_parts = {}
    for dom in domains:
        part = (0.0, 1.0 - dom.holdout)
        train_parts[dom.name] = part
        out[f"teacher-{dom.name}"] = build(f"teacher-{dom.name}", [_source(dom, part, 1.0, b.max_rows_per_domain,
                                                                           flags.seed)])
        if dom.holdout:
            out[f"test-{dom.name}"] = build(f"test-{dom.name}", [_source(dom, (1.0 - dom.holdout, 1.0), 1.0, 0,
                                                                         flags.seed)], shuffle=False)
    student_rows = int(b.max_rows_per_domain * flags.student_fraction) if b.max_rows_per_domain else 0
    out["student"] = build("student", [_source(d, train_parts[d.name], flags.student_fraction, student_rows,
                                               flags.seed) for d in domains])
    out["all"] = build("all", [_source(d, train_parts[d.name], 1.0, b.max_rows_per_domain, flags.seed)
                               for d in domains])
    return out


def write_tasks(domains: list[Domain], corpora: dict[str, Path], extra: tuple[str, ...], work: Path
                ) -> tuple[list[str], dict[str, str]]:
    """Task YAML files for every domain's tasks (+ the extra ones) and {task name: its domain} for own tasks."""
    import yaml

    from distill.eval.tasks import load_task

    folder = work / "tasks"
    folder.mkdir(parents=True, exist_ok=True)
    paths, own = [], {}
    for dom in domains:
        for i, t in enumerate(dom.tasks):
            t = json.loads(json.dumps(t))
            if t["dataset"]["path"] == "{holdout}":
                t["dataset"]["path"] = str(corpora[f"test-{dom.name}"].resolve())
            p = folder / f"{t['name']}.yaml"
            p.write_text(yaml.safe_dump(t, sort_keys=False))
            paths.append(str(p))
            if i == 0:
                own[t["name"]] = dom.name
    for item in extra:
        dom, eq, path = item.partition("=")
        path = path if eq else dom
        task = load_task(path)
        paths.append(str(Path(path).resolve()))
        if eq:
            own[task.name] = dom
    return paths, own


# -- training ---------------------------------------------------------------------------------------------
def train_and_export(name: str, config: str, overrides: list[str], work: Path) -> str:
    """Train (or resume / skip a finished run) and export; returns the student's `local-dir:` SPEC."""
    from distill.config import Config
    from distill.train import train
    from student.export import export_checkpoint

    key = digest(config, overrides)
    run_dir, export_dir = work / "runs" / f"{name}-{key}", work / "students" / f"{name}-{key}"
    if not (export_dir / "open_clip_config.json").is_file():
        cfg = Config.from_yaml(CONFIGS / config, overrides=[*overrides, f"train.output_dir={run_dir}"])
        t0 = time.perf_counter()
        result = train(cfg)
        stage(f"  {name}: {result['step']} steps in {time.perf_counter() - t0:.0f} s, final loss "
              f"{result['losses'].get('loss', float('nan')):.3f}")
        export_checkpoint(str(run_dir), str(export_dir))
    return f"local-dir:{export_dir}"


def common_overrides(flags: Flags, b: Budget, corpus: Path, steps: int, width: int, layers: int,
                     tokenizer: Path | None) -> list[str]:
    workers = flags.num_workers if flags.num_workers >= 0 else (0 if flags.budget == "smoke" else 1)
    seed = flags.seed if flags.student_seed < 0 else flags.student_seed
    ov = [f"data.corpus={corpus}", f"train.max_steps={steps}", f"train.seed={seed}",
          f"data.batch_size={b.batch_size}", f"data.num_workers={workers}", "data.sampler=random",
          f"optim.lr={b.lr}", f"optim.warmup_steps={b.warmup}", f"student.image_size={b.image_size}",
          f"student.vocab_size={b.vocab_size}", "train.checkpoint_every=0", "train.keep_last=1",
          f"train.log_every={max(1, steps // 50)}", "data.flip=false", "data.crop_scale=[0.8, 1.0]",
          "student.overrides=" + json.dumps(tiny_overrides(width, layers))]
    if tokenizer is not None:
        ov.append(f"student.tokenizer_dir={tokenizer}")
    return ov


def build_tokenizer(corpus: Path, b: Budget, work: Path) -> Path:
    """One WordPiece vocabulary on the student corpus for every student (baseline and reference too)."""
    from cache.corpus import open_corpus
    from student.tokenizer import train_wordpiece

    out = work / f"tokenizer-{digest(str(corpus), b.vocab_size)}"
    if not (out / "tokenizer.json").is_file():
        train_wordpiece(open_corpus(corpus).captions, out, vocab_size=b.vocab_size)
    return out


def teacher_specs(plans: list[TeacherPlan], corpora: dict[str, Path], flags: Flags, b: Budget,
                  work: Path) -> dict[str, str]:
    specs = {}
    for i, t in enumerate(plans):
        if t.spec is not None:
            specs[t.name] = t.spec
            continue
        stage(f"teacher {t.name}: contrastive on all of its domain ({b.teacher_steps} steps, width "
              f"{b.teacher_width})")
        ov = common_overrides(flags, b, corpora[f"teacher-{t.name}"], b.teacher_steps, b.teacher_width,
                              b.teacher_layers, None)
        ov[2] = f"train.seed={flags.seed + 100 + i}"
        ov.append(f"optim.lr={b.teacher_lr}")
        specs[t.name] = train_and_export(f"teacher-{t.name}", "tiny-contrastive.yaml", ov, work)
    return specs


def build_features(corpus: Path, specs: dict[str, str], flags: Flags, work: Path) -> Path:
    from cache.build import CacheJob, build_cache

    out = work / f"features-{digest(str(corpus), specs, flags.views, flags.seed)}.h5"
    build_cache(CacheJob(data=str(corpus), teachers=specs, out=str(out), batch_size=128, num_workers=0,
                         device=flags.device, views=flags.views, seed=flags.seed, progress=False))
    return out


def variant_overrides(v: Variant, routing: str) -> list[str]:
    return [routing if o == ROUTING else o for o in v.overrides]


# -- the whole run ----------------------------------------------------------------------------------------
def pick_variants(flags: Flags) -> list[Variant]:
    extra = [v for f in flags.variant_file for v in load_variant_file(f)]
    known = {**VARIANTS, **{v.name: v for v in extra}}
    names = list(flags.variant) or ([] if extra else list(DEFAULT_VARIANTS))
    if flags.ablation:
        names += [n for n in ABLATION_VARIANTS if n not in names]
    names += [v.name for v in extra if v.name not in names]
    bad = [n for n in names if n not in known]
    if bad:
        raise SetupError(f"--variant {bad[0]!r} is unknown; built-in variants: {', '.join(VARIANTS)} "
                         f"(or give your own with --variant-file)")
    return [known[n] for n in dict.fromkeys(names)]


def pick_domains(flags: Flags) -> list[Domain]:
    root = Path(flags.data_root)
    names = list(flags.domains) or ([] if flags.domain_file else list(BUILTIN_DOMAINS))
    bad = [n for n in names if n not in BUILTIN_DOMAINS]
    if bad:
        raise SetupError(f"--domains {bad[0]!r} is not a built-in domain ({', '.join(BUILTIN_DOMAINS)}); "
                         f"give your own with --domain-file")
    domains = [resolve_domain(BUILTIN_DOMAINS[n], root) for n in names]
    domains += [load_domain_file(f) for f in flags.domain_file]
    seen = [d.name for d in domains]
    if len(set(seen)) != len(seen):
        raise SetupError(f"two domains share a name: {seen}")
    return domains


def run(flags: Flags) -> dict:
    from distill.eval import EvalJob, run_eval

    b = sizes(flags)
    out = Path(flags.out)
    work = Path(flags.workdir) if flags.workdir else out / "work"
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    threads = set_threads(flags)
    domains = pick_domains(flags)
    variants = pick_variants(flags)
    given = _pairs(flags.teacher, "teacher")
    plans = plan_teachers([d.name for d in domains], given)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    stage(f"budget {flags.budget}, {threads} torch threads, domains {[d.name for d in domains]}, variants "
          f"{[v.name for v in variants]}; building corpora (student fraction {flags.student_fraction})")
    corpora = build_corpora(domains, flags, b, work)
    tasks, own = write_tasks(domains, corpora, flags.task, work)
    tokenizer = build_tokenizer(corpora["student"], b, work)
    timings["corpora"] = time.perf_counter() - t_start

    t0 = time.perf_counter()
    specs = teacher_specs(plans, corpora, flags, b, work)
    timings["teachers"] = time.perf_counter() - t0
    stage("caching every teacher on the student corpus")
    t0 = time.perf_counter()
    features = build_features(corpora["student"], specs, flags, work)
    timings["cache"] = time.perf_counter() - t0
    confidence = confidence_by_domain(str(features), str(corpora["student"]), seed=flags.seed)

    base = common_overrides(flags, b, corpora["student"], b.student_steps, b.student_width, b.student_layers,
                            tokenizer)
    t0 = time.perf_counter()
    stage(f"baseline: the same student, contrastive on the same corpus ({b.student_steps} steps)")
    students = {"baseline": train_and_export("baseline", "tiny-contrastive.yaml", base, work)}
    baselines = ["baseline"]
    if flags.reference:
        stage("reference: the same student, contrastive on ALL the domains' training data")
        ref = [f"data.corpus={corpora['all']}" if o.startswith("data.corpus=") else o for o in base]
        students["reference"] = train_and_export("reference", "tiny-contrastive.yaml", ref, work)
        baselines.append("reference")
    timings["baselines"] = time.perf_counter() - t0

    routing = routing_value(plans, [d.name for d in domains])
    results = {}
    for v in variants:
        t0 = time.perf_counter()
        stage(f"student {v.name}: {v.note or ' '.join(v.overrides)}")
        own_crops = not flags.views or "data.use_views=false" in v.overrides  # else the stored views decide
        ov = [o for o in base if own_crops or not o.startswith(("data.flip=", "data.crop_scale="))]
        spec = train_and_export(f"student-{v.name}", "tiny-hybrid.yaml",
                                [*ov, f"data.features={features}", *variant_overrides(v, routing)], work)
        timings[f"train {v.name}"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        stage(f"evaluating {v.name} beside the baselines and teachers on {len(tasks)} tasks")
        report = run_eval(EvalJob(models={v.name: spec, **students, **specs}, tasks=tasks,
                                  out=str(out / "variants" / v.name), device=flags.device,
                                  bootstrap=b.bootstrap, seed=flags.seed, student=v.name,
                                  baselines=tuple(baselines), max_samples=b.eval_max_samples or None,
                                  cache_dir=str(work / "eval-cache")))
        timings[f"eval {v.name}"] = time.perf_counter() - t0
        results[v.name] = {"variant": v, "report": report,
                           "entries": verdict_entries(report, v.name, "baseline", own)}
    timings["total"] = time.perf_counter() - t_start
    setup = {"flags": dataclasses.asdict(flags), "budget": dataclasses.asdict(b), "threads": threads,
             "student_seed": flags.seed if flags.student_seed < 0 else flags.student_seed,
             "machine": machine(), "timings_s": {k: round(v, 1) for k, v in timings.items()},
             "teachers": specs, "students": students, "routing": routing,
             "corpora": {k: str(v) for k, v in corpora.items()}, "own_tasks": own,
             "confidence_by_domain": confidence}
    paths = write_outputs(out, results, setup)
    stage(f"done in {timings['total']:.0f} s: {paths['report']} and {paths['verdict']}")
    return {"results": results, "setup": setup, "paths": paths}


def main(argv=None) -> int:
    flags = parse_flags(Flags, argv, __doc__)
    quiet_libraries()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        run(flags)
    except (SetupError, ValueError, FileNotFoundError) as e:
        if os.environ.get("MULTI_TEACHER_DEBUG"):
            raise
        print(f"multi_teacher: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
