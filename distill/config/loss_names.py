"""Names the loss config checks without importing torch: the built-in term kinds, targets, scopes, combine modes.

Why a module of its own: `distill train` validates its whole config before importing torch (a typo answers in
about a second, not after a 20-60 s import on a loaded machine), so these names cannot live beside the torch code
of the terms. `tests/test_cli_fast_fail.py` checks that BUILTIN_TERMS agrees with the registered term classes.
"""
from __future__ import annotations

POSITIVES = ("diagonal", "caption")  # contrastive targets: each row's own pair | every row with the same caption
AFFINITY_PAIRS = ("cross", "intra", "both")  # affinity's similarity pairs: image-text | image-image, text-text | all
SCOPES = ("batch", "domain")  # what a row's similarity distribution spans: the global batch | its own domain's rows
COMBINE_MODES = ("weighted_sum", "random_teacher", "confidence")
BALANCE_MODES = ("none", "phi_s")
# kind -> uses_teachers, for every term class registered by distill.losses (terms.py, siglip.py, spatial.py)
BUILTIN_TERMS: dict[str, bool] = {"infonce": False, "siglip": False, "feature": True, "icl": True,
                                  "affinity": True, "spatial": True}
LOSS_ENTRY_POINTS = "biomed_distill.losses"  # the entry-point group of plug-in terms (distill.losses.terms.LOSSES)


def plugin_kinds() -> list[str]:
    """Term kinds that installed packages declare as entry points (read without importing them)."""
    import importlib.metadata

    return sorted({ep.name for ep in importlib.metadata.entry_points(group=LOSS_ENTRY_POINTS)} - set(BUILTIN_TERMS))
