"""`distill corpus`: build a training corpus (corpus.csv + images) from labelled data (cache.corpus_build).

Registered by `distill.cli.build_parser` through `add_corpus_parser`; errors are ValueErrors, which `distill.cli.main`
turns into one line and exit code 2 (the traceback with `distill -v`).
"""
from __future__ import annotations

import argparse

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
        raise argparse.ArgumentTypeError(f"expected A:B with 0 <= A <= B <= 1, got {value!r} "
                                         "(for example 0.8:1 for the last 20%)") from None


def add_corpus_parser(sub) -> argparse.ArgumentParser:
    c = sub.add_parser("corpus", help="build a training corpus (CSV + images) from labelled data",
                       description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = c.add_mutually_exclusive_group(required=True)
    src.add_argument("--source", metavar="PATH", help="a .npz (MedMNIST keys), a .csv/.tsv, or a folder of class "
                     "folders")
    src.add_argument("--recipe", metavar="YAML", help="several sources: a YAML list of source fields")
    c.add_argument("--template", action="append", metavar="T", help="caption template naming columns, e.g. "
                   "'dermoscopy of a {diagnosis} on the {localization}' or '{caption}' (repeatable: each row draws "
                   "one)")
    c.add_argument("--name", help="source name: prefixes keys and the image folder (default: the file stem)")
    dom = c.add_mutually_exclusive_group()
    dom.add_argument("--domain", help="constant value of the domain column (default: the source name)")
    dom.add_argument("--domain-column", metavar="C", help="take the domain from this CSV column")
    c.add_argument("--split", help="npz: train/val/test (default: all); CSV: a value of --split-column; "
                   "folder: a subfolder")
    c.add_argument("--split-column", default="split", metavar="C")
    c.add_argument("--image-column", default="image", metavar="C")
    c.add_argument("--label-column", default="label", metavar="C",
                   help="CSV label column (default label; ignored when absent)")
    c.add_argument("--class-names", metavar="A,B,C", help="names of the integer labels 0, 1, 2, ... for {label}")
    c.add_argument("--fraction", type=float, default=1.0, help="keep this seeded, label-stratified fraction")
    c.add_argument("--part", type=_part, metavar="A:B", help="keep part [A, B) of the seeded stratified order "
                   "(disjoint from other parts with the same seed)")
    c.add_argument("--max-rows", type=int, metavar="N", help="then keep at most N rows")
    c.add_argument("--out", default="corpus-out", help="output folder (default corpus-out): corpus.csv, images/")
    c.add_argument("--seed", type=int, default=0, help="templates, fractions and the shuffle")
    c.add_argument("--no-shuffle", action="store_true", help="keep source order instead of one seeded shuffle")
    c.add_argument("--copy-images", action="store_true", help="copy CSV/folder images under OUT/images/")
    c.set_defaults(func=cmd_corpus)
    return c


_SINGLE_ONLY = ("template", "name", "domain", "domain_column", "split", "class_names", "part", "max_rows")


def cmd_corpus(args: argparse.Namespace) -> int:
    from cache.corpus_build import CorpusSource, build_corpus, load_recipe

    if args.recipe:
        given = [f"--{k.replace('_', '-')}" for k in _SINGLE_ONLY if getattr(args, k) is not None]
        if args.fraction != 1.0:
            given.append("--fraction")
        if given:
            raise ValueError(f"{', '.join(given)} describe a single --source; with --recipe, put them in the "
                             "recipe's entries")
        sources = load_recipe(args.recipe)
    else:
        if not args.template:
            raise ValueError("--source needs at least one --template, e.g. --template 'a photo of a {label}'")
        sources = [CorpusSource(
            path=args.source, templates=tuple(args.template), name=args.name, domain=args.domain,
            domain_column=args.domain_column, split=args.split, split_column=args.split_column,
            image_column=args.image_column, label_column=args.label_column,
            class_names=tuple(n.strip() for n in args.class_names.split(",")) if args.class_names else None,
            fraction=args.fraction, part=args.part, max_rows=args.max_rows)]
    result = build_corpus(sources, args.out, seed=args.seed, shuffle=not args.no_shuffle,
                          copy_images=args.copy_images)
    print(result.summary())
    return 0
