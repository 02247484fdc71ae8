"""Does a student distilled from domain teachers beat training from scratch, and match each teacher at home?

    python -m benchmarks.multi_teacher --budget smoke            # every stage, under 5 minutes on 2 cores
    python -m benchmarks.multi_teacher --budget cpu --ablation   # the investigation (benchmarks/results/)
    python -m benchmarks.multi_teacher --budget cpu --seeds 0,1,2 --variant a,b   # 3 seeds; a or b picked on dev
    python -m benchmarks.multi_teacher --budget gpu --teacher dermoscopy=hf-hub:ORG/REPO --task derm=my.yaml

The design gives the teachers knowledge the student's corpus lacks, as in the real setting: each domain's teacher
(wider and deeper than the student, trained longer) sees ALL of its domain's training data; the student's corpus
is only `--student-fraction` of each domain. The baseline is the same student trained contrastively on that same
corpus with the same steps, batch, seed and vocabulary; a `reference` student trained from scratch on all the
data shows what the missing data is worth. Teachers and test sets can be replaced: `--teacher NAME=SPEC` uses a
pretrained model (NAME a domain: that domain's teacher; any other NAME: a general teacher routed to every
domain), `--domain-file` adds domains, `--task [DOMAIN=]YAML` adds evaluation tasks.

Fair evidence (issue 17):
- Same augmentation: when the students train on the cache's stored views (`--views` > 0 and the variant does not
  set data.use_views=false), the baseline trains contrastive on the same cache with data.use_views=true, replaying
  the same stored view boxes (no teacher feature read); else both draw their own crops. The report says which.
- Dev, then test: each domain's own (first) task gets a copy `TASK-dev` on `--dev-fraction` of the domain's
  training part, taken from the END of the seeded stratified ranking whose start is the student's corpus (so dev is
  disjoint from test and from the student's rows; the teachers and the reference still train on all of it, dev
  rows included, which is why dev only ranks student variants). `--pick-on dev` ranks the variants on the dev
  tasks' mean and the headline (report.md, verdict.json) quotes the picked variant's test tasks only.
- Seeds: `--seeds 0,1,2` trains one student per variant, one baseline and one reference per seed (train.seed;
  corpora, teachers and cache stay those of `--seed`). Each interval resamples seeds and test rows together, a
  two-level paired bootstrap (benchmarks/mt_stats.py says how); verdict.json keeps every seed's values in `seeds`.
- The mean is over domains (tasks sharing a test set are averaged first); a task where every model's 95% interval
  contains its chance level is flagged and left out of the mean.
- Sizes: `--student-width/--student-layers` (students, baselines and references) and `--teacher-width/
  --teacher-layers` (trained teachers) replace the budget's, e.g. teachers 128 wide and a 96-wide student.

Everything lands in `--workdir` (default OUT/work) under names derived from the settings, so a rerun with more
variants or seeds trains only what is new. Output: OUT/report.md (a verdict line per test task for the picked
variant, each seed alone, then its `distill eval` report of the first seed), OUT/verdict.json, and with several
variants OUT/ablation.md, OUT/ablation.json and OUT/ablation.png; the `distill eval` reports are in
OUT/eval/seed-S/ (test tasks) and OUT/eval/seed-S/dev/ (dev tasks), every model side by side.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from benchmarks.bench_common import atomic_write_text, machine, parse_flags, quiet_libraries
from benchmarks.mt_confidence import confidence_by_domain
from benchmarks.mt_routing import auto_routing_by_domain, teacher_report
from benchmarks.mt_setup import (
    ABLATION_VARIANTS,
    BUDGETS,
    BUILTIN_DOMAINS,
    DEFAULT_VARIANTS,
    DOMAIN_WEIGHTS,
    ROUTING,
    VARIANTS,
    Budget,
    Domain,
    SetupError,
    TeacherPlan,
    Variant,
    domain_weights_value,
    load_domain_file,
    load_variant_file,
    plan_teachers,
    resolve_domain,
    routing_value,
    tiny_overrides,
)
from benchmarks.mt_verdict import TaskInfo, pick_variant, verdict_entries, write_outputs
from student.shown_paths import shown_path, shown_spec

# The trainer's, the cache's and eval's modules are imported in the stage that uses them, so that a flag or
# set-up error answers before they load.

log = logging.getLogger("multi_teacher")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@dataclass(frozen=True)
class Flags:
    budget: str = "cpu"  # smoke (CI, < 5 min) | cpu (< 45 min, 2 cores) | gpu (a lent GPU)
    out: str = "multi-teacher-out"  # report.md, verdict.json, ablation.* and variants/ land here
    workdir: str = ""  # corpora, teachers, cache, runs (default OUT/work); reused by reruns
    data_root: str = "../shared/data"  # where the built-in domains' files are
    domains: tuple[str, ...] = ()  # built-in domains to use (default: radiology,dermoscopy,chest_xray,breast_us)
    domain_file: tuple[str, ...] = ()  # YAML domains (name, source, tasks, holdout); repeatable
    teacher: tuple[str, ...] = ()  # NAME=SPEC pretrained teachers instead of training (repeatable)
    task: tuple[str, ...] = ()  # [DOMAIN=]TASK.yaml extra evaluation tasks (repeatable)
    variant: tuple[str, ...] = ()  # student variants by name (default: the recommended recipe)
    variant_file: tuple[str, ...] = ()  # YAML: NAME -> [section.key=value, ...] more variants (repeatable)
    ablation: bool = False  # run every built-in ablation variant
    student_fraction: float = 0.2  # the student's corpus: this fraction of each domain's training data
    dev_fraction: float = 0.1  # each domain's dev task: this fraction of its training part, from the end
    # (disjoint from the student's corpus and test); 0: no dev tasks
    pick_on: str = "dev"  # dev | test: the tasks whose mean over domains picks the headline variant
    seed: int = 0  # corpora, teachers, stored views, eval bootstrap
    seeds: tuple[int, ...] = ()  # training seeds: one student per variant, one baseline and reference per
    # seed; intervals over seeds and test rows (default: --student-seed)
    student_seed: int = -1  # one training seed (-1: --seed); same as --seeds N
    threads: int = 0  # torch threads (0: all usable cores)
    num_workers: int = -1  # DataLoader workers (-1: 0 for smoke, 1 otherwise)
    views: int = 4  # stored augmented views per image in the cache (0: none)
    reference: bool = True  # also train the from-scratch student on all the data
    device: str = "auto"  # eval and cache device
    teacher_steps: int = 0  # 0: the budget's value (same for the next flags)
    student_steps: int = 0
    image_size: int = 0
    batch_size: int = 0
    teacher_width: int = 0  # trained teachers' width (both towers and the embedding)
    teacher_layers: int = 0  # trained teachers' layers (both towers)
    student_width: int = 0  # students', baselines' and references' width (below the teachers':
    # compression, e.g. --teacher-width 128 --student-width 96)
    student_layers: int = 0  # students', baselines' and references' layers
    max_rows_per_domain: int = -1  # -1: the budget's value; 0: every row
    ema: float = 0.0  # train.ema.decay for the students (0: none); each is also exported from its EMA and
    # reported beside itself as VARIANT+ema
    ema_start: float = 0.5  # the EMA averages from this fraction of the student steps (before: the weights)


# -- small helpers ----------------------------------------------------------------------------------------
def sizes(flags: Flags) -> Budget:
    """The budget with the flags that were set (non-zero) replacing its numbers."""
    if flags.budget not in BUDGETS:
        raise SetupError(f"--budget {flags.budget!r} is unknown; use one of {', '.join(BUDGETS)}")
    b = BUDGETS[flags.budget]
    keys = (
        "teacher_steps",
        "student_steps",
        "image_size",
        "batch_size",
        "teacher_width",
        "teacher_layers",
        "student_width",
        "student_layers",
    )
    bad = [k for k in keys if getattr(flags, k) < 0]
    if bad:
        raise SetupError(
            f"--{bad[0].replace('_', '-')} must be >= 0 (0: the budget's value), got {getattr(flags, bad[0])}"
        )
    given = {k: getattr(flags, k) for k in keys}
    b = dataclasses.replace(b, **{k: v for k, v in given.items() if v})
    if flags.max_rows_per_domain >= 0:
        b = dataclasses.replace(b, max_rows_per_domain=flags.max_rows_per_domain)
    return b


def check_flags(flags: Flags) -> tuple[int, ...]:
    """Refuse contradictory fractions, seeds and picks in one line naming the flag; returns the training seeds."""
    if not 0.0 < flags.student_fraction <= 1.0:
        raise SetupError(f"--student-fraction must be in (0, 1], got {flags.student_fraction}")
    if not 0.0 <= flags.dev_fraction < 1.0:
        raise SetupError(f"--dev-fraction must be in [0, 1) (0: no dev tasks), got {flags.dev_fraction}")
    if flags.student_fraction > 1.0 - flags.dev_fraction:
        raise SetupError(
            f"--student-fraction {flags.student_fraction} + --dev-fraction {flags.dev_fraction} exceed "
            "1: dev is the end of each domain's training part and the student's corpus its start, so "
            "they would overlap; lower one of them"
        )
    if not 0.0 <= flags.ema < 1.0:
        raise SetupError(f"--ema must be a decay in [0, 1) (0: no EMA), got {flags.ema}")
    if not 0.0 <= flags.ema_start < 1.0:
        raise SetupError(f"--ema-start must be a fraction of the steps in [0, 1), got {flags.ema_start}")
    if flags.pick_on not in ("dev", "test"):
        raise SetupError(f"--pick-on must be dev or test, got {flags.pick_on!r}")
    if flags.seeds and flags.student_seed >= 0:
        raise SetupError("give --seeds or --student-seed, not both (--student-seed N is --seeds N)")
    seeds = flags.seeds or ((flags.student_seed if flags.student_seed >= 0 else flags.seed),)
    if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise SetupError(f"--seeds must be distinct seeds >= 0, got {','.join(map(str, seeds))}")
    return tuple(seeds)


def set_threads(flags: Flags) -> int:
    """One explicit thread count for this process (torch's default oversubscribes a shared small machine)."""
    from distill.training.build_run import resolve_threads  # noqa: PLC0415 (lazy: loaded after the flag and set-up checks)

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
def _source(
    domain: Domain, part: tuple[float, float], fraction: float, max_rows: int, seed: int, from_end: bool = False
):
    from cache.corpus_build import CorpusSource  # noqa: PLC0415 (lazy: loaded after the flag and set-up checks)

    src = dict(domain.source)
    src.setdefault("name", domain.name)
    src["domain"] = domain.name
    src["templates"] = tuple(src["templates"])
    if src.get("class_names") is not None:
        src["class_names"] = tuple(src["class_names"])
    lo, hi = part  # a fraction of a part is the start of it: parts share one seeded, stratified ranking
    sub = (lo + (hi - lo) * (1.0 - fraction), hi) if from_end else (lo, lo + (hi - lo) * fraction)
    return CorpusSource(**src, part=sub, max_rows=max_rows or None)


def build_corpora(domains: list[Domain], flags: Flags, b: Budget, work: Path) -> dict[str, Path]:
    """teacher-DOMAIN, test-DOMAIN (held-out parts), dev-DOMAIN (the end of the training part), student (its start)
    and all corpora; each built once per setting."""
    from cache.corpus_build import build_corpus  # noqa: PLC0415 (lazy: loaded after the flag and set-up checks)

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
        out[f"teacher-{dom.name}"] = build(
            f"teacher-{dom.name}", [_source(dom, part, 1.0, b.max_rows_per_domain, flags.seed)]
        )
        if dom.holdout:
            out[f"test-{dom.name}"] = build(
                f"test-{dom.name}", [_source(dom, (1.0 - dom.holdout, 1.0), 1.0, 0, flags.seed)], shuffle=False
            )
        if flags.dev_fraction > 0:  # the end of the ranking whose start is the student's share: disjoint from it
            out[f"dev-{dom.name}"] = build(
                f"dev-{dom.name}",
                [_source(dom, part, flags.dev_fraction, b.max_rows_per_domain, flags.seed, from_end=True)],
                shuffle=False,
            )
    student_rows = int(b.max_rows_per_domain * flags.student_fraction) if b.max_rows_per_domain else 0
    out["student"] = build(
        "student", [_source(d, train_parts[d.name], flags.student_fraction, student_rows, flags.seed) for d in domains]
    )
    out["all"] = build(
        "all", [_source(d, train_parts[d.name], 1.0, b.max_rows_per_domain, flags.seed) for d in domains]
    )
    return out


@dataclass(frozen=True)
class TaskFiles:
    """The task YAML files the students are evaluated on, and where each task belongs."""

    test: list[str]  # every domain's tasks and the --task ones: the headline
    dev: list[str]  # a `TASK-dev` copy of each domain's own task: ranks variants (--pick-on dev)
    info: dict[str, TaskInfo]  # task name -> domain, test set, home-task owner (mt_verdict.TaskInfo)


def dev_task(task: dict, dev_csv: Path, domain: Domain) -> dict:
    """A copy of a domain's own task reading the domain's dev corpus (`distill corpus` columns) instead of its test set.

    Captions come from the corpus's `caption` column; labels from its `label` column when the domain's source has
    labels (holding the class names when the source names them, matched in order to the task's classes), else from
    the task's own label column (a source metadata column the corpus keeps). Kinds that train on the task (linear
    probe, fine-tuning) split the dev rows by the task's split_fractions (default 0.5/0.1/0.4)."""
    from distill.eval.kinds import EVALUATORS  # noqa: PLC0415 (lazy: loaded after the flag and set-up checks)

    t = json.loads(json.dumps(task))
    t["name"] = f"{task['name']}-dev"
    old = task.get("dataset", {})
    has_label = domain.source.get("label_column", "label") is not None
    ds = {
        "path": str(dev_csv.resolve()),
        "format": "csv",
        "image_column": "image",
        "caption_column": "caption",
        "label_column": "label" if has_label else old.get("label_column", "label"),
    }
    names = domain.source.get("class_names")
    if has_label and names is not None and len(names) == len(t.get("classes", ())):
        t["label_values"] = list(names)  # the corpus writes class names; name i is the task's class i
    if EVALUATORS.get(t["kind"]).roles != ("test",):
        ds["split_fractions"] = list(old.get("split_fractions") or (0.5, 0.1, 0.4))
    t["dataset"] = ds
    return t


def test_set_key(task) -> str:
    """Tasks with equal keys read the same test rows (same file, test split and subsampling): they count once."""
    d = task.dataset
    return json.dumps(
        [str(task.dataset_path), d.split_column, d.splits.get("test"), list(d.split_fractions), d.seed, d.max_samples]
    )


def write_tasks(domains: list[Domain], corpora: dict[str, Path], extra: tuple[str, ...], work: Path) -> TaskFiles:
    """Task YAML files for every domain's tasks (+ the extra ones, + the dev copies) and where each belongs."""
    from distill.eval.tasks import load_task  # noqa: PLC0415 (lazy: loaded after the flag and set-up checks)

    folder = work / "tasks"
    folder.mkdir(parents=True, exist_ok=True)
    files = TaskFiles([], [], {})

    def add(t: dict, into: list[str], domain: str, own: str | None) -> None:
        p = folder / f"{t['name']}.yaml"
        atomic_write_text(p, yaml.safe_dump(t, sort_keys=False))  # another harness on this workdir may read it
        into.append(str(p))
        files.info[t["name"]] = TaskInfo(domain, test_set_key(load_task(str(p))), own)

    for dom in domains:
        for i, t in enumerate(dom.tasks):
            t = json.loads(json.dumps(t))
            if t["dataset"]["path"] == "{holdout}":
                t["dataset"]["path"] = str(corpora[f"test-{dom.name}"].resolve())
            add(t, files.test, dom.name, dom.name if i == 0 else None)
        if f"dev-{dom.name}" in corpora:
            add(dev_task(dom.tasks[0], corpora[f"dev-{dom.name}"], dom), files.dev, dom.name, dom.name)
    for item in extra:
        name, eq, path = item.partition("=")
        path = path if eq else name
        task = load_task(path)
        files.test.append(str(Path(path).resolve()))
        files.info[task.name] = TaskInfo(name if eq else task.name, test_set_key(task), name if eq else None)
    return files


# -- training ---------------------------------------------------------------------------------------------
def run_dir_of(spec: str) -> Path:
    """The run folder of a student `train_and_export` returned (`local-dir:WORK/students/NAME` -> WORK/runs/NAME)."""
    export = Path(spec.removeprefix("local-dir:"))
    return export.parent.parent / "runs" / export.name


def train_and_export(name: str, config: str, overrides: list[str], work: Path, ema: bool = False) -> str:
    """Train (or resume / skip a finished run) and export; returns the student's `local-dir:` SPEC. With `ema`, the
    run's EMA is exported too, beside it (`run_dir_of`'s folder name + `-ema`: `ema_spec`)."""
    from distill.config.train_config import Config  # noqa: PLC0415 (lazy: loaded after the flag and set-up checks)
    from distill.train import train  # noqa: PLC0415 (lazy: loaded after the flag and set-up checks)
    from student.export import export_checkpoint  # noqa: PLC0415 (lazy: loaded after the flag and set-up checks)

    key = digest(config, overrides)
    run_dir, export_dir = work / "runs" / f"{name}-{key}", work / "students" / f"{name}-{key}"
    if not (export_dir / "open_clip_config.json").is_file():
        cfg = Config.from_yaml(CONFIGS / config, overrides=[*overrides, f"train.output_dir={run_dir}"])
        t0 = time.perf_counter()
        result = train(cfg)
        stage(
            f"  {name}: {result['step']} steps in {time.perf_counter() - t0:.0f} s, final loss "
            f"{result['losses'].get('loss', float('nan')):.3f}"
        )
        export_checkpoint(str(run_dir), str(export_dir))
    ema_dir = export_dir.with_name(export_dir.name + "-ema")
    if ema and not (ema_dir / "open_clip_config.json").is_file():
        export_checkpoint(str(run_dir), str(ema_dir), ema=True)
    return f"local-dir:{export_dir}"


def ema_spec(spec: str) -> str:
    """The EMA export beside a student `train_and_export(..., ema=True)` wrote."""
    return spec + "-ema"


def common_overrides(
    flags: Flags, b: Budget, corpus: Path, steps: int, width: int, layers: int, tokenizer: Path | None, seed: int
) -> list[str]:
    workers = flags.num_workers if flags.num_workers >= 0 else (0 if flags.budget == "smoke" else 1)
    ov = [
        f"data.corpus={corpus}",
        f"train.max_steps={steps}",
        f"train.seed={seed}",
        f"data.batch_size={b.batch_size}",
        f"data.num_workers={workers}",
        "data.sampler=random",
        f"optim.lr={b.lr}",
        f"optim.warmup_steps={b.warmup}",
        f"student.image_size={b.image_size}",
        f"student.vocab_size={b.vocab_size}",
        "train.checkpoint_every=0",
        "train.keep_last=1",
        f"train.log_every={max(1, steps // 50)}",
        "data.flip=false",
        "data.crop_scale=[0.8, 1.0]",
        "student.overrides=" + json.dumps(tiny_overrides(width, layers)),
    ]
    if tokenizer is not None:
        ov.append(f"student.tokenizer_dir={tokenizer}")
    return ov


def build_tokenizer(corpus: Path, b: Budget, work: Path) -> Path:
    """One WordPiece vocabulary on the student corpus for every student (baseline and reference too)."""
    from cache.sources.corpus import open_corpus  # noqa: PLC0415 (lazy: loaded after the flag and set-up checks)
    from student.tokenizer import train_wordpiece  # noqa: PLC0415 (lazy: loaded after the flag and set-up checks)

    out = work / f"tokenizer-{digest(str(corpus), b.vocab_size)}"
    if not (out / "tokenizer.json").is_file():
        # built beside it, then renamed into place: another harness on this workdir never reads a half-saved folder
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=work))
        try:
            train_wordpiece(open_corpus(corpus).captions, tmp, vocab_size=b.vocab_size)
            try:
                os.rename(tmp, out)
            except OSError:
                if not (out / "tokenizer.json").is_file():  # a folder left half-written by an interrupted run
                    shutil.rmtree(out)
                    os.rename(tmp, out)
        finally:  # gone once renamed; else another harness finished first (the same vocabulary) or this one failed
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def teacher_specs(
    plans: list[TeacherPlan], corpora: dict[str, Path], flags: Flags, b: Budget, work: Path
) -> dict[str, str]:
    specs = {}
    for i, t in enumerate(plans):
        if t.spec is not None:
            specs[t.name] = t.spec
            continue
        stage(f"teacher {t.name}: contrastive on all of its domain ({b.teacher_steps} steps, width {b.teacher_width})")
        ov = common_overrides(
            flags,
            b,
            corpora[f"teacher-{t.name}"],
            b.teacher_steps,
            b.teacher_width,
            b.teacher_layers,
            None,
            flags.seed + 100 + i,
        )
        ov.append(f"optim.lr={b.teacher_lr}")
        specs[t.name] = train_and_export(f"teacher-{t.name}", "tiny-contrastive.yaml", ov, work)
    return specs


