"""The exported student's model card (`README.md`): architecture, teachers, corpus, training and eval results.

The card's facts come typed (`ModelCard`, filled by `student.export` from the run files' one schema in
`student.run_files`); a missing fact is left out of the card instead of failing an export. Paths in the card are
never absolute: the card travels with its folder, so teacher folders and the corpus are named, not located
(`student.shown_paths`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from student.shown_paths import shown_if_absolute, shown_spec


@dataclass(frozen=True)
class CardTeacher:
    name: str
    spec: str | None = None
    weight: float | None = None


@dataclass(frozen=True)
class ModelCard:
    """What the card says about the model beyond its architecture (read from its config)."""

    name: str = "biomed-distill student"  # the card's title
    source: str | None = None  # the preset or SPEC the student was built from
    teachers: tuple[CardTeacher, ...] = ()
    corpus: str | None = None  # the training corpus, as the run named it
    corpus_size: int | None = None
    steps: int | None = None
    samples_seen: int | None = None
    final_losses: dict[str, float] = field(default_factory=dict)
    eval: Mapping[str, Any] | None = None  # an eval report (`report.json` of `distill eval`)
    notes: str | None = None


def read_report(report: str | Path) -> dict[str, Any]:
    """The metrics of an eval report: `report.json`, or a report folder holding it."""
    path = Path(report)
    if path.is_dir():
        path = path / "report.json"
    if not path.is_file():
        raise FileNotFoundError(f"eval report {path} not found (give report.json or the folder holding it)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def _flatten(d: Mapping, prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in d.items():
        key = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(_flatten(v, key))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = float(v)
    return out


def _fmt(v: float | None) -> str:
    if v is None:
        return ""
    if math.isfinite(v) and v == int(v) and abs(v) < 1e12:
        return str(int(v))
    return f"{v:.4g}"


def metrics_table(report: Mapping[str, Any]) -> str:
    """A markdown table of a report's numeric metrics.

    `{model: {task: {metric: value}}}` gives one column per model and one row per `task/metric`;
    a flat `{metric: value}` gives a metric | value table. A `results` or `metrics` key is unwrapped first.
    Rows keep the report's order (R@1, R@5, R@10 as the evaluator wrote them), never a string sort.
    """
    data = report.get("results", report.get("metrics", report)) if isinstance(report, Mapping) else {}
    if not isinstance(data, Mapping) or not data:
        return "_No numeric metrics in the report._"
    if all(isinstance(v, Mapping) for v in data.values()):
        cols = {str(m): _flatten(v) for m, v in data.items()}
        rows = list(dict.fromkeys(k for v in cols.values() for k in v))  # the report's order: R@1, R@5, R@10
        if not rows:
            return "_No numeric metrics in the report._"
        lines = ["| metric | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        lines += [f"| {r} | " + " | ".join(_fmt(c.get(r)) for c in cols.values()) + " |" for r in rows]
        return "\n".join(lines)
    flat = _flatten(data)
    if not flat:
        return "_No numeric metrics in the report._"
    return "\n".join(["| metric | value |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in flat.items()])


def _architecture(model_cfg: Mapping, text_config: Mapping | None, n_params: int | None) -> list[str]:
    v, t = model_cfg.get("vision_cfg", {}), model_cfg.get("text_cfg", {})
    if "timm_model_name" in v:
        image = f"timm `{v['timm_model_name']}` ({v.get('image_size', 224)} px)"
    else:
        image = (
            f"open_clip ViT: {v.get('layers')} layers, width {v.get('width')}, patch {v.get('patch_size')}, "
            f"{v.get('image_size')} px"
        )
    if text_config:
        text = (
            f"{text_config.get('model_type', 'bert').upper()}: {text_config.get('num_hidden_layers')} layers, "
            f"hidden {text_config.get('hidden_size')}, vocab {text_config.get('vocab_size')}, "
            f"pooler `{t.get('hf_pooler_type')}`, projection `{t.get('hf_proj_type')}`"
        )
    else:
        text = f"open_clip text transformer: {t.get('layers')} layers, width {t.get('width')}"
    rows = [
        ("image tower", image),
        ("text tower", text),
        ("embedding dim", model_cfg.get("embed_dim")),
        ("context length", t.get("context_length")),
    ]
    if n_params:
        rows.append(("parameters", f"{n_params / 1e6:.1f}M"))
    return ["| | |", "|---|---|"] + [f"| {k} | {val} |" for k, val in rows]


def make_model_card(
    card: ModelCard | None,
    model_cfg: Mapping[str, Any],
    text_config: Mapping[str, Any] | None = None,
    n_params: int | None = None,
    folder_name: str = "STUDENT_DIR",
) -> str:
    """README.md text for the export folder named `folder_name` (the usage block names it, relatively)."""
    card = card or ModelCard()
    lines = [
        "---",
        "library_name: open_clip",
        "pipeline_tag: zero-shot-image-classification",
        "tags:",
        "- clip",
        "- biomedical",
        "- knowledge-distillation",
        "---",
        "",
        f"# {card.name}",
        "",
        "A CLIP model with the BiomedCLIP architecture (timm/open_clip ViT image tower, BERT text tower), "
        "trained with biomed-distill" + (f" from `{shown_spec(card.source)}`." if card.source else "."),
        "",
        "## Architecture",
        "",
        *_architecture(model_cfg, text_config, n_params),
        "",
    ]
    lines += ["## Teachers", ""]
    if card.teachers:
        lines += ["| teacher | spec | weight |", "|---|---|---|"]
        lines += [
            f"| {t.name} | `{shown_spec(t.spec) if t.spec else ''}` | {'' if t.weight is None else t.weight} |"
            for t in card.teachers
        ]
    else:
        lines.append("None recorded (contrastive training only).")
    corpus = shown_if_absolute(card.corpus) if card.corpus else None
    lines += ["", "## Training data", "", f"- corpus: `{corpus}`" if corpus else "- corpus: not recorded"]
    if card.corpus_size is not None:
        lines.append(f"- size: {card.corpus_size} image-text pairs")
    lines += ["", "## Training", "", f"- steps: {card.steps}" if card.steps is not None else "- steps: not recorded"]
    if card.samples_seen is not None:
        lines.append(f"- samples seen: {card.samples_seen}")
    if card.final_losses:
        lines += ["", "Final losses:", "", "| term | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(float(v))} |" for k, v in card.final_losses.items()]
    if card.eval:
        lines += ["", "## Evaluation", "", metrics_table(card.eval)]
    if card.notes:
        lines += ["", card.notes]
    lines += usage_section(folder_name)
    return "\n".join(lines)


def usage_section(folder_name: str | None = None, hub_repo: str | None = None) -> list[str]:
    """The card's `## Usage` lines: for this export folder (named relatively), or for the Hub repo `hub_repo`."""
    if hub_repo:
        spec = f"hf-hub:{hub_repo}"
        return [
            "",
            "## Usage",
            "",
            "```python",
            "import open_clip",
            "",
            f'model, _, preprocess = open_clip.create_model_and_transforms("{spec}")',
            f'tokenizer = open_clip.get_tokenizer("{spec}")',
            "```",
            "",
        ]
    return [
        "",
        "## Usage",
        "",
        "```python",
        "import open_clip",
        "",
        f'student_dir = "{folder_name}"  # this folder, relative to where you run Python',
        'model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{student_dir}")',
        'tokenizer = open_clip.get_tokenizer(f"local-dir:{student_dir}")',
        "",
        "# after moving or copying the folder (offline):",
        "from student import load_student",
        "",
        "model, preprocess, tokenizer = load_student(student_dir)",
        "```",
        "",
    ]


def card_for_hub(card_text: str, repo: str) -> str:
    """The card with its Usage section rewritten for `hf-hub:REPO` (the local paths mean nothing there)."""
    head, sep, _ = card_text.partition("\n## Usage\n")
    return (head if sep else card_text).rstrip("\n") + "\n" + "\n".join(usage_section(hub_repo=repo))
