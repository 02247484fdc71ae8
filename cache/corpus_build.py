"""Build a training corpus (CSV + images) from labelled data: `distill corpus`.

    sources = [CorpusSource("ham10000/train.csv", ("dermoscopy of a {diagnosis} on the {localization}",),
                            domain="dermoscopy", fraction=0.8),
               CorpusSource("medmnist/pneumoniamnist.npz", ("a chest x-ray showing {label}",), split="train",
                            class_names=("no pneumonia", "pneumonia"), domain="chest x-ray")]
    result = build_corpus(sources, "corpus-out", seed=0)   # corpus-out/corpus.csv, corpus-out/images/...

`OUT_DIR/corpus.csv` has the columns image, caption, key, domain, label, source, then the union of the sources'
metadata columns (blank where a source lacks one; a source column whose name is taken is kept as `orig_NAME`).
`label` holds what `{label}` renders: the class name when class names are known, else the raw label. npz images
are written as PNGs under `OUT_DIR/images/SOURCE/` (grey stays 'L', RGB stays RGB); CSV and folder images are
referenced relative to OUT_DIR, or copied under `OUT_DIR/images/SOURCE/` with `copy_images`. Keys are
`SOURCE/SPLIT/INDEX` (npz) or `SOURCE/PATH AS WRITTEN` (CSV, folder), so they do not depend on where files live.

Determinism: everything random is drawn from `seed` and nothing else (not the source's name or position):
- each row's template is drawn once over all rows of its source, so a row keeps its caption whatever part is kept;
- `part=(a, b)` keeps, within each label, the rows ranked [round(a*n), round(b*n)) in a seeded random order
  (a cut above 0 keeps at least one row, so a fraction > 0 keeps every present class). Parts of the same source
  with the same seed are disjoint and cover it: (0, 0.8) for the student and (0.8, 1) held out for evaluation.
  `fraction=f` is `part=(0, f)`;
- the rows of all sources are shuffled together once (the training block sampler wants shuffled rows);
  `shuffle=False` keeps source order.
"""

from __future__ import annotations

import csv
import os
import shutil
import string
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import yaml
from PIL import Image
from pydantic import BeforeValidator, Field, ValidationError
from tqdm import tqdm

from cache.sources.labelled import (
    SOURCE_FIELDS,
    CorpusBuildError,
    CorpusSource,
    SourceTable,
    check_unique_names,
    read_source,
)
from teachers.kernel.bounded_yaml import load_yaml
from teachers.kernel.config_model import Bool, ConfigError, Float, Int, Section, Str, config_error

__all__ = [
    "CorpusSource",
    "CorpusBuildResult",
    "CorpusBuildError",
    "build_corpus",
    "part_indices",
    "template_fields",
    "load_recipe",
    "CORPUS_COLUMNS",
    "RecipeSource",
    "CorpusJob",
]


class CorpusBuildConfigError(CorpusBuildError, ConfigError):
    """A recipe entry or `distill corpus` flag of the wrong key or type (a CorpusBuildError, as callers catch)."""


CORPUS_COLUMNS = ("image", "caption", "key", "domain", "label", "source")
# independent random streams, all from the one seed
_TEMPLATE_STREAM, _PART_STREAM, _SHUFFLE_STREAM, _MAX_ROWS_STREAM = 1, 2, 3, 4


@dataclass(frozen=True)
class CorpusBuildResult:
    """What `build_corpus` wrote."""

    csv: Path  # OUT_DIR/corpus.csv
    rows: int
    rows_per_source: dict[str, int]
    rows_per_domain: dict[str, int]
    classes_per_source: dict[str, tuple[str, ...]]  # labels present (class names where known); () unlabelled

    def summary(self) -> str:
        lines = [f"wrote {self.rows} rows to {self.csv}"]
        for name, n in self.rows_per_source.items():
            k = len(self.classes_per_source.get(name, ()))
            lines.append(f"  source {name:24s} {n:7d} rows" + (f", {k} classes" if k else ""))
        for dom, n in self.rows_per_domain.items():
            lines.append(f"  domain {dom:24s} {n:7d} rows")
        return "\n".join(lines)


# -- templates -----------------------------------------------------------------------------------------
def template_fields(template: str) -> list[str]:
    """Column names a template uses, in order: "a {diagnosis} on the {localization}" -> [diagnosis, localization]."""
    out = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise CorpusBuildError(f"template {template!r}: {e} (write a literal brace as {{{{ or }}}})") from None
    for _, field, _, _ in parsed:
        if field is None:
            continue
        name = field.split(".")[0].split("[")[0]
        if not name or name.isdigit():
            raise CorpusBuildError(f"template {template!r}: every {{}} must name a column, e.g. {{diagnosis}}")
        if name not in out:
            out.append(name)
    return out


