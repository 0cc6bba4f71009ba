"""The small vocabularies of the core: string enums that import nothing heavy (no torch, no POT),
so that settings, the CLI and the job database can use them without loading the math.

The math modules re-export them where they belong (``core.modes.TransferMode``,
``core.atc.Combine``, ``core.matching.MatchStrategy`` / ``MergeWeights``); module decisions are in :mod:`core.decisions`, as light.
"""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # numpy is imported where it is used: the CLI starts without it
    import numpy as np

__all__ = ["Combine", "MatchStrategy", "MergeWeights", "TransferMode"]


class TransferMode(StrEnum):
    """How an adapter module is carried to the target base."""

    PROJECT = "project"  # eq. 3 at rank k (default k = p: the paper's Algorithm 1)
    SUBSPACE = "subspace"  # k = r: the result is a LoRA-X of the target with a full r x r dS
    COPY = "copy"  # Table 5 ablation: the source dS copied onto the target's singular vectors


class Combine(StrEnum):
    """How left and right figures combine. Defined on costs (1 - Phi and ATC)."""

    MEAN = "mean"  # phi = (phi_l + phi_r) / 2, atc = (atc_l + atc_r) / 2
    MAX = "max"  # the worse side decides: phi = min(phi_l, phi_r), atc = max(atc_l, atc_r)
    LEFT = "left"  # left only
    RIGHT = "right"  # right only

    def phi(self, left: np.ndarray, right: np.ndarray) -> np.ndarray:
        """Combined similarity."""
        import numpy as np

        if self is Combine.MEAN:
            return (left + right) / 2
        if self is Combine.MAX:
            return np.minimum(left, right)
        return left.copy() if self is Combine.LEFT else right.copy()

    def cost(self, left: float, right: float) -> float:
        """Combined ATC."""
        if self is Combine.MEAN:
            return (left + right) / 2
        if self is Combine.MAX:
            return max(left, right)
        return left if self is Combine.LEFT else right


class MatchStrategy(StrEnum):
    """How many source modules a target module may receive (:func:`core.matching.match_modules`)."""

    ONE_TO_ONE = "one_to_one"  # one source module per target module (the default)
    MERGE = "merge"  # the mass-weighted combination of every source module sending it mass


class MergeWeights(StrEnum):
    """How a merged target module weighs its source modules' updates."""

    SOURCE = "source"  # w_ij = X_ij / a_i: each source update carried in full over its targets
    TARGET = "target"  # w_ij = X_ij / sum_i X_ij: a convex combination
