"""Names the loss config checks without importing torch: the built-in term kinds, targets, scopes, combine modes.

Why a module of its own: `distill train` validates its whole config before importing torch (a typo answers in
about a second, not after a 20-60 s import on a loaded machine), so these names cannot live beside the torch code
of the terms. `tests/test_cli_fast_fail.py` checks that BUILTIN_TERMS agrees with the registered term classes.
"""

from __future__ import annotations

import ast
import importlib.metadata
from pathlib import Path
from typing import Literal, get_args

# The choices of term options, as the Literal types their constructors are annotated with (the config checks a
# term's options against its constructor's annotations: distill.config.terms.check_options), and as tuples.
Positives = Literal["diagonal", "caption"]  # contrastive targets: each row's own pair | every row with its caption
AffinityPairs = Literal["cross", "intra", "both"]  # affinity's pairs: image-text | image-image, text-text | all
Scope = Literal["batch", "domain"]  # what a row's similarity distribution spans: the global batch | its domain's rows
FeatureMetric = Literal["cosine", "mse", "smooth_l1"]
POSITIVES: tuple[str, ...] = get_args(Positives)
AFFINITY_PAIRS: tuple[str, ...] = get_args(AffinityPairs)
SCOPES: tuple[str, ...] = get_args(Scope)
COMBINE_MODES = ("weighted_sum", "random_teacher", "confidence")
BALANCE_MODES = ("none", "phi_s")


def _registered_in_source(folder: Path) -> dict[str, bool]:
    """kind -> uses_teachers of every class decorated `@register_loss(key=...)` in `folder`'s modules, read from
    their source (ast), so the config is checked before torch is imported and a new term module needs no entry
    here. A class without its own `uses_teachers` takes its base's (a scanned term), else LossTerm's True."""
    classes: dict[str, tuple[str | None, list[str], bool | None]] = {}  # name -> (kind, bases, own uses_teachers)
    for path in sorted(folder.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if not isinstance(node, ast.ClassDef):
                continue
            kind = None
            for dec in node.decorator_list:
                if isinstance(dec, ast.Call) and getattr(dec.func, "id", None) == "register_loss":
                    args = [kw.value for kw in dec.keywords if kw.arg == "key"] + list(dec.args[:1])
                    if args and isinstance(args[0], ast.Constant) and isinstance(args[0].value, str):
                        kind = args[0].value
            own = None
            for stmt in node.body:
                if (
                    isinstance(stmt, ast.Assign)
                    and any(getattr(t, "id", None) == "uses_teachers" for t in stmt.targets)
                    and isinstance(stmt.value, ast.Constant)
                ):
                    own = bool(stmt.value.value)
            classes[node.name] = (kind, [getattr(b, "id", "") for b in node.bases], own)

    def uses(name: str, depth: int = 0) -> bool:
        kind, bases, own = classes.get(name, (None, [], None))
        if own is not None or depth > 20:
            return True if own is None else own
        return next((uses(b, depth + 1) for b in bases if b in classes), True)

    return {kind: uses(name) for name, (kind, _, _) in classes.items() if kind}


# kind -> uses_teachers, for every term class registered by distill.losses (tests/test_cli_fast_fail.py checks it
# against the registry)
BUILTIN_TERMS: dict[str, bool] = _registered_in_source(Path(__file__).resolve().parents[1] / "losses")
LOSS_ENTRY_POINTS = "biomed_distill.losses"  # the entry-point group of plug-in terms (distill.losses.terms.LOSSES)


def plugin_kinds() -> list[str]:
    """Term kinds that installed packages declare as entry points (read without importing them)."""
    return sorted({ep.name for ep in importlib.metadata.entry_points(group=LOSS_ENTRY_POINTS)} - set(BUILTIN_TERMS))