def _label_display(raw: str, class_names: tuple[str, ...] | None) -> str:
    if class_names is None or not raw:
        return raw
    return " and ".join(class_names[int(t)] for t in raw.split("|"))


def _check_templates(table: SourceTable, name: str) -> list[list[str]]:
    available = list(table.columns) + (["label"] if table.labels is not None and "label" not in table.columns else [])
    used = []
    for t in table.source.templates:
        cols = template_fields(t)
        for c in cols:
            if c not in available:
                hint = "" if c != "label" else "; this source has no label (set label_column to the CSV's label column)"
                raise CorpusBuildError(
                    f"source {name}: template {t!r} uses column {c!r}, which {table.origin} "
                    f"does not have (available: {', '.join(available) or 'none'}){hint}"
                )
        used.append(cols)
    return used


def _values(table: SourceTable, i: int) -> dict[str, str]:
    v = dict(table.rows[i])
    if table.labels is not None:
        v["label"] = _label_display(table.labels[i], table.source.class_names)
    return v


def _render(template: str, values: dict[str, str], where: str) -> str:
    try:
        return template.format(**values)
    except (ValueError, AttributeError, IndexError, KeyError, TypeError) as e:
        raise CorpusBuildError(
            f"{where}: template {template!r} cannot be filled ({type(e).__name__}: {e}); "
            "name plain columns, e.g. {diagnosis}"
        ) from None


def _check_values(table: SourceTable, used: list[list[str]], values: list[dict[str, str]]) -> None:
    templates = table.source.templates
    for i, v in enumerate(values):
        for t, cols in zip(templates, used):
            for c in cols:
                if not str(v.get(c, "")).strip():
                    others = [u for u, ucols in zip(templates, used) if c not in ucols]
                    alt = (
                        f"keep only templates without {{{c}}} ({', '.join(map(repr, others))})"
                        if others
                        else f"use a template without {{{c}}}"
                    )
                    raise CorpusBuildError(
                        f"{table.where[i]}: column {c!r} is empty, and template {t!r} uses it; fill the value, or {alt}"
                    )


# -- parts ---------------------------------------------------------------------------------------------
def _cut(t: float, n: int) -> int:
    """Rows of a class of n before cut point t; monotone in t, >= 1 for any t > 0 (every class kept)."""
    if t <= 0.0 or n == 0:
        return 0
    return min(n, max(1, int(np.floor(t * n + 0.5))))


def part_indices(labels: Sequence[str] | None, n: int, part: tuple[float, float], seed: int) -> np.ndarray:
    """Sorted indices of the rows in `part` = (a, b) of n rows, stratified by label (None: one stratum).

    Within each label the rows are ranked by one seeded permutation that depends only on n and seed; the part
    keeps ranks [cut(a), cut(b)), cut(t) = round(t * n_label) but at least 1 for t > 0. So parts with the same
    seed are disjoint and cover all rows, and a part starting at 0 holds every present label."""
    a, b = part
    order = np.random.default_rng([seed, _PART_STREAM]).permutation(n)
    strata: dict[str, list[int]] = {}
    for i in order:  # each stratum in permutation order
        strata.setdefault("" if labels is None else labels[i], []).append(int(i))
    keep = []
    for rows in strata.values():
        keep += rows[_cut(a, len(rows)) : _cut(b, len(rows))]
    return np.sort(np.asarray(keep, dtype=np.int64))


# -- build ---------------------------------------------------------------------------------------------
def _domain(table: SourceTable, i: int, name: str) -> str:
    src = table.source
    if src.domain_column is None:
        return src.domain if src.domain is not None else name
    value = (table.rows[i].get(src.domain_column) or "").strip()
    if not value:
        raise CorpusBuildError(
            f"{table.where[i]}: domain column {src.domain_column!r} is empty; fill it or give a constant domain"
        )
    return value


def _safe_rel(rel: str) -> bool:
    p = Path(rel)
    return not p.is_absolute() and ".." not in p.parts and rel.strip() != ""