def build_features(corpus: Path, specs: dict[str, str], flags: Flags, work: Path) -> Path:
    from cache.build.run import CacheJob, build_cache  # noqa: PLC0415 (lazy: loaded after the flag and set-up checks)

    out = work / f"features-{digest(str(corpus), specs, flags.views, flags.seed)}.h5"
    build_cache(
        CacheJob(
            data=str(corpus),
            teachers=specs,
            out=str(out),
            batch_size=128,
            num_workers=0,
            device=flags.device,
            views=flags.views,
            seed=flags.seed,
            progress=False,
        )
    )
    return out


def variant_overrides(v: Variant, routing: str, weights: str = "") -> list[str]:
    """The variant's overrides with the harness's placeholders filled in (ROUTING, DOMAIN_WEIGHTS)."""
    fill = {ROUTING: routing, DOMAIN_WEIGHTS: weights}
    return [fill.get(o, o) for o in v.overrides]


def domain_sizes(corpus: Path) -> dict[str, int]:
    """Rows per domain of a harness-built corpus (its `domain` column)."""
    from cache.sources.corpus import open_corpus  # noqa: PLC0415 (lazy: loaded after the flag and set-up checks)
    from distill.data.domains import domain_ids  # noqa: PLC0415 (lazy: loaded after the flag and set-up checks)

    ids, names = domain_ids(open_corpus(corpus), "domain")
    return {n: int(c) for n, c in zip(names, np.bincount(ids, minlength=len(names)))}


