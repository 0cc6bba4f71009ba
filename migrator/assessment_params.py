"""What an assessment of two bases depends on besides their weights: the settings that reach
its result, as the job database stores and compares them (``db.params_hash``).

Kept apart from :mod:`migrator.bases` (which loads torch) so that a pass can tell whether a
stored assessment is current without loading the math.
"""

from __future__ import annotations

from core.selection import DEFAULT_PATTERNS
from migrator.settings import Settings

__all__ = ["assessment_parameters"]


def assessment_parameters(settings: Settings) -> dict[str, object]:
    """Everything an assessment's result depends on besides the two bases' weights."""
    return {
        "similarity_rank": settings.similarity_rank,
        "weighted": settings.weighted_similarity,
        "combine": settings.atc_combine.value,
        "module_min_similarity": settings.module_min_similarity,
        "match_strategy": settings.match_strategy.value,
        "merge_weights": settings.merge_weights.value,
        "order_preserving_layers": settings.order_preserving_layers,
        "patterns": list(settings.module_patterns or DEFAULT_PATTERNS),
        "role_substitutions": [list(p) for p in settings.role_substitutions],
    }
