"""What `multi_teacher.py` runs on: domains (training data + own test tasks), budgets and student variants.

Why a module of data: the harness is run by others on their own data and test sets, so every domain, task and
variant is a value that a flag or a YAML file can replace; nothing below names a particular file except the
built-in defaults, which are resolved against `--data-root`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from teachers.kernel.bounded_yaml import load_yaml


class SetupError(ValueError):
    """A domain, task or variant file that cannot be used; the message says which and why."""


# -- domains ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Domain:
    """One domain: the data its teacher trains on (all of it) and the tasks that test it.

    `source` holds `cache.corpus_build.CorpusSource` fields (path relative to the data root). `holdout` > 0 keeps
    that fraction of the source out of every training corpus as the domain's test set, for data without a test
    split; tasks then name `{holdout}` as their dataset path. The first task is the domain's own task: the
    teacher of this domain must not beat the student on it.
    """

    name: str
    source: dict[str, Any]
    tasks: tuple[dict[str, Any], ...]
    holdout: float = 0.0

    def __post_init__(self):
        if not self.tasks:
            raise SetupError(f"domain {self.name!r} has no tasks; give it at least its own test task")
        if not 0.0 <= self.holdout < 1.0:
            raise SetupError(f"domain {self.name!r}: holdout must be in [0, 1), got {self.holdout}")


HAM_CLASSES = (
    "actinic keratosis",
    "basal cell carcinoma",
    "benign keratosis-like lesion",
    "dermatofibroma",
    "melanoma",
    "melanocytic nevus",
    "vascular lesion",
)

BUILTIN_DOMAINS: dict[str, Domain] = {
    d.name: d
    for d in (
        Domain(
            name="radiology",
            source={"path": "medpix2/train.csv", "templates": ["{caption}"], "label_column": None},
            tasks=(
                {
                    "name": "radiology-retrieval",
                    "kind": "retrieval",
                    "dataset": {"path": "medpix2/dev.csv", "caption_column": "caption"},
                },
                {
                    "name": "radiology-region-zeroshot",
                    "kind": "zeroshot",
                    "dataset": {"path": "medpix2/dev.csv", "label_column": "location_category"},
                    "classes": ["Head", "Spine and Muscles", "Thorax", "Abdomen", "Reproductive and Urinary System"],
                    "templates": ["ct or mri of the {}", "radiology image of the {}", "an mri or ct scan of the {}"],
                },
            ),
        ),
        Domain(
            name="dermoscopy",
            source={
                "path": "ham10000/train.csv",
                "label_column": "label",
                "class_names": list(HAM_CLASSES),
                "templates": [
                    "dermoscopy of a {diagnosis} on the {localization}",
                    "dermoscopic image of a {diagnosis}, {localization}, {sex} patient",
                    "a {diagnosis} seen on dermoscopy",
                    "skin lesion: {diagnosis} on the {localization}",
                ],
            },
            holdout=0.2,
            tasks=(
                {
                    "name": "dermoscopy-zeroshot",
                    "kind": "zeroshot",
                    "dataset": {"path": "{holdout}", "label_column": "label"},
                    "classes": list(HAM_CLASSES),
                    "templates": ["dermoscopy of a {}", "a {} seen on dermoscopy", "dermoscopic image of a {}"],
                },
            ),
        ),
        Domain(
            name="chest_xray",
            source={
                "path": "medmnist/pneumoniamnist.npz",
                "split": "train",
                "class_names": ["normal", "pneumonia"],
                "templates": [
                    "a chest x-ray showing {label}",
                    "paediatric chest radiograph: {label}",
                    "chest x-ray, {label}",
                ],
            },
            tasks=(
                {
                    "name": "chest_xray-zeroshot",
                    "kind": "zeroshot",
                    "dataset": {"path": "medmnist/pneumoniamnist.npz"},
                    "classes": ["normal", "pneumonia"],
                    "templates": ["a chest x-ray showing {}", "chest x-ray, {}"],
                },
            ),
        ),
        Domain(
            name="breast_us",
            source={
                "path": "medmnist/breastmnist.npz",
                "split": "train",
                "class_names": ["malignant", "benign"],
                "templates": [
                    "breast ultrasound of a {label} lesion",
                    "ultrasound image, breast, {label}",
                    "a {label} breast mass on ultrasound",
                ],
            },
            tasks=(
                {
                    "name": "breast_us-zeroshot",
                    "kind": "zeroshot",
                    "dataset": {"path": "medmnist/breastmnist.npz"},
                    "classes": ["malignant", "benign"],
                    "templates": ["breast ultrasound of a {} lesion", "a {} breast mass on ultrasound"],
                },
            ),
        ),
    )
}


def load_domain_file(path: str | Path) -> Domain:
    """A domain from YAML: {name, source: {...CorpusSource fields}, tasks: [...task dicts], holdout}.

    Relative paths in it resolve against the YAML's folder (made absolute here).
    """
    p = Path(path)
    try:
        d = load_yaml(p.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise SetupError(f"--domain-file {p}: cannot read it ({e})") from None
    allowed = {f.name for f in fields(Domain)}
    if not isinstance(d, dict) or not {"name", "source", "tasks"} <= set(d) or set(d) - allowed:
        raise SetupError(
            f"--domain-file {p}: needs keys name, source, tasks (optional holdout); got "
            f"{sorted(d) if isinstance(d, dict) else type(d).__name__}"
        )
    root = p.resolve().parent
    src = dict(d["source"])
    src["path"] = str((root / src["path"]).resolve())
    tasks = []
    for t in d["tasks"]:
        t = json.loads(json.dumps(t))
        if t.get("dataset", {}).get("path") not in (None, "{holdout}"):
            t["dataset"]["path"] = str((root / t["dataset"]["path"]).resolve())
        tasks.append(t)
    return Domain(name=str(d["name"]), source=src, tasks=tuple(tasks), holdout=float(d.get("holdout", 0.0)))


def resolve_domain(domain: Domain, data_root: Path) -> Domain:
    """Paths of the built-in domains made absolute under the data root; a missing file is a clear error."""
    src = dict(domain.source)
    src["path"] = str((data_root / src["path"]).resolve())
    if not Path(src["path"]).exists():
        raise SetupError(
            f"domain {domain.name!r}: training data {src['path']} does not exist; pass --data-root "
            f"(the folder holding {domain.source['path']}) or give the domain with --domain-file"
        )
    tasks = []
    for t in domain.tasks:
        t = json.loads(json.dumps(t))
        path = t["dataset"]["path"]
        if path != "{holdout}":
            t["dataset"]["path"] = str((data_root / path).resolve())
            if not Path(t["dataset"]["path"]).exists():
                raise SetupError(
                    f"domain {domain.name!r}, task {t['name']!r}: {t['dataset']['path']} does not "
                    f"exist (pass --data-root, or --domain-file with your own test set)"
                )
        tasks.append(t)
    return replace(domain, source=src, tasks=tuple(tasks))


# -- budgets ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Budget:
    """Sizes for one budget; a flag set to a non-zero value replaces the budget's number."""

    image_size: int
    batch_size: int
    teacher_steps: int
    student_steps: int
    teacher_width: int  # teachers: the tiny preset widened to this (vision, text and embedding width)
    teacher_layers: int
    student_width: int
    student_layers: int
    max_rows_per_domain: int  # 0: all rows of each domain's training data
    eval_max_samples: int  # 0: whole test sets
    bootstrap: int
    vocab_size: int
    lr: float = 2e-3
    teacher_lr: float = 1e-3  # 2e-3 left a teacher of a 546-row, 6-caption domain at ln(batch): collapsed
    warmup: int = 50