def build_corpus(
    sources: Sequence[CorpusSource],
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    shuffle: bool = True,
    copy_images: bool = False,
) -> CorpusBuildResult:
    """Read every source, caption its rows from templates, keep each source's part, shuffle all rows together
    (unless shuffle=False) and write OUT_DIR/corpus.csv (see the module docstring for columns and layout)."""
    if not sources:
        raise CorpusBuildError("no sources: give at least one CorpusSource")
    check_unique_names(sources)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    out_abs = out.resolve()
    records: list[dict] = []  # one per output row, in source order
    jobs: list[tuple] = []  # (record index, table, row) for image writing
    extras: list[str] = []
    classes: dict[str, tuple[str, ...]] = {}
    rows_per_source: dict[str, int] = {}
    for src in sources:
        name = src.source_name
        table = read_source(src)
        used = _check_templates(table, name)
        values = [_values(table, i) for i in range(len(table))]
        _check_values(table, used, values)
        picks = np.random.default_rng([seed, _TEMPLATE_STREAM]).integers(len(src.templates), size=len(table))
        kept = part_indices(table.labels, len(table), src.kept_part, seed)
        if src.max_rows is not None and len(kept) > src.max_rows:
            sub = np.random.default_rng([seed, _MAX_ROWS_STREAM]).choice(len(kept), src.max_rows, replace=False)
            kept = kept[np.sort(sub)]
        rename = {
            c: (f"orig_{c}" if c in CORPUS_COLUMNS else c)
            for c in table.columns
            if not (c == src.label_column == "label" and table.labels is not None)
            and not (c == src.domain_column == "domain")
        }
        extras += [c for c in rename.values() if c not in extras]
        for i in kept:
            i = int(i)
            rec = {
                "caption": _render(src.templates[picks[i]], values[i], table.where[i]),
                "key": f"{name}/{table.keys[i]}",
                "domain": _domain(table, i, name),
                "label": values[i].get("label", ""),
                "source": name,
            }
            rec.update({new: table.rows[i].get(old, "") for old, new in rename.items()})
            jobs.append((len(records), table, i))
            records.append(rec)
        rows_per_source[name] = len(kept)
        if table.labels is None:
            classes[name] = ()
        else:
            present = {t for i in kept for t in (table.labels[i].split("|") if src.class_names else [table.labels[i]])}
            present.discard("")
            ordered = sorted(present, key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s))
            classes[name] = tuple(_label_display(t, src.class_names) for t in ordered)
    if not records:
        raise CorpusBuildError("no rows kept: every source's part or fraction is empty")

    for rec_i, table, i in tqdm(jobs, desc="corpus images", unit="img", disable=None):
        records[rec_i]["image"] = _place_image(table, i, out_abs, copy_images)

    order = (
        np.random.default_rng([seed, _SHUFFLE_STREAM]).permutation(len(records)) if shuffle else np.arange(len(records))
    )
    columns = list(CORPUS_COLUMNS) + extras
    csv_path = out / "corpus.csv"
    _write_csv(csv_path, columns, (records[int(k)] for k in order))
    domains = Counter(r["domain"] for r in records)
    return CorpusBuildResult(
        csv=csv_path,
        rows=len(records),
        rows_per_source=rows_per_source,
        rows_per_domain=dict(sorted(domains.items())),
        classes_per_source=classes,
    )


def _place_image(table: SourceTable, i: int, out_abs: Path, copy_images: bool) -> str:
    name = table.source.source_name
    image = table.images[i]
    if isinstance(table.images, np.ndarray) or not isinstance(image, str):
        rel = Path("images") / name / f"{table.keys[i]}.png"  # keys[i] = SPLIT/INDEX
        dest = out_abs / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        arr = np.asarray(image)
        Image.fromarray(arr).save(dest)  # uint8 (H, W) -> 'L', (H, W, 3) -> 'RGB'
        return rel.as_posix()
    src_path = image
    if not os.path.isfile(src_path):
        raise CorpusBuildError(f"{table.where[i]}: image {src_path} not found (paths are relative to the CSV's folder)")
    if not copy_images:
        return Path(os.path.relpath(src_path, out_abs)).as_posix()
    key = table.keys[i]
    rel = (
        Path("images") / name / key
        if _safe_rel(key)
        else Path("images") / name / "_outside" / f"{i}_{Path(src_path).name}"
    )
    dest = out_abs / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src_path, dest)
    return rel.as_posix()


def _write_csv(path: Path, columns: list[str], records) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".corpus-", suffix=".csv", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=columns, restval="")
            w.writeheader()
            for rec in records:
                w.writerow(rec)
        os.replace(tmp, path)  # a reader never sees a half-written corpus
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# -- recipe --------------------------------------------------------------------------------------------
# the defaults, written once: CorpusSource's
_SOURCE_DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(CorpusSource)}


def _one_as_list(v: Any) -> Any:
    return [v] if isinstance(v, str) else v


def _names(v: Any) -> Any:
    return [c.strip() for c in v.split(",")] if isinstance(v, str) else v


