"""Module decisions: which source module(s) each target module receives, and why.

Made by :func:`core.matching.match_modules`, stored by the service, applied by
:func:`core.transfer.transfer_adapter`. Plain data (no torch), so that the service can read and
write them without loading the math.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

__all__ = ["Decision", "ModuleDecision"]


class Decision(StrEnum):
    """The outcome for one target module."""

    SAME_NAME = "same_name"  # receives the adapter of the source module of the same name
    REMATCHED = "rematched"  # receives the adapter of another source module (most OT mass)
    SKIPPED = "skipped"  # receives nothing: no source module similar enough


@dataclass(frozen=True)
class ModuleDecision:
    """The decision for one target module.

    Attributes:
        target: target module name.
        source: the source module whose adapter it receives (None when skipped).
        decision: see :class:`Decision`.
        phi, phi_left, phi_right: similarities of (source, target); for a skip, of the
            same-named source module if there is one, else 0.
        mass: X*_ij of the combined plan for the chosen pair (0 when skipped).
        reason: the decision in words.
        contributions: for a target fed by several source modules, (source name, weight) of
            each; its update is the weighted sum of theirs. Empty: ``source`` alone, weight 1.
    """

    target: str
    source: str | None
    decision: Decision
    phi: float
    phi_left: float
    phi_right: float
    mass: float
    reason: str
    contributions: tuple[tuple[str, float], ...] = ()

    @property
    def sources(self) -> tuple[tuple[str, float], ...]:
        """(source name, weight) of every module feeding the target (none when skipped)."""
        if self.decision is Decision.SKIPPED or self.source is None:
            return ()
        return self.contributions or ((self.source, 1.0),)