BUDGETS = {
    # CI and quick checks: every stage runs, on a few hundred rows per domain, in under 5 minutes on 2 cores
    "smoke": Budget(
        image_size=32,
        batch_size=32,
        teacher_steps=40,
        student_steps=40,
        teacher_width=64,
        teacher_layers=2,
        student_width=64,
        student_layers=2,
        max_rows_per_domain=240,
        eval_max_samples=120,
        bootstrap=200,
        vocab_size=1000,
        warmup=5,
    ),
    # the investigation: whole domains, 64 px, under 45 minutes on 2 cores for the default variant
    "cpu": Budget(
        image_size=64,
        batch_size=64,
        teacher_steps=800,
        student_steps=800,
        teacher_width=96,
        teacher_layers=3,
        student_width=96,
        student_layers=3,
        max_rows_per_domain=0,
        eval_max_samples=0,
        bootstrap=1000,
        vocab_size=3000,
        warmup=50,
    ),
    # a lent GPU: larger images, models and step counts
    "gpu": Budget(
        image_size=128,
        batch_size=256,
        teacher_steps=4000,
        student_steps=6000,
        teacher_width=384,
        teacher_layers=6,
        student_width=256,
        student_layers=6,
        max_rows_per_domain=0,
        eval_max_samples=0,
        bootstrap=1000,
        vocab_size=8000,
        lr=1e-3,
        teacher_lr=5e-4,
        warmup=300,
    ),
}