OWN_CROPS = ("data.flip=", "data.crop_scale=")  # the harness's own-crop settings; stored views replace them


def uses_views(flags: Flags, v: Variant) -> bool:
    """Whether this variant's student is shown the cache's stored views (then so is its baseline)."""
    off = [o for o in v.overrides if o.replace(" ", "").lower() in ("data.use_views=false", "data.use_views=0")]
    return flags.views > 0 and not off


def student_overrides(base: list[str], views: bool) -> list[str]:
    """The shared overrides minus the own-crop settings when stored views decide (set against them: refused)."""
    return [o for o in base if not (views and o.startswith(OWN_CROPS))]


def baseline_overrides(base: list[str], features: Path, views: bool) -> list[str]:
    """The baseline's overrides: with stored views, contrastive on the same cache replaying the same view boxes
    (`data.use_views=true`, no teacher feature read) and tiny-contrastive.yaml's own crop keys set back to the
    defaults that the students' config leaves (views replace them); else the shared overrides (own crops)."""
    if not views:
        return list(base)
    from distill.config.train_config import DataCfg  # noqa: PLC0415 (lazy: loaded after the flag and set-up checks)

    default = DataCfg.model_fields
    return [
        *student_overrides(base, True),
        f"data.features={features}",
        "data.use_views=true",
        f"data.crop_scale={json.dumps(list(default['crop_scale'].default))}",
        f"data.flip={str(default['flip'].default).lower()}",
    ]