class RecipeSource(Section):
    """One source of a recipe (a YAML mapping) or of `distill corpus --source`'s flags: CorpusSource's fields,
    typed and validated (unknown keys refused with a did-you-mean); `source()` gives the CorpusSource."""

    error = CorpusBuildConfigError
    path: Str = Field(description="a .npz (MedMNIST keys), a .csv/.tsv, or a folder of class folders")
    templates: Annotated[tuple[Str, ...], BeforeValidator(_one_as_list)] = Field(
        description="caption template naming columns, e.g. 'dermoscopy of a {diagnosis} on the {localization}' or "
        "'{caption}' (repeatable: each row draws one)"
    )
    name: Str | None = Field(
        _SOURCE_DEFAULTS["name"], description="source name: prefixes keys and the image folder (default: the file stem)"
    )
    domain: Str | None = Field(
        _SOURCE_DEFAULTS["domain"], description="constant value of the domain column (default: the source name)"
    )
    domain_column: Str | None = Field(
        _SOURCE_DEFAULTS["domain_column"], description="take the domain from this CSV column"
    )
    split: Str | None = Field(
        _SOURCE_DEFAULTS["split"],
        description="npz: train/val/test (default: all); CSV: a value of --split-column; folder: a subfolder",
    )
    split_column: Str = Field(_SOURCE_DEFAULTS["split_column"], description="CSV column holding the split")
    image_column: Str = Field(_SOURCE_DEFAULTS["image_column"], description="CSV column with image paths")
    label_column: Str | None = Field(
        _SOURCE_DEFAULTS["label_column"], description="CSV label column (default label; ignored when absent)"
    )
    class_names: Annotated[tuple[Str, ...] | None, BeforeValidator(_names)] = Field(
        _SOURCE_DEFAULTS["class_names"], description="names of the integer labels 0, 1, 2, ... for {label}"
    )
    fraction: Float = Field(_SOURCE_DEFAULTS["fraction"], description="keep this seeded, label-stratified fraction")
    part: tuple[Float, Float] | None = Field(
        _SOURCE_DEFAULTS["part"],
        description="keep part [A, B) of the seeded stratified order (disjoint from other parts with the same seed)",
    )
    max_rows: Int | None = Field(_SOURCE_DEFAULTS["max_rows"], description="then keep at most N rows")

    def source(self, relative_to: Path | None = None) -> CorpusSource:
        """The CorpusSource (its own checks run); a relative `path` is taken from the folder `relative_to`."""
        d = self.model_dump()
        p = Path(os.path.expanduser(d["path"]))
        d["path"] = str(p if p.is_absolute() or relative_to is None else relative_to / p)
        return CorpusSource(**d)


def load_recipe(path: str | os.PathLike) -> list[CorpusSource]:
    """Sources from a YAML list of CorpusSource fields; each `path` is relative to the recipe's folder."""
    path = Path(path)
    if not path.is_file():
        raise CorpusBuildError(f"recipe {path} not found")
    try:
        data = load_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise CorpusBuildError(f"recipe {path}: invalid YAML ({e})") from None
    if not isinstance(data, list) or not data:
        raise CorpusBuildError(
            f"recipe {path}: expected a YAML list of sources, each a mapping such as "
            "{path: train.csv, templates: ['a {diagnosis}'], domain: dermoscopy}"
        )
    out = []
    for n, entry in enumerate(data, start=1):
        where = f"recipe {path} source {n}"
        if not isinstance(entry, dict):
            raise CorpusBuildError(f"{where}: expected a mapping of fields ({', '.join(SOURCE_FIELDS)}), got {entry!r}")
        try:
            out.append(RecipeSource.model_validate(entry).source(relative_to=path.parent))
        except ValidationError as e:
            msg = str(config_error(e, RecipeSource)).replace("config is missing required", "missing required")
            raise CorpusBuildConfigError(f"{where}: {msg}") from None
    return out


class CorpusJob(Section):
    """What `distill corpus` writes besides its sources: `build_corpus`'s options (the flags' defaults)."""

    error = CorpusBuildConfigError
    out: Str = Field("corpus-out", description="output folder (default corpus-out): corpus.csv, images/")
    seed: Int = Field(0, description="templates, fractions and the shuffle")
    shuffle: Bool = Field(True, description="one seeded shuffle of all rows; --no-shuffle keeps source order")
    copy_images: Bool = Field(False, description="copy CSV/folder images under OUT/images/")

    def build(self, sources: Sequence[CorpusSource]) -> CorpusBuildResult:
        return build_corpus(sources, self.out, seed=self.seed, shuffle=self.shuffle, copy_images=self.copy_images)
