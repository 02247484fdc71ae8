"""The loss's config models, `LossTermCfg` and `CombineCfg`, with `term_class` and `build_term`: re-exported from
`distill.config.terms`, where they live torch-free so that `distill train` checks a config before importing torch.
"""

from distill.config.terms import (  # noqa: F401
    BALANCE_MODES,
    COMBINE_MODES,
    POSITIVES,
    SCOPES,
    CombineCfg,
    LossTermCfg,
    build_term,
    term_class,
)

__all__ = [
    "LossTermCfg",
    "CombineCfg",
    "term_class",
    "build_term",
    "COMBINE_MODES",
    "BALANCE_MODES",
    "POSITIVES",
    "SCOPES",
]