def baseline_saw(flags: Flags, views: bool) -> str:
    """What augmentation the baseline (and the student) saw, in words for the report."""
    if views:
        return (
            f"the cache's {flags.views} stored views per image, replayed as the student sees them (contrastive "
            "on the cache with data.use_views=true)"
        )
    why = "no stored views" if not flags.views else "the variant sets data.use_views=false"
    return f"its own random crops (area 0.8-1, no flip), as the student did ({why})"


def recorded_augmentation(spec: str) -> str | None:
    """What the trainer wrote it showed a harness-trained model (run_meta.json `augmentation`), from its spec."""
    export = Path(spec.removeprefix("local-dir:"))
    meta = export.parent.parent / "runs" / export.name / "run_meta.json"
    try:
        return json.loads(meta.read_text()).get("augmentation")
    except (OSError, ValueError):
        return None


def shown_in(text: str | None, work: Path, out: Path) -> str | None:
    """`text` with the work folder's absolute path shown relative to OUT (the report's folder), as eval reports do."""
    if text is None:
        return None
    return text.replace(str(work.resolve()), shown_path(work, out)).replace(str(work), shown_path(work, out))


def baseline_name(flags: Flags, views: bool) -> str:
    """`baseline` is the baseline of the students on stored views (or of all, without views); with views, the
    baseline of variants on their own crops (data.use_views=false) is `baseline-own-crops`."""
    return "baseline" if views or not flags.views else "baseline-own-crops"