def tiny_overrides(width: int, layers: int) -> dict[str, Any]:
    """`student.overrides` for the tiny preset widened to `width` and deepened to `layers` in both towers."""
    heads = max(1, width // 32)
    return {
        "embed_dim": width,
        "vision_cfg": {"width": width, "layers": layers, "head_width": width // heads, "patch_size": 8},
        "text_config": {
            "hidden_size": width,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "intermediate_size": 4 * width,
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
            "initializer_range": 0.1,
        },
    }


# -- student variants -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    """A distilled student: config overrides on top of the hybrid base (`ROUTING` is filled in by the harness)."""

    name: str
    overrides: tuple[str, ...]
    note: str = ""


ROUTING = "{routing}"  # placeholder: the harness's domain -> teacher map as a `loss.routing=` value
# placeholder: `loss.routing.weights=` with w_d = sqrt(n_max / n_d) from the student corpus's domain sizes, so a
# domain with 1/9 of the largest domain's rows gets 3x the distillation weight; computed per run, never per data set
DOMAIN_WEIGHTS = "{domain_weights}"


def _terms(*terms: dict) -> str:
    return "loss.terms=" + json.dumps(list(terms))


INFONCE = {"kind": "infonce", "weight": 1.0}
FEAT_COS = {"kind": "feature", "weight": 1.0, "kwargs": {"metric": "cosine"}}
AFFINITY = {"kind": "affinity", "weight": 1.0}
AFF3 = {**AFFINITY, "weight": 3.0}
AFF3_LOCAL = {**AFF3, "kwargs": {"scope": "domain"}}  # issue 17: a row's distributions over its own domain's rows
# relational: image-image and text-text distributions over the other rows (affinity's pairs: intra), beside AFF3
# issue 20: variants that must not read the domain column name one no corpus has, so nothing in the run can use it
HIDE_DOMAINS = "data.domain_column=__no_domain_column__"
# label-free routing (loss.routing.auto): K clusters of the teachers' joint embeddings, seeded by each run's train.seed
AUTO_ROUTING = "loss.routing=" + json.dumps({"auto": {"clusters": 8, "margin": 0.05}})
AUTO_ROUTING_16 = "loss.routing=" + json.dumps({"auto": {"clusters": 16, "margin": 0.02}})
INTRA = {"name": "affinity_intra", "kind": "affinity", "weight": 1.0, "kwargs": {"pairs": "intra"}}

VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant(
            "all-hybrid",
            (_terms(INFONCE, FEAT_COS, {"kind": "icl", "weight": 1.0}),),
            "shipped tiny-hybrid terms (InfoNCE + cosine feature + ICL), every teacher on every sample",
        ),
        Variant("all-feature", (_terms(INFONCE, FEAT_COS),), "InfoNCE + cosine feature, every teacher on every sample"),
        Variant(
            "routed-feature",
            (_terms(INFONCE, FEAT_COS), ROUTING),
            "InfoNCE + cosine feature, each sample from its domain's teacher only",
        ),
        Variant(
            "confidence-feature",
            (_terms(INFONCE, FEAT_COS), "loss.combine.mode=confidence"),
            "InfoNCE + cosine feature, teachers weighted per sample by their own in-batch confidence (no labels)",
        ),
        Variant(
            "routed-feature-icl",
            (_terms(INFONCE, FEAT_COS, {"kind": "icl", "weight": 1.0}), ROUTING),
            "routed InfoNCE + cosine feature + ICL",
        ),
        Variant(
            "routed-mse",
            (_terms(INFONCE, {"kind": "feature", "weight": 50.0, "kwargs": {"metric": "mse"}}), ROUTING),
            "routed InfoNCE + 50 x MSE feature (MMKD-CLIP's feature term)",
        ),
        Variant(
            "routed-smooth-l1",
            (
                _terms(INFONCE, {"kind": "feature", "weight": 50.0, "kwargs": {"metric": "smooth_l1", "beta": 0.05}}),
                ROUTING,
            ),
            "routed InfoNCE + 50 x smooth-L1 feature",
        ),
        Variant(
            "routed-affinity",
            (_terms(INFONCE, AFFINITY), ROUTING),
            "routed InfoNCE + affinity (similarity-distribution) distillation",
        ),
        Variant(
            "routed-affinity-feature",
            (_terms(INFONCE, AFFINITY, FEAT_COS), ROUTING),
            "routed InfoNCE + affinity + cosine feature",
        ),
        Variant(
            "routed-affinity-x3",
            (_terms(INFONCE, {**AFFINITY, "weight": 3.0}), ROUTING),
            "routed InfoNCE + 3 x affinity",
        ),
        Variant(
            "routed-affinity-x10",
            (_terms(INFONCE, {**AFFINITY, "weight": 10.0}), ROUTING),
            "routed InfoNCE + 10 x affinity",
        ),
        Variant("all-affinity", (_terms(INFONCE, AFFINITY),), "InfoNCE + affinity, every teacher on every sample"),
        Variant(
            "confidence-affinity",
            (_terms(INFONCE, AFFINITY), "loss.combine.mode=confidence"),
            "InfoNCE + affinity, teachers weighted per sample by their own in-batch confidence (no labels)",
        ),
        Variant(
            "confidence-affinity-sharp",
            (_terms(INFONCE, AFFINITY), "loss.combine.mode=confidence", "loss.combine.temperature=0.1"),
            "InfoNCE + affinity, confidence weights at temperature 0.1 (closer to routing, still no labels)",
        ),
        Variant(
            "routed-affinity-own-crops",
            (_terms(INFONCE, AFFINITY), ROUTING, "data.use_views=false"),
            "routed InfoNCE + affinity, the student's own crops against the mean of the stored views (no function "
            "matching); the same as routed-affinity on a cache without views",
        ),
        Variant(
            "routed-feature-x3",
            (_terms(INFONCE, {**FEAT_COS, "weight": 3.0}), ROUTING),
            "routed InfoNCE + 3 x cosine feature",
        ),
        Variant(
            "routed-phi-s",
            (
                _terms(INFONCE, {"kind": "feature", "weight": 1.0, "kwargs": {"metric": "mse"}}),
                ROUTING,
                "loss.combine.balance=phi_s",
            ),
            "routed InfoNCE + MSE feature on PHI-S standardised targets",
        ),
        Variant(
            "routed-affinity-x3-balance0",
            (_terms(INFONCE, AFF3), ROUTING, "data.domain_balance=0"),
            "routed InfoNCE + 3 x affinity, domains drawn uniformly (data.domain_balance=0)",
        ),
        Variant(
            "routed-affinity-x3-balance0.3",
            (_terms(INFONCE, AFF3), ROUTING, "data.domain_balance=0.3"),
            "routed InfoNCE + 3 x affinity, domain d drawn as n_d^0.3",
        ),
        Variant(
            "routed-affinity-x3-balance0.5",
            (_terms(INFONCE, AFF3), ROUTING, "data.domain_balance=0.5"),
            "routed InfoNCE + 3 x affinity, domain d drawn as n_d^0.5",
        ),
        Variant(
            "routed-affinity-x3-local",
            (_terms(INFONCE, AFF3_LOCAL), ROUTING),
            "routed InfoNCE + 3 x domain-local affinity (distributions over the batch's same-domain captions)",
        ),
        Variant(
            "routed-affinity-x3-weighted",
            (_terms(INFONCE, AFF3), ROUTING, DOMAIN_WEIGHTS),
            "routed InfoNCE + 3 x affinity, each domain's distillation weighted sqrt(n_max / n_d)",
        ),
        Variant(
            "routed-affinity-x3-local-balance0.5",
            (_terms(INFONCE, AFF3_LOCAL), ROUTING, "data.domain_balance=0.5"),
            "routed InfoNCE + 3 x domain-local affinity, domain d drawn as n_d^0.5",
        ),
        Variant(
            "routed-affinity-x3-local-balance0",
            (_terms(INFONCE, AFF3_LOCAL), ROUTING, "data.domain_balance=0"),
            "routed InfoNCE + 3 x domain-local affinity, domains drawn uniformly",
        ),
        Variant(
            "routed-affinity-x3-intra-balance0.3",
            (_terms(INFONCE, AFF3, INTRA), ROUTING, "data.domain_balance=0.3"),
            "routed InfoNCE + 3 x affinity + intra-modal affinity (image-image, text-text), domain d drawn as n_d^0.3",
        ),
        Variant(
            "routed-affinity-x3-intra3-balance0.3",
            (_terms(INFONCE, AFF3, {**INTRA, "weight": 3.0}), ROUTING, "data.domain_balance=0.3"),
            "routed InfoNCE + 3 x affinity + 3 x intra-modal affinity, domain d drawn as n_d^0.3",
        ),
        Variant(
            "all-affinity-x3",
            (_terms(INFONCE, AFF3), HIDE_DOMAINS),
            "InfoNCE + 3 x affinity, every teacher on every sample (no domain column)",
        ),
        Variant(
            "confidence-affinity-x3",
            (_terms(INFONCE, AFF3), "loss.combine.mode=confidence", HIDE_DOMAINS),
            "InfoNCE + 3 x affinity, teachers weighted per sample by their in-batch confidence (no domain column)",
        ),
        Variant(
            "auto-routed-affinity-x3",
            (_terms(INFONCE, AFF3), AUTO_ROUTING, HIDE_DOMAINS),
            "InfoNCE + 3 x affinity, each row routed to the teachers of its k-means cluster (8 clusters of the "
            "teachers' embeddings, teachers within 0.05 of the cluster's best skill; no domain column)",
        ),
        Variant(
            "auto-routed-k16-affinity-x3",
            (_terms(INFONCE, AFF3), AUTO_ROUTING_16, HIDE_DOMAINS),
            "InfoNCE + 3 x affinity, routed by 16 clusters, teachers within 0.02 of the best skill (no domain column)",
        ),
        Variant(
            "auto-routed-k16-confidence-affinity-x3",
            (_terms(INFONCE, AFF3), AUTO_ROUTING_16, "loss.combine.mode=confidence", HIDE_DOMAINS),
            "InfoNCE + 3 x affinity, routed by 16 clusters (margin 0.02), each row's routed teachers weighted by "
            "their in-batch confidence (no domain column)",
        ),
        Variant(
            "routed-affinity-x3-intra3-balance0.3-cappos",
            (
                _terms(
                    {**INFONCE, "kwargs": {"positives": "caption"}},
                    {**AFF3, "kwargs": {"positives": "caption"}},
                    {**INTRA, "weight": 3.0},
                ),
                ROUTING,
                "data.domain_balance=0.3",
            ),
            "the default recipe with identical captions as positives in InfoNCE and the image-text affinity (a "
            "templated caption's other rows are no longer negatives)",
        ),
        Variant(
            "mmkd",
            (
                _terms(
                    INFONCE,
                    {"kind": "feature", "weight": 50.0, "kwargs": {"metric": "mse"}},
                    {"kind": "icl", "weight": 1.0},
                ),
                "loss.combine.mode=random_teacher",
            ),
            "MMKD-CLIP: InfoNCE + 50 x MSE + ICL, one random teacher per sample",
        ),
    )
}

