"""`distill corpus`: build a training corpus (corpus.csv + images) from labelled data (cache.corpus_build).

Registered by `distill.cli.build_parser` through `add_corpus_parser`; errors are ValueErrors, which `distill.cli.main`
turns into one line and exit code 2 (the traceback with `distill -v`).
"""

from __future__ import annotations

import argparse

from cache.corpus_build import CorpusJob, RecipeSource, load_recipe
from distill.config.flags import add_flag, job_fields
from teachers.kernel.config_model import field_default

DESCRIPTION = """Write OUT/corpus.csv (image, caption, key, domain, label, source, then the sources' metadata columns)
from labelled data: a MedMNIST-style .npz, a CSV/TSV of labels and metadata, or a folder with one subfolder per
class. Captions come from templates naming columns ("dermoscopy of a {diagnosis} on the {localization}"; {label}
gives the class name with --class-names); each row draws one template with the seed. npz images are written as
PNGs under OUT/images/; CSV and folder images are referenced relative to OUT (or copied with --copy-images).
Rows of all sources are shuffled once with the seed (--no-shuffle keeps source order); the same command gives the
same file."""

EPILOG = """Several sources: --recipe recipe.yaml, a YAML list of source fields (paths relative to the YAML):
  - {path: ham10000/train.csv, templates: ["dermoscopy of a {diagnosis} on the {localization}"],
     domain: dermoscopy, part: [0.0, 0.8]}
  - {path: medmnist/pneumoniamnist.npz, split: train, class_names: [no pneumonia, pneumonia],
     templates: ["a chest x-ray showing {label}"], domain: chest x-ray}
Fields: path, templates, name, domain, domain_column, split, split_column, image_column, label_column,
class_names, fraction, part, max_rows. part [a, b] keeps ranks [a, b) of a seeded label-stratified order, so
parts of one source with one seed are disjoint: [0, 0.8] to train, [0.8, 1] held out."""


def _part(value: str) -> tuple[float, float]:
    a, sep, b = value.replace(",", ":").partition(":")
    try:
        if not sep:
            raise ValueError
        return float(a), float(b)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected A:B with 0 <= A <= B <= 1, got {value!r} (for example 0.8:1 for the last 20%)"
        ) from None


def add_corpus_parser(sub) -> argparse.ArgumentParser:
    """`distill corpus`'s flags, made from `RecipeSource` (one source) and `CorpusJob` (the rest)."""
    c = sub.add_parser(
        "corpus",
        help="build a training corpus (CSV + images) from labelled data",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = c.add_mutually_exclusive_group(required=True)
    add_flag(src, RecipeSource, "path", "--source", dest="source", metavar="PATH", required=False)
    src.add_argument("--recipe", metavar="YAML", help="several sources: a YAML list of source fields")
    add_flag(c, RecipeSource, "templates", "--template", dest="template", action="append", metavar="T", required=False)
    add_flag(c, RecipeSource, "name")
    dom = c.add_mutually_exclusive_group()
    add_flag(dom, RecipeSource, "domain")
    add_flag(dom, RecipeSource, "domain_column", metavar="C")
    add_flag(c, RecipeSource, "split")
    for name in ("split_column", "image_column", "label_column"):
        add_flag(c, RecipeSource, name, metavar="C")
    add_flag(c, RecipeSource, "class_names", metavar="A,B,C")
    add_flag(c, RecipeSource, "fraction")
    add_flag(c, RecipeSource, "part", type=_part, metavar="A:B")
    add_flag(c, RecipeSource, "max_rows", metavar="N")
    for name in ("out", "seed", "shuffle", "copy_images"):
        add_flag(c, CorpusJob, name)
    c.set_defaults(func=cmd_corpus)
    return c


_SINGLE_ONLY = ("template", "name", "domain", "domain_column", "split", "class_names", "part", "max_rows")


def cmd_corpus(args: argparse.Namespace) -> int:
    job = CorpusJob(**job_fields(CorpusJob, args))
    if args.recipe:
        given = [f"--{k.replace('_', '-')}" for k in _SINGLE_ONLY if getattr(args, k) is not None]
        if args.fraction != field_default(RecipeSource, "fraction"):
            given.append("--fraction")
        if given:
            raise ValueError(
                f"{', '.join(given)} describe a single --source; with --recipe, put them in the recipe's entries"
            )
        sources = load_recipe(args.recipe)
    else:
        if not args.template:
            raise ValueError("--source needs at least one --template, e.g. --template 'a photo of a {label}'")
        sources = [RecipeSource(**job_fields(RecipeSource, args, path=args.source, templates=args.template)).source()]
    print(job.build(sources).summary())
    return 0