def sizes_text(b: Budget) -> str:
    return (
        f"trained teachers width {b.teacher_width} x {b.teacher_layers} layers, student (and baseline, "
        f"reference) width {b.student_width} x {b.student_layers} layers"
    )


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
        raise SetupError(
            f"--variant {bad[0]!r} is unknown; built-in variants: {', '.join(VARIANTS)} "
            f"(or give your own with --variant-file)"
        )
    return [known[n] for n in dict.fromkeys(names)]


def pick_domains(flags: Flags) -> list[Domain]:
    root = Path(flags.data_root)
    names = list(flags.domains) or ([] if flags.domain_file else list(BUILTIN_DOMAINS))
    bad = [n for n in names if n not in BUILTIN_DOMAINS]
    if bad:
        raise SetupError(
            f"--domains {bad[0]!r} is not a built-in domain ({', '.join(BUILTIN_DOMAINS)}); "
            f"give your own with --domain-file"
        )
    domains = [resolve_domain(BUILTIN_DOMAINS[n], root) for n in names]
    domains += [load_domain_file(f) for f in flags.domain_file]
    seen = [d.name for d in domains]
    if len(set(seen)) != len(seen):
        raise SetupError(f"two domains share a name: {seen}")
    return domains


def run(flags: Flags) -> dict:
    from distill.eval import EvalJob, run_eval  # noqa: PLC0415 (lazy: loaded after the flag and set-up checks)

    b = sizes(flags)
    seeds = check_flags(flags)
    out = Path(flags.out)
    work = Path(flags.workdir) if flags.workdir else out / "work"
    domains = pick_domains(flags)
    variants = pick_variants(flags)
    if flags.pick_on == "dev" and not flags.dev_fraction and len(variants) > 1:
        raise SetupError(
            "--pick-on dev needs dev tasks to rank the variants: set --dev-fraction > 0, or pick on "
            "the test tasks with --pick-on test (then the headline is optimistic)"
        )
    given = _pairs(flags.teacher, "teacher")
    plans = plan_teachers([d.name for d in domains], given)
    clash = {p.name for p in plans} & ({v.name for v in variants} | {"baseline", "baseline-own-crops", "reference"})
    if clash:
        raise SetupError(f"teacher {sorted(clash)[0]!r} has the name of a student variant or baseline; rename one")
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    threads = set_threads(flags)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    stage(
        f"budget {flags.budget}, {threads} torch threads, domains {[d.name for d in domains]}, variants "
        f"{[v.name for v in variants]}, seeds {list(seeds)}; {sizes_text(b)}; building corpora (student "
        f"fraction {flags.student_fraction}, dev fraction {flags.dev_fraction})"
    )
    corpora = build_corpora(domains, flags, b, work)
    files = write_tasks(domains, corpora, flags.task, work)
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
    report_of_cache = teacher_report(str(features), str(corpora["student"]), seed=flags.seed)  # issue 20

    def base(seed: int) -> list[str]:
        return common_overrides(
            flags, b, corpora["student"], b.student_steps, b.student_width, b.student_layers, tokenizer, seed
        )

    t0 = time.perf_counter()
    students: dict[str, str] = {}
    baselines: dict[tuple[bool, int], str] = {}
    references: dict[int, str] = {}
    kinds = list(dict.fromkeys(uses_views(flags, v) for v in variants))
    for seed in seeds:  # every baseline first: a failure shows before the students' long runs
        for views in kinds:
            stage(
                f"{baseline_name(flags, views)} (seed {seed}): the same student, contrastive on the same corpus "
                f"({b.student_steps} steps), seeing {'the stored views' if views else 'its own crops'}"
            )
            baselines[views, seed] = train_and_export(
                "baseline", "tiny-contrastive.yaml", baseline_overrides(base(seed), features, views), work
            )
            students[f"{baseline_name(flags, views)} seed {seed}"] = baselines[views, seed]
        if flags.reference:
            stage(f"reference (seed {seed}): the same student, contrastive on ALL the domains' training data")
            ref = [f"data.corpus={corpora['all']}" if o.startswith("data.corpus=") else o for o in base(seed)]
            references[seed] = students[f"reference seed {seed}"] = train_and_export(
                "reference", "tiny-contrastive.yaml", ref, work
            )
    timings["baselines"] = time.perf_counter() - t0

    routing = routing_value(plans, [d.name for d in domains])
    weights = domain_weights_value(domain_sizes(corpora["student"]))
    trained: dict[int, dict[str, str]] = {seed: {} for seed in seeds}
    ema = [f"train.ema.decay={flags.ema}", f"train.ema.start={int(b.student_steps * flags.ema_start)}"]
    for v in variants:
        for seed in seeds:
            t0 = time.perf_counter()
            stage(f"student {v.name} (seed {seed}): {v.note or ' '.join(v.overrides)}")
            trained[seed][v.name] = students[f"{v.name} seed {seed}"] = train_and_export(
                f"student-{v.name}",
                "tiny-hybrid.yaml",
                [
                    *student_overrides(base(seed), uses_views(flags, v)),
                    f"data.features={features}",
                    *variant_overrides(v, routing, weights),
                    *(ema if flags.ema else []),
                ],
                work,
                ema=bool(flags.ema),
            )
            if flags.ema:  # its EMA, reported as a variant of its own beside it
                trained[seed][f"{v.name}+ema"] = ema_spec(trained[seed][v.name])
            timings[f"train {v.name} seed {seed}"] = time.perf_counter() - t0
    if flags.ema:
        note = f"its EMA (decay {flags.ema} from step {int(b.student_steps * flags.ema_start)})"
        variants = [
            x for v in variants for x in (v, Variant(f"{v.name}+ema", v.overrides, f"{v.note or v.name}; {note}"))
        ]

    own = {d.name: d.name for d in domains if d.name in specs}  # a trained teacher has its domain's name
    auto = {
        v.name: {s: auto_routing_by_domain(run_dir_of(trained[s][v.name]), str(corpora["student"]), own) for s in seeds}
        for v in variants
    }
    auto = {name: per for name, per in auto.items() if any(per.values())}  # auto-routed variants only

    # one eval per seed and split, every model side by side: teachers and baselines are scored once, and every
    # model of a seed on the same row resamples (the eval seed is --seed for all)
    reports: dict[str, list] = {"test": [], "dev": []}
    others = ["reference"] if flags.reference else []
    for seed in seeds:
        t0 = time.perf_counter()
        models = {
            **trained[seed],
            **{baseline_name(flags, k): baselines[k, seed] for k in kinds},
            **({"reference": references[seed]} if flags.reference else {}),
            **specs,
        }
        for split, tasks in (("test", files.test), ("dev", files.dev)):
            if not tasks:
                continue
            stage(
                f"evaluating seed {seed}: {len(variants)} variant(s) beside the baselines and teachers on "
                f"{len(tasks)} {split} tasks"
            )
            where = out / "eval" / f"seed-{seed}"
            reports[split].append(
                run_eval(
                    EvalJob(
                        models=models,
                        tasks=tasks,
                        out=str(where if split == "test" else where / "dev"),
                        device=flags.device,
                        bootstrap=b.bootstrap,
                        seed=flags.seed,
                        student=variants[0].name,
                        baselines=tuple(m for m in models if m != variants[0].name and m not in specs),
                        max_samples=b.eval_max_samples or None,
                        cache_dir=str(work / "eval-cache"),
                    )
                )
            )
        timings[f"eval seed {seed}"] = time.perf_counter() - t0
    results = {}
    for v in variants:
        views = uses_views(flags, v)
        results[v.name] = {
            "variant": v,
            "baseline_saw": "stored views" if views else "own crops",
            **{
                split: verdict_entries(
                    r,
                    v.name,
                    baseline_name(flags, views),
                    files.info,
                    seeds,
                    flags.seed,
                    teachers=list(specs),
                    others=others,
                )
                if r
                else []
                for split, r in reports.items()
            },
        }
    timings["total"] = time.perf_counter() - t_start
    chosen = pick_variant(results, flags.pick_on if files.dev else "test")
    record = {
        v.name: shown_in(recorded_augmentation(baselines[uses_views(flags, v), seeds[0]]), work, out) for v in variants
    }  # what the trainer wrote it showed each variant's baseline
    setup = {
        "flags": dataclasses.asdict(flags),
        "budget": dataclasses.asdict(b),
        "threads": threads,
        "seeds": list(seeds),
        "sizes": sizes_text(b),
        "picked": chosen,
        "baseline_saw": {
            v.name: f"{baseline_saw(flags, uses_views(flags, v))} [trainer's record: {record[v.name]}]"
            for v in variants
        },
        "dev_tasks": [Path(p).stem for p in files.dev],
        "machine": machine(),
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "teachers": {k: shown_spec(v, out) for k, v in specs.items()},
        "students": {k: shown_spec(v, out) for k, v in students.items()},
        "routing": routing,
        "corpora": {k: shown_path(v, out) for k, v in corpora.items()},
        "tasks": {k: dataclasses.asdict(v) for k, v in files.info.items()},
        "own_tasks": {k: v.own for k, v in files.info.items() if v.own},
        "confidence_by_domain": confidence,
        "teacher_report": report_of_cache,
        "auto_routing_by_domain": auto,
    }
    paths = write_outputs(out, results, setup, flags.pick_on if files.dev else "test")
    stage(f"done in {timings['total']:.0f} s: {paths['report']} and {paths['verdict']} (picked {chosen})")
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
