"""The `distill` command line: the only module that imports argparse.

Each subcommand's flags are made from its job model's fields (`distill.config.flags`: defaults and help written
once, on the model); the Namespace becomes that model in one validation, before torch is imported, and library
code gets the model, so no library module ever sees a Namespace.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from cache.build.job import DEVICES, DTYPES, ON_BAD_SAMPLE, CacheJob
from cache.sources.corpus import open_corpus
from distill import __version__
from distill.audit_cli import add_audit_parser
from distill.config.eval_job import DEVICES as EVAL_DEVICES
from distill.config.eval_job import EvalJob
from distill.config.flags import add_flag, job_fields
from distill.config.teachers_job import TeachersJob
from distill.corpus_cli import add_corpus_parser
from distill.demo import DemoJob
from distill.errors import BUG, describe, exit_code
from distill.logs import setup_logging
from student.tokenizer import train_wordpiece
from teachers.registry import TEACHER_ALIASES, check_spec, list_teachers

EPILOG = """SPEC forms: hf-hub:ORG/REPO, local-dir:PATH, MODEL/PRETRAINED_TAG (open_clip built-in),
hf:HUB_ID_OR_FOLDER (any transformers dual encoder: CLIP, SigLIP; hf-clip: is the same), py:module:function,
or an alias (distill info --list-teachers lists them)."""


def _name_spec(value: str) -> tuple[str, str]:
    name, sep, spec = value.partition("=")
    if not sep or not name or not spec:
        raise argparse.ArgumentTypeError(f"expected NAME=SPEC, got {value!r} (for example biomedclip=biomedclip)")
    return name, spec


def _pixels(value: str) -> int:
    """A pixel count: an integer, or with an M suffix (64M = 64,000,000)."""
    text = value.strip().upper()
    try:
        n = round(float(text[:-1]) * 1e6) if text.endswith("M") else int(text)
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"expected a pixel count such as 64000000 or 64M, got {value!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a pixel count >= 0, got {value!r}")
    return n


def _float_pair(value: str) -> tuple[float, float]:
    """MIN,MAX as two floats (range checks are CacheJob's, which names the flag)."""
    parts = value.split(",")
    try:
        if len(parts) != 2:
            raise ValueError
        return float(parts[0]), float(parts[1])
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX such as 0.5,1, got {value!r}") from None


def _auto_int(low: int):
    """An argparse type: an integer >= `low`, or `auto` (chosen from the device at run time)."""

    def parse(value: str) -> int | str:
        if value.strip().lower() == "auto":
            return "auto"
        try:
            n = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer or auto, got {value!r}") from None
        if n < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low} or auto, got {value!r}")
        return n

    return parse


