"""`distill audit`: exact and near duplicates in a corpus, and corpus rows that copy eval task images (docs/audit.md).

Registered by `distill.cli.build_parser` through `add_audit_parser`; errors are ValueErrors, which `distill.cli.main`
turns into one line and exit code 2. The job (`AuditJob`) is validated before torch is imported.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from distill.config.audit_job import AuditJob
from distill.config.eval_job import DEVICES
from distill.config.flags import add_flag, job_fields


def cmd_audit(args: argparse.Namespace) -> int:
    """`distill audit`: exact and near duplicates in a corpus and copies of eval task images (docs/audit.md)."""
    job = AuditJob(**job_fields(AuditJob, args, tasks=args.task))  # before torch
    if not Path(job.features).is_file():
        raise FileNotFoundError(f"feature cache {job.features} not found; build it with `distill cache`")
    from distill import audit_out as out  # noqa: PLC0415 (lazy: the cache reader imports torch)
    from distill.audit import run_audit  # noqa: PLC0415 (lazy: the cache reader imports torch)

    audit, corpus, splits = run_audit(job)
    for line in out.console_lines(audit):
        print(line, flush=True)
    folder = Path(job.out)
    report = out.write_json(audit, folder)
    written = [report, *out.write_csvs(audit, corpus, folder)]
    registered = out.register(audit, report)  # where distill eval looks it up for a student of this corpus
    if registered is not None:
        written.append(registered)
    sheet = out.write_sheet(audit, corpus, splits, folder, job.sheet_pairs)
    print(f"wrote {', '.join(map(str, written + ([sheet] if sheet else [])))}")
    if job.write_clean:
        path, kept = out.write_clean(audit, corpus, Path(job.write_clean))
        print(f"wrote the clean corpus ({kept} of {len(corpus)} rows) to {path}")
    return 0


def add_audit_parser(sub) -> argparse.ArgumentParser:
    """`distill audit`'s flags, made from `AuditJob`'s fields."""
    a = sub.add_parser(
        "audit",
        help="exact and near duplicates in a corpus, and corpus rows that copy eval task images",
        description="Hash every corpus image (exact copies), then compare a cached teacher's image embeddings "
        "block by block (near copies inside the corpus) and with the eval tasks' images embedded by the same "
        "teacher (leaks). Writes audit.json, pairs.csv, drop.csv and pairs.png (docs/audit.md).",
    )
    add_flag(a, AuditJob, "features", metavar="FEATURES.h5")
    add_flag(a, AuditJob, "data", metavar="CORPUS")
    add_flag(a, AuditJob, "tasks", "--task", dest="task", action="append", metavar="TASK")
    add_flag(a, AuditJob, "teacher", metavar="NAME")
    add_flag(a, AuditJob, "threshold", metavar="COS")
    add_flag(a, AuditJob, "top_k", metavar="K")
    add_flag(a, AuditJob, "out", metavar="DIR")
    add_flag(a, AuditJob, "write_clean", metavar="CORPUS.csv")
    add_flag(a, AuditJob, "device", choices=DEVICES, help=None)
    add_flag(a, AuditJob, "batch_size", metavar="N")
    add_flag(a, AuditJob, "max_samples", metavar="N")
    add_flag(a, AuditJob, "block_rows", metavar="N")
    add_flag(a, AuditJob, "sheet_pairs", metavar="N")
    a.set_defaults(func=cmd_audit)
    return a
