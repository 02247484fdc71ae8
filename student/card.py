"""The exported student's model card (`README.md`): architecture, teachers, corpus, training and eval results.

Why tolerant readers: the card is fed from `run_meta.json`, `train_state.json` and an eval `report.json`
written by other parts of the project, so each section accepts the few shapes those files may take and
leaves out what is missing instead of failing an export.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping


def normalize_teachers(teachers: Any) -> list[dict[str, Any]]:
    """`[{"name", "spec", "weight"}]` from a list of dicts, `{name: spec}` or `{name: {"spec", "weight"}}`."""
    if not teachers:
        return []
    rows = []
    if isinstance(teachers, Mapping):
        for name, v in teachers.items():
            rows.append({"name": name, **(dict(v) if isinstance(v, Mapping) else {"spec": v})})
    else:
        for v in teachers:
            rows.append(dict(v) if isinstance(v, Mapping) else {"name": str(v)})
    return rows


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
    """
    data = report.get("results", report.get("metrics", report)) if isinstance(report, Mapping) else {}
    if not isinstance(data, Mapping) or not data:
        return "_No numeric metrics in the report._"
    if all(isinstance(v, Mapping) for v in data.values()):
        cols = {str(m): _flatten(v) for m, v in data.items()}
        rows = sorted({k for v in cols.values() for k in v})
        if not rows:
            return "_No numeric metrics in the report._"
        lines = ["| metric | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        lines += [f"| {r} | " + " | ".join(_fmt(c.get(r)) for c in cols.values()) + " |" for r in rows]
        return "\n".join(lines)
    flat = _flatten(data)
    if not flat:
        return "_No numeric metrics in the report._"
    return "\n".join(["| metric | value |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in sorted(flat.items())])


def _architecture(model_cfg: Mapping, text_config: Mapping | None, n_params: int | None) -> list[str]:
    v, t = model_cfg.get("vision_cfg", {}), model_cfg.get("text_cfg", {})
    if "timm_model_name" in v:
        image = f"timm `{v['timm_model_name']}` ({v.get('image_size', 224)} px)"
    else:
        image = (f"open_clip ViT: {v.get('layers')} layers, width {v.get('width')}, patch {v.get('patch_size')}, "
                 f"{v.get('image_size')} px")
    if text_config:
        text = (f"{text_config.get('model_type', 'bert').upper()}: {text_config.get('num_hidden_layers')} layers, "
                f"hidden {text_config.get('hidden_size')}, vocab {text_config.get('vocab_size')}, "
                f"pooler `{t.get('hf_pooler_type')}`, projection `{t.get('hf_proj_type')}`")
    else:
        text = f"open_clip text transformer: {t.get('layers')} layers, width {t.get('width')}"
    rows = [("image tower", image), ("text tower", text), ("embedding dim", model_cfg.get("embed_dim")),
            ("context length", t.get("context_length"))]
    if n_params:
        rows.append(("parameters", f"{n_params / 1e6:.1f}M"))
    return ["| | |", "|---|---|"] + [f"| {k} | {val} |" for k, val in rows]


def make_model_card(card: Mapping[str, Any] | None, model_cfg: Mapping[str, Any],
                    text_config: Mapping[str, Any] | None = None, n_params: int | None = None,
                    load_path: str = "STUDENT_DIR") -> str:
    """README.md text. `card` keys (all optional): name, source, teachers, corpus ({path, size} or a path),
    corpus_size, steps, samples_seen, final_losses ({name: value}), eval (a report dict), notes."""
    card = dict(card or {})
    name = card.get("name") or "biomed-distill student"
    lines = ["---", "library_name: open_clip", "pipeline_tag: zero-shot-image-classification",
             "tags:", "- clip", "- biomedical", "- knowledge-distillation", "---", "", f"# {name}", "",
             "A CLIP model with the BiomedCLIP architecture (timm/open_clip ViT image tower, BERT text tower), "
             "trained with biomed-distill" + (f" from `{card['source']}`." if card.get("source") else "."), "",
             "## Architecture", "", *_architecture(model_cfg, text_config, n_params), ""]
    teachers = normalize_teachers(card.get("teachers"))
    lines += ["## Teachers", ""]
    if teachers:
        lines += ["| teacher | spec | weight |", "|---|---|---|"]
        lines += [f"| {t.get('name', '')} | `{t.get('spec', '')}` | {t.get('weight', '')} |" for t in teachers]
    else:
        lines.append("None recorded (contrastive training only).")
    corpus = card.get("corpus")
    path = corpus.get("path") if isinstance(corpus, Mapping) else corpus
    size = (corpus.get("size") if isinstance(corpus, Mapping) else None) or card.get("corpus_size")
    lines += ["", "## Training data", "", f"- corpus: `{path}`" if path else "- corpus: not recorded"]
    if size is not None:
        lines.append(f"- size: {size} image-text pairs")
    lines += ["", "## Training", "", f"- steps: {card['steps']}" if card.get("steps") is not None
              else "- steps: not recorded"]
    if card.get("samples_seen") is not None:
        lines.append(f"- samples seen: {card['samples_seen']}")
    losses = card.get("final_losses") or {}
    if losses:
        lines += ["", "Final losses:", "", "| term | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(float(v))} |" for k, v in losses.items() if isinstance(v, (int, float))]
    if card.get("eval"):
        lines += ["", "## Evaluation", "", metrics_table(card["eval"])]
    if card.get("notes"):
        lines += ["", str(card["notes"])]
    lines += usage_section(load_path)
    return "\n".join(lines)


def usage_section(load_path: str | None = None, hub_repo: str | None = None) -> list[str]:
    """The card's `## Usage` lines: for the export folder at `load_path`, or for the Hub repo `hub_repo`."""
    spec = f"hf-hub:{hub_repo}" if hub_repo else f"local-dir:{load_path}"
    lines = ["", "## Usage", "", "```python", "import open_clip", "",
             f'model, _, preprocess = open_clip.create_model_and_transforms("{spec}")',
             f'tokenizer = open_clip.get_tokenizer("{spec}")']
    if not hub_repo:
        lines += ["", "# after moving or copying the folder (offline):", "from student import load_student", "",
                  f'model, preprocess, tokenizer = load_student("{load_path}")']
    return lines + ["```", ""]


def card_for_hub(card_text: str, repo: str) -> str:
    """The card with its Usage section rewritten for `hf-hub:REPO` (the local paths mean nothing there)."""
    head, sep, _ = card_text.partition("\n## Usage\n")
    return (head if sep else card_text).rstrip("\n") + "\n" + "\n".join(usage_section(hub_repo=repo))