def _pairs(values: Sequence[tuple[str, str]], flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, spec in values:
        if name in out:
            raise SystemExit(f"error: {flag} {name}= given twice")
        out[name] = spec
    return out


# -- subcommands -------------------------------------------------------------------------------------
def _check_specs(pairs: Sequence[tuple[str, str]]) -> None:
    """Every SPEC parsed, its alias found and its local folder checked before torch is imported (a typo answers
    in about a second); the same checks `load_teacher` makes."""
    for _, spec in pairs:
        check_spec(spec)


def cmd_cache(args: argparse.Namespace) -> int:
    _check_specs(args.teacher)
    job = CacheJob(**job_fields(CacheJob, args, teachers=_pairs(args.teacher, "--teacher")))  # before torch
    from cache.build.run import build_cache  # noqa: PLC0415 (lazy: torch only after the job is validated)

    build_cache(job)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    if args.list_teachers:
        for name in list_teachers():
            print(f"{name:16s} {TEACHER_ALIASES.get(name)}")
        return 0
    if not args.features:
        raise SystemExit("error: distill info needs FEATURES.h5 (or --list-teachers)")
    from cache.inspect import check_segments, describe_cache  # noqa: PLC0415 (lazy: torch kept off --help)

    text, damaged = describe_cache(args.features, all_bad=args.all_bad)
    print(text, flush=True)
    check_segments(args.features, damaged)  # a missing or truncated segment file: one error line, exit 2
    if args.verify:  # every row of every teacher: checksums, finiteness, unit norms (cache/store/verify.py)
        from cache.store.verify import verify  # noqa: PLC0415 (lazy: h5py kept off --help)

        report = verify(args.features)
        print(report, file=sys.stdout if report.ok else sys.stderr)
        return 0 if report.ok else 2
    return 0


def cmd_teachers(args: argparse.Namespace) -> int:
    """`distill teachers`: per slice, each teacher's retrieval accuracy and agreement, from the cache alone."""
    job = TeachersJob(**job_fields(TeachersJob, args))  # before torch
    if not Path(job.features).is_file():
        raise FileNotFoundError(f"feature cache {job.features} not found; build it with `distill cache`")
    from distill import teacher_report as tr  # noqa: PLC0415 (lazy: the cache reader imports torch)
    from distill import teacher_report_out as out  # noqa: PLC0415 (lazy: the cache reader imports torch)

    if job.by is not None:
        assert job.data is not None  # the job's check
        slices = tr.by_column(job.features, job.data, job.by)
    else:
        assert job.clusters is not None  # the job's check
        slices = tr.by_clusters(job.features, job.clusters, job.seed, job.data, job.cluster_teacher, job.cluster_on)
    report = tr.score(job.features, slices, pool=job.pool, seed=job.seed)
    print(out.table(report), flush=True)
    if job.out:
        folder = Path(job.out)
        print(f"wrote {out.write_json(report, folder)} and {out.write_heatmap(report, folder)}")
    if job.suggest:
        auto = None
        if job.clusters is not None:  # training's loss.routing.auto clusters its own rows with these settings
            auto = {"clusters": job.clusters, "on": job.cluster_on, "seed": job.seed}
            auto |= {"teacher": job.cluster_teacher} if job.cluster_teacher else {}
        print(f"wrote the loss.routing block to {out.write_suggestion(report, job.margin, Path(job.suggest), auto)}")
    return 0


class _TrainHelp(argparse.Action):
    """`distill train --help`: the usage and every config key with its default (imported only when asked)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from distill.config.train_config import Config  # noqa: PLC0415 (lazy: config models kept off --help)
        from distill.config.usage import config_help  # noqa: PLC0415 (lazy: config models kept off --help)

        print(config_help(Config), end="")
        parser.exit()


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-h", "--help", action=_TrainHelp, help="show the usage and every config key, then exit")
    parser.add_argument("--config", required=True, help="YAML config (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.max_steps=100")


def cmd_train(args: argparse.Namespace) -> int:
    """`distill train`: the command line parsed once here; the config checked before torch loads, then in full by
    distill.train from its values (the file is not read again)."""
    from distill.config.train_config import Config  # noqa: PLC0415 (lazy: config models kept off --help)

    config = Config.from_argv(["--config", args.config, *args.overrides], static=True)  # a typo: before torch
    from distill.train import main as train_module_main  # noqa: PLC0415 (lazy: torch after the config check)

    return train_module_main(config=config, source=args.config)


def train_main(argv: Sequence[str] | None = None) -> int:
    """`distill train`: the same run as `accelerate launch -m distill.train --config C.yaml [key=value ...]`."""
    parser = argparse.ArgumentParser(
        prog="distill train", description="Train a student (see configs/).", add_help=False
    )
    _train_arguments(parser)
    return cmd_train(parser.parse_args(argv))


def cmd_export(args: argparse.Namespace) -> int:
    from student.export import export_checkpoint, push_to_hub  # noqa: PLC0415 (lazy: torch kept off --help)

    out = export_checkpoint(
        args.checkpoint,
        args.out,
        report=args.report,
        text_config_from_hub=args.text_config_from_hub,
        ema=args.ema,
        average=args.average or (),
    )
    print(f"exported student to {out}")
    if args.push_to_hub:
        push_to_hub(args.out, args.push_to_hub)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    _check_specs(args.model)
    job = EvalJob(
        **job_fields(EvalJob, args, models=_pairs(args.model, "--model"), tasks=args.task, baselines=args.baseline)
    )  # before torch: models, baselines, task names
    from distill.eval import run_eval  # noqa: PLC0415 (lazy: torch only after the job is validated)
    from distill.eval.report import console_lines  # noqa: PLC0415 (lazy: torch only after the job is validated)

    report = run_eval(job)
    for line in console_lines(report):  # the verdicts on the console, not only in report.md
        print(line)
    print(f"report written to {Path(args.out) / 'report.md'}")
    return 0


def cmd_tokenizer(args: argparse.Namespace) -> int:
    corpus = open_corpus(args.data)
    out = train_wordpiece(corpus.captions, args.out, vocab_size=args.vocab_size, model_max_length=args.context_length)
    from transformers import AutoTokenizer  # noqa: PLC0415 (lazy: transformers kept off --help)

    size = len(AutoTokenizer.from_pretrained(str(out)))
    note = f" (asked for {args.vocab_size}: the captions hold no more pieces)" if size < args.vocab_size else ""
    print(f"wrote a {size}-token WordPiece tokenizer{note} trained on {len(corpus)} captions to {out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from distill.demo import run_demo  # noqa: PLC0415 (lazy: the pipeline imports torch)

    run_demo(DemoJob(**job_fields(DemoJob, args)))
    return 0


# -- parser ------------------------------------------------------------------------------------------
def _trust_remote_code_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="let hub models whose repo ships its own model code (config.json auto_map, e.g. "
        "conceptclip) run that code; off by default: use only for repositories you trust",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="distill",
        description="biomed-distill: distil biomedical CLIP teachers into one BiomedCLIP-architecture student.",
        epilog=EPILOG,
    )
    p.add_argument("--version", action="version", version=f"biomed-distill {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser(
        "cache",
        help="embed a corpus with every teacher into an HDF5 feature cache",
        description="Every teacher embeds every image-caption pair once, into FEATURES.h5. "
        "Resumable: rerun the same command after an interruption. Run under `accelerate launch` "
        "or torchrun to split the corpus over processes.",
        epilog=EPILOG,
    )
    add_flag(c, CacheJob, "data")
    add_flag(
        c,
        CacheJob,
        "teachers",
        "--teacher",
        dest="teacher",
        action="append",
        type=_name_spec,
        metavar="NAME=SPEC",
        help="a teacher to cache (repeatable)",
    )
    add_flag(c, CacheJob, "out")
    add_flag(c, CacheJob, "batch_size", type=_auto_int(1))
    add_flag(c, CacheJob, "num_workers", type=_auto_int(0))
    add_flag(c, CacheJob, "device", choices=DEVICES, help=None)
    add_flag(c, CacheJob, "dtype", choices=DTYPES)
    add_flag(c, CacheJob, "views", metavar="K")
    add_flag(c, CacheJob, "view_scale", type=_float_pair, metavar="MIN,MAX")
    add_flag(c, CacheJob, "view_ratio", type=_float_pair, metavar="MIN,MAX")
    add_flag(c, CacheJob, "view_flip", metavar="P")
    add_flag(c, CacheJob, "view_color", metavar="S")
    add_flag(c, CacheJob, "on_bad_sample", choices=ON_BAD_SAMPLE)
    add_flag(c, CacheJob, "retry_bad")
    add_flag(c, CacheJob, "seed")
    add_flag(c, CacheJob, "chunk_rows")
    add_flag(c, CacheJob, "max_pixels", type=_pixels, metavar="N")
    add_flag(c, CacheJob, "tokens", metavar="G")
    add_flag(c, CacheJob, "max_gb", metavar="X")
    add_flag(c, CacheJob, "shard_attempts", metavar="N")
    add_flag(c, CacheJob, "shard_backoff", metavar="S")
    add_flag(c, CacheJob, "max_bad_fraction", metavar="F")
    _trust_remote_code_flag(c)
    c.set_defaults(func=cmd_cache)

    i = sub.add_parser("info", help="describe a feature cache")
    i.add_argument("features", nargs="?", help="FEATURES.h5")
    i.add_argument("--list-teachers", action="store_true", help="list the teacher aliases and their SPECs")
    i.add_argument(
        "--all-bad", action="store_true", help="list every bad sample (key and reason), not only the first 3"
    )
    i.add_argument(
        "--verify",
        action="store_true",
        help="read every dataset training reads and check it: "
        "features (checksums, finiteness, unit norms), statistics (re-derived from the features), keys, "
        "done flags, bad-sample records and views; exit 2 naming the teacher and rows of each problem",
    )
    i.set_defaults(func=cmd_info)

    r = sub.add_parser(
        "teachers",
        help="which teacher knows which slice of the corpus, from a feature cache alone",
        description="Per slice of the cache's rows (a corpus column, or k-means clusters of the teachers' "
        "embeddings) and per teacher: image-to-text top-1 retrieval within random pools of the slice, its skill "
        "(that accuracy above the chance of its own choices, which ranks the teachers), the agreement of its top-1 "
        "choices with the other teachers', and the slice's size. No model is run.",
    )
    r.add_argument("features", help="FEATURES.h5")
    add_flag(r, TeachersJob, "by", metavar="COLUMN")
    add_flag(r, TeachersJob, "data", metavar="CORPUS")
    add_flag(r, TeachersJob, "clusters", metavar="K")
    add_flag(r, TeachersJob, "cluster_on", metavar="WHAT")
    add_flag(r, TeachersJob, "cluster_teacher", metavar="NAME")
    add_flag(r, TeachersJob, "seed")
    add_flag(r, TeachersJob, "pool", metavar="N")
    add_flag(r, TeachersJob, "out", metavar="DIR")
    add_flag(r, TeachersJob, "suggest", metavar="FILE")
    add_flag(r, TeachersJob, "margin", metavar="M")
    r.set_defaults(func=cmd_teachers)

    add_audit_parser(sub)  # `distill audit` (distill/audit_cli.py)

    t = sub.add_parser("train", help="train a student (same as accelerate launch -m distill.train)", add_help=False)
    _train_arguments(t)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("export", help="export a checkpoint as an open_clip-loadable student folder")
    e.add_argument("checkpoint", help="a checkpoint-STEP folder, or a run folder (its newest checkpoint)")
    e.add_argument("--out", required=True, help="STUDENT_DIR to write")
    e.add_argument("--report", help="report.json from distill eval, summarised in the model card")
    e.add_argument(
        "--text-config-from-hub",
        metavar="HUB_ID",
        help="name this hub id as the text tower's config (for publishing, as BiomedCLIP does)",
    )
    e.add_argument(
        "--ema", action="store_true", help="export the checkpoint's EMA of the weights (trained with train.ema)"
    )
    e.add_argument(
        "--average",
        nargs="+",
        metavar="CHECKPOINT",
        help="average these checkpoints' weights (their EMAs with --ema) with CHECKPOINT's: one student's soup",
    )
    e.add_argument("--push-to-hub", metavar="REPO", help="upload the folder to the Hugging Face Hub")
    e.set_defaults(func=cmd_export)

    v = sub.add_parser(
        "eval",
        help="evaluate students and teachers side by side",
        description="Every --model on every --task, with 95% bootstrap intervals. One model is the "
        "student, any --baseline models are compared with it one by one, every other model is a "
        "teacher. The student's paired differences (minus the best teacher, minus each baseline; "
        "the same resamples for every model) give a verdict per task on its headline metric "
        "(better / within / worse: the interval above, around or below 0) and over all tasks; "
        "each metric's chance level is shown beside it.",
        epilog=EPILOG,
    )
    add_flag(
        v,
        EvalJob,
        "models",
        "--model",
        dest="model",
        action="append",
        type=_name_spec,
        metavar="NAME=SPEC",
        help="a model to evaluate (repeatable): the student, teachers and baselines alike",
    )
    add_flag(v, EvalJob, "tasks", "--task", dest="task", action="append")
    add_flag(v, EvalJob, "out")
    add_flag(v, EvalJob, "student", metavar="NAME")
    add_flag(v, EvalJob, "baselines", "--baseline", dest="baseline", action="append", metavar="NAME")
    add_flag(v, EvalJob, "device", choices=EVAL_DEVICES, help=None)
    add_flag(v, EvalJob, "batch_size", help=None)
    add_flag(v, EvalJob, "num_workers", help=None)
    add_flag(v, EvalJob, "bootstrap")
    add_flag(v, EvalJob, "seed", help=None)
    add_flag(v, EvalJob, "max_samples")
    add_flag(v, EvalJob, "cache_dir")
    _trust_remote_code_flag(v)
    v.set_defaults(func=cmd_eval)

    add_corpus_parser(sub)  # `distill corpus` (distill/corpus_cli.py)

    k = sub.add_parser("tokenizer", help="train a WordPiece vocabulary on a corpus's captions")
    k.add_argument("--data", required=True, help="corpus (as for distill cache)")
    k.add_argument("--vocab-size", type=int, required=True)
    k.add_argument("--out", required=True, help="tokenizer folder to write")
    k.add_argument("--context-length", type=int, default=256)
    k.set_defaults(func=cmd_tokenizer)

    d = sub.add_parser(
        "demo",
        help="the whole pipeline offline: pretrain two small teachers on a generated "
        "corpus, cache them, distil a student, export it, evaluate all three",
    )
    for name in ("out", "steps", "teacher_steps", "rows"):
        add_flag(d, DemoJob, name)
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        hint = {
            "cache": "committed rows are kept; rerun the same command to resume",
            "train": "rerun with train.resume=auto to continue from the newest checkpoint",
        }.get(args.command, "")
        print(f"distill {args.command}: interrupted{'; ' + hint if hint else ''}", file=sys.stderr)
        return 130
    except Exception as e:  # one line and exit 1 (environment) or 2 (bad input): see distill/errors.py
        if args.verbose:
            raise
        failure = describe(
            e,
            file={
                "info": getattr(args, "features", None),
                "teachers": getattr(args, "features", None),
                "cache": getattr(args, "out", None),
            }.get(args.command),
        )
        if failure is None:  # a bug: keep its traceback for the report
            traceback.print_exc()
            print(
                f"distill {args.command}: internal error ({type(e).__name__}), please report it with the "
                "traceback above; `distill -v` adds debug logs",
                file=sys.stderr,
            )
            return BUG
        print(f"distill {args.command}: error: {failure.message}", file=sys.stderr)
        return exit_code(failure)


if __name__ == "__main__":
    sys.exit(main())