# the recipe the evidence supports: picked on the dev tasks over 3 seeds (benchmarks/results/multi_teacher.md)
DEFAULT_VARIANTS = ("routed-affinity-x3-intra3-balance0.3",)
ABLATION_VARIANTS = (
    "routed-affinity-x3-intra3-balance0.3",
    "routed-affinity-x3-intra-balance0.3",
    "routed-affinity-x3-balance0.3",
    "routed-affinity-x3-balance0.5",
    "routed-affinity-x3-balance0",
    "routed-affinity-x3-local",
    "routed-affinity-x3-weighted",
    "routed-affinity-x3-local-balance0",
    "routed-affinity-x3",
    "routed-affinity",
    "routed-affinity-x10",
    "routed-affinity-own-crops",
    "all-affinity",
    "confidence-affinity",
    "confidence-affinity-sharp",
    "routed-feature",
    "all-hybrid",
    "all-feature",
    "confidence-feature",
    "routed-feature-icl",
    "mmkd",
    "routed-mse",
    "routed-feature-x3",
)


def load_variant_file(path: str | Path) -> list[Variant]:
    """Variants from YAML: a mapping NAME -> list of `section.key=value` overrides (or {overrides, note})."""
    p = Path(path)
    try:
        d = load_yaml(p.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise SetupError(f"--variant-file {p}: cannot read it ({e})") from None
    if not isinstance(d, dict) or not d:
        raise SetupError(f"--variant-file {p}: expected a mapping NAME -> [section.key=value, ...]")
    out = []
    for name, v in d.items():
        if isinstance(v, dict):
            ov, note = v.get("overrides", []), str(v.get("note", ""))
        else:
            ov, note = v, ""
        if not isinstance(ov, list) or not all(isinstance(x, str) and "=" in x for x in ov):
            raise SetupError(f"--variant-file {p}: variant {name!r} must be a list of section.key=value strings")
        out.append(Variant(str(name), tuple(ov), note))
    return out


@dataclass(frozen=True)
class TeacherPlan:
    """A teacher: trained here on its domain, or a given SPEC; `domains` are the domains routed to it."""

    name: str
    spec: str | None  # None: trained by the harness on the domain of the same name
    domains: tuple[str, ...] = field(default_factory=tuple)


def plan_teachers(domains: list[str], given: dict[str, str]) -> list[TeacherPlan]:
    """One trained teacher per domain unless `--teacher DOMAIN=SPEC` gives it; other given names are general
    teachers, routed to every domain."""
    plans = [TeacherPlan(d, given.get(d), (d,)) for d in domains]
    plans += [TeacherPlan(n, s, tuple(domains)) for n, s in given.items() if n not in domains]
    return plans


def domain_weights_value(sizes: dict[str, int]) -> str:
    """The `loss.routing.weights=` override for DOMAIN_WEIGHTS: sqrt(n_max / n_d) per domain (the largest gets 1)."""
    top = max(sizes.values())
    return "loss.routing.weights=" + json.dumps({d: round((top / n) ** 0.5, 4) for d, n in sizes.items() if n})


def routing_value(teachers: list[TeacherPlan], domains: list[str]) -> str:
    """The `loss.routing=` override routing each domain to its own teacher and to every general teacher."""
    table = {d: [t.name for t in teachers if d in t.domains] for d in domains}
    return "loss.routing=" + json.dumps({"column": "domain", "teachers": table})
