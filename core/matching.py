"""Which source module's adapter each target module receives (DESIGN.md, "Module matching").

For each target module j, with Phi the combined similarity and X* the combined plan of an
:class:`ATCResult`:

1. ``same_name``: the source module of the same name, if the pair is valid and
   Phi >= ``min_similarity``;
2. ``rematched``: else the valid source module i with the largest transport mass X*_ij, if its
   Phi >= ``min_similarity`` (appendix B.1.1: SSD-1B's tb.3 takes SDXL's tb.6);
3. ``skipped``: else nothing (the paper's ``filter_blocks``, Algorithm 1).
"""

from __future__ import annotations

import numpy as np

from core.atc import ATCResult
from core.decisions import Decision, ModuleDecision

__all__ = ["Decision", "ModuleDecision", "match_modules"]


def match_modules(atc: ATCResult, *, min_similarity: float) -> tuple[ModuleDecision, ...]:
    """Decide every target module of ``atc`` (same name, else most transport mass, else skip).

    Args:
        atc: the comparison of the two bases.
        min_similarity: the per-module threshold on the combined Phi
            (``module_min_similarity``).

    Returns:
        One :class:`ModuleDecision` per target module, in ``atc.target_names`` order. Ties in
        transport mass go to the higher Phi, then to the earlier source module.
    """
    source_rows = {name: i for i, name in enumerate(atc.source_names)}
    valid = atc.valid
    decisions = []
    for j, target in enumerate(atc.target_names):
        same = source_rows.get(target)
        if same is None:
            prefix = "no same-named source module; "
        else:
            phi = float(atc.phi[same, j])
            if valid[same, j] and phi >= min_similarity:
                reason = f"same name, phi {phi:.2f}"
                decisions.append(_decide(atc, same, j, Decision.SAME_NAME, reason))
                continue
            invalid = atc.reason(target, target)
            prefix = (
                f"same-name pair invalid ({invalid}); "
                if invalid is not None
                else f"same-name phi {phi:.2f} < {min_similarity:g}; "
            )
        candidates = np.flatnonzero(valid[:, j] & (atc.plan[:, j] > 0))
        if candidates.size:
            # largest mass, then larger phi, then the first row
            order = np.lexsort((candidates, -atc.phi[candidates, j], -atc.plan[candidates, j]))
            best = int(candidates[order[0]])
            mass, phi = float(atc.plan[best, j]), float(atc.phi[best, j])
            name = atc.source_names[best]
            if phi >= min_similarity:
                reason = f"{prefix}rematched to {name} (mass {mass:.4f}, phi {phi:.2f})"
                decisions.append(_decide(atc, best, j, Decision.REMATCHED, reason))
                continue
            detail = f"most transport mass from {name}: mass {mass:.4f}, phi {phi:.2f}"
        else:
            detail = "no valid source module receives transport mass"
        reason = f"{prefix}no valid source module with phi >= {min_similarity:g} ({detail})"
        decisions.append(_skip(atc, same, j, reason))
    return tuple(decisions)


def _decide(atc: ATCResult, i: int, j: int, decision: Decision, reason: str) -> ModuleDecision:
    return ModuleDecision(
        target=atc.target_names[j],
        source=atc.source_names[i],
        decision=decision,
        phi=float(atc.phi[i, j]),
        phi_left=float(atc.phi_left[i, j]),
        phi_right=float(atc.phi_right[i, j]),
        mass=float(atc.plan[i, j]),
        reason=reason,
    )


def _skip(atc: ATCResult, same: int | None, j: int, reason: str) -> ModuleDecision:
    phis = (0.0, 0.0, 0.0) if same is None else (
        float(atc.phi[same, j]), float(atc.phi_left[same, j]), float(atc.phi_right[same, j])
    )  # fmt: skip
    return ModuleDecision(
        target=atc.target_names[j],
        source=None,
        decision=Decision.SKIPPED,
        phi=phis[0],
        phi_left=phis[1],
        phi_right=phis[2],
        mass=0.0,
        reason=reason,
    )
