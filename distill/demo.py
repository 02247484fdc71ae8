"""`distill demo`: the whole pipeline, offline, on a corpus and teachers the project makes itself.

pretrain two small teacher CLIPs (different seeds and embedding sizes) from scratch -> export them -> cache both
-> distil a student from them in hybrid mode -> export it -> evaluate it beside its teachers. It is the README's
main-job command: a fresh clone shows every stage working in a few minutes on a CPU, the teachers are real (if
small) trained models loaded through the same `local-dir:` path as any open_clip model, and the output folder
is a worked example of every file format.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from pydantic import Field, model_validator

from cache.sources.synthetic import SHAPES, make_synthetic_corpus
from distill.logs import OUR_PACKAGES
from teachers.kernel.config_model import Int, Section, Str

log = logging.getLogger(__name__)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


class DemoJob(Section):
    """What `distill demo` runs (its flags are made from these fields: `distill.cli`)."""

    out: Str = Field("demo-out", description="output folder (replaced only if an earlier demo made it)")
    steps: Int = Field(80, description="student training steps")
    rows: Int = Field(96, description="rows of the generated corpus")
    seed: Int = Field(0, description="seed of the corpora, the teachers and the student")
    teacher_steps: Int = Field(80, description="pretraining steps of each demo teacher")

    @model_validator(mode="after")
    def _check(self) -> DemoJob:
        for key in ("steps", "rows", "teacher_steps"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        return self


def _write_demo_tasks(root: Path, heldout_csv: Path) -> list[str]:
    """Zero-shot (shape of the drawn object) and retrieval tasks over a held-out synthetic corpus.

    Every path is relative to the file that holds it (task files resolve against their folder, CSV image paths
    against the CSV's), so the demo folder can be moved or copied and its tasks still run.
    """
    with open(heldout_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    labelled = root / "heldout_shapes.csv"
    with open(labelled, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "label"])
        for r in rows:
            shape = next(s for s in SHAPES if f" {s} " in r["caption"])
            w.writerow([_relative(heldout_csv.parent / r["image"], root), shape])
    zs = root / "demo-shapes-zeroshot.yaml"
    zs.write_text(
        "name: demo-shapes-zeroshot\n"
        "kind: zeroshot\n"
        f"dataset: {{path: {_relative(labelled, root)}, format: csv}}\n"
        f"classes: [{', '.join(SHAPES)}]\n"
        "templates: ['an image of a {} ', 'a {} in the centre', 'ct image of a {}']\n"
    )
    rt = root / "demo-retrieval.yaml"
    rt.write_text(
        f"name: demo-retrieval\nkind: retrieval\ndataset: {{path: {_relative(heldout_csv, root)}, format: csv}}\n"
    )
    return [str(zs), str(rt)]


def _relative(path: Path, start: Path) -> str:
    """`path` relative to the folder `start`, in POSIX form (what the files written there hold)."""
    return Path(os.path.relpath(path.resolve(), start.resolve())).as_posix()


@contextmanager
def _quiet_info():
    """Our own INFO lines (threads, vocabulary, parameter counts) hidden while the demo prints its own steps;
    `distill -v demo` shows them."""
    loggers = [logging.getLogger(name) for name in OUR_PACKAGES]
    levels = [lg.level for lg in loggers]
    if not log.isEnabledFor(logging.DEBUG):
        for lg in loggers:
            lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


CARD_NAME = "biomed-distill demo student"  # the model card's title
MARKER = ".distill-demo"  # written first into every demo folder: only such a folder is ever deleted by a rerun


def prepare_out_dir(out: Path) -> Path:
    """An empty `out` marked as a demo folder; a previous demo there is replaced, anything else is refused.

    Why: `distill demo --out .` (or a typo naming a real folder) must never delete a user's files.
    """
    if out.exists():
        if not out.is_dir():
            raise ValueError(f"--out {out}: a file of that name exists; choose another --out")
        ours = (out / MARKER).is_file() or (out / "demo_summary.json").is_file()  # (older demos: the summary)
        if any(out.iterdir()) and not ours:
            raise ValueError(
                f"--out {out}: the folder exists, is not empty and was not written by "
                "distill demo, so it is left alone; choose a new --out (or delete it yourself)"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("written by distill demo; a rerun with the same --out replaces this folder\n")
    return out


def run_demo(job: DemoJob) -> dict:
    with _quiet_info():
        return _run_demo(job)


def _run_demo(job: DemoJob) -> dict:
    from cache.build.run import CacheJob, build_cache  # noqa: PLC0415 (lazy: torch kept off `distill --help`)
    from distill.config.train_config import Config  # noqa: PLC0415 (lazy: kept off `distill --help`)
    from distill.eval import EvalJob, run_eval  # noqa: PLC0415 (lazy: torch kept off `distill --help`)
    from distill.train import train  # noqa: PLC0415 (lazy: torch kept off `distill --help`)
    from student.export import export_checkpoint  # noqa: PLC0415 (lazy: torch kept off `distill --help`)

    out = prepare_out_dir(Path(job.out))
    print(f"[1/5] generating a {job.rows}-row synthetic corpus; pretraining two small teacher CLIPs on it")
    corpus = make_synthetic_corpus(out / "corpus", n=job.rows, image_size=48, seed=job.seed)
    heldout = make_synthetic_corpus(out / "heldout", n=48, image_size=48, seed=job.seed + 1)
    teachers = {}
    for i, (name, dim) in enumerate([("teacher_a", 48), ("teacher_b", 96)]):
        cfg = Config.from_yaml(
            CONFIGS / "tiny-contrastive.yaml",
            overrides=[
                f"data.corpus={corpus}",
                f"train.output_dir={out / 'teacher_runs' / name}",
                f"train.max_steps={job.teacher_steps}",
                f"train.seed={job.seed + 10 + i}",
                "train.checkpoint_every=0",
                f"student.overrides.embed_dim={dim}",
            ],
        )
        train(cfg)
        exported = export_checkpoint(str(out / "teacher_runs" / name), str(out / "teachers" / name))
        teachers[name] = f"local-dir:{exported}"

    print("[2/5] distill cache: every teacher embeds every pair once")
    features = out / "features.h5"
    build_cache(
        CacheJob(
            data=str(corpus),
            teachers=teachers,
            out=str(features),
            batch_size=32,
            num_workers=0,
            device="auto",
            views=2,
            seed=job.seed,
        )
    )

    print(f"[3/5] training a tiny student for {job.steps} steps (hybrid: InfoNCE + affinity distillation)")
    run_dir = out / "run"
    cfg = Config.from_yaml(
        CONFIGS / "tiny-hybrid.yaml",
        overrides=[
            f"data.corpus={corpus}",
            f"data.features={features}",
            f"train.output_dir={run_dir}",
            f"train.max_steps={job.steps}",
            f"train.seed={job.seed}",
        ],
    )
    result = train(cfg)

    print("[4/5] distill export: an open_clip-loadable student folder")
    student_dir = out / "student"
    export_checkpoint(str(run_dir), str(student_dir), name=CARD_NAME)

    print("[5/5] distill eval: the student beside its teachers")
    tasks = _write_demo_tasks(out, heldout)
    report = run_eval(
        EvalJob(
            models={"student": f"local-dir:{student_dir}", **teachers},
            tasks=tasks,
            out=str(out / "report"),
            device="auto",
            bootstrap=200,
            student="student",
        )
    )
    export_checkpoint(str(run_dir), str(student_dir), report=str(out / "report" / "report.json"), name=CARD_NAME)
    summary = {
        "features": _relative(features, out),
        "run": _relative(run_dir, out),  # relative to the summary
        "student": _relative(student_dir, out),
        "report": _relative(out / "report" / "report.md", out),
        "train": {
            k: _relative(Path(v), out) if k in ("output_dir", "checkpoint") and Path(str(v)).exists() else v
            for k, v in result.items()
        },
    }
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print((out / "report" / "report.md").read_text())
    print(
        f"demo finished: features {features}, run {run_dir} (log.jsonl, loss_curves.png), "
        f"student {student_dir}, report {out / 'report'}"
    )
    return {"summary": summary, "report": report}
