"""Which source module's adapter each target module receives (DESIGN.md, "Module matching").

For each target module j, with Phi the combined similarity and X* the combined plan of an
:class:`ATCResult`:

1. ``same_name``: the source module of the same name, if the pair is valid and
   Phi >= ``min_similarity``;
2. ``rematched``: else the valid source module i with the largest transport mass X*_ij, if its
   Phi >= ``min_similarity`` (appendix B.1.1: SSD-1B's tb.3 takes SDXL's tb.6);
3. ``skipped``: else nothing (the paper's ``filter_blocks``, Algorithm 1).

That is the default strategy, ``one_to_one``: each target module receives one source module's
update. With ``strategy="merge"`` a target module that receives transport mass from several
valid source modules receives the mass-weighted combination of their updates: the one-to-one
choice above (the *anchor*, which alone decides whether the module is kept) plus every other
valid source module i with X*_ij > 0 (and Phi_ij >= ``merge_min_similarity``), listed in
:attr:`ModuleDecision.contributions` as (source, w_ij), the anchor first:

- ``merge_weights="source"`` (default): w_ij = X*_ij / a_i, the share of source module i's mass
  that goes to j (a_i = 1/S): every source update is carried in full, split over the targets it
  sends mass to (a pruned successor's kept layer receives the sum of the updates of the layers it
  stands for). For equal module counts the plan is a permutation and merge equals one-to-one.
- ``merge_weights="target"``: w_ij = X*_ij / sum_i X*_ij, a convex combination (the mean).

An anchor with no mass in the plan (a same-named module chosen by name) weighs 1. ``plan``
replaces the ATC's plan, e.g. the order-preserving plan of :func:`core.layers.ordered_plan`.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from core.atc import ATCResult
from core.decisions import Decision, ModuleDecision
from core.vocabulary import MatchStrategy, MergeWeights

__all__ = ["Decision", "MatchStrategy", "MergeWeights", "ModuleDecision", "match_modules"]

_MASS_TOLERANCE = 1e-9
"""Masses below this share of a source row's 1/S are solver round-off, not merged."""


def match_modules(
    atc: ATCResult,
    *,
    min_similarity: float,
    strategy: MatchStrategy | str = MatchStrategy.ONE_TO_ONE,
    plan: np.ndarray | None = None,
    merge_weights: MergeWeights | str = MergeWeights.SOURCE,
    merge_min_similarity: float = 0.0,
) -> tuple[ModuleDecision, ...]:
    """Decide every target module of ``atc`` (same name, else most transport mass, else skip;
    with ``strategy="merge"`` also every other source module sending it mass).

    Args:
        atc: the comparison of the two bases.
        min_similarity: the per-module threshold on the combined Phi
            (``module_min_similarity``); in merge mode it applies to the anchor.
        strategy: :class:`MatchStrategy` (default one-to-one, today's behaviour).
        plan: (S, T) masses to use instead of ``atc.plan`` (e.g.
            :func:`core.layers.ordered_plan`).
        merge_weights: :class:`MergeWeights` (merge only).
        merge_min_similarity: the least Phi of a source module merged beside the anchor.

    Returns:
        One :class:`ModuleDecision` per target module, in ``atc.target_names`` order. Ties in
        transport mass go to the higher Phi, then to the earlier source module.

    Raises:
        ValueError: a ``plan`` whose shape is not (S, T), or negative or non-finite masses.
    """
    strategy, merge_weights = MatchStrategy(strategy), MergeWeights(merge_weights)
    masses = _plan(atc, plan)
    one_to_one = _one_to_one(atc, masses, min_similarity)
    if strategy is MatchStrategy.ONE_TO_ONE:
        return one_to_one
    return tuple(_merge(atc, masses, d, merge_weights, merge_min_similarity) for d in one_to_one)


def _plan(atc: ATCResult, plan: np.ndarray | None) -> np.ndarray:
    if plan is None:
        return atc.plan
    masses = np.asarray(plan, dtype=np.float64)
    expected = (len(atc.source_names), len(atc.target_names))
    if masses.shape != expected:
        raise ValueError(f"plan has shape {masses.shape}, expected {expected}")
    if not np.isfinite(masses).all() or (masses < 0).any():
        raise ValueError("plan masses must be finite and non-negative")
    return masses


def _merge(
    atc: ATCResult, plan: np.ndarray, d: ModuleDecision, how: MergeWeights, min_phi: float
) -> ModuleDecision:
    """The one-to-one decision ``d`` with every other source module sending mass merged in."""
    if d.source is None or d.decision is Decision.SKIPPED:
        return d
    j, anchor = atc.target_index(d.target), atc.source_index(d.source)
    row_mass = 1.0 / len(atc.source_names)
    # the exact solver leaves round-off masses (~1e-16) in cells it does not use
    carries = plan[:, j] > _MASS_TOLERANCE * row_mass
    found = np.flatnonzero(atc.valid[:, j] & carries & (atc.phi[:, j] >= min_phi))
    rows = [int(i) for i in found if i != anchor]
    if not rows:
        return d
    column = float(plan[[anchor, *rows], j].sum())

    def weight(i: int) -> float:
        if plan[i, j] <= 0:  # an anchor chosen by name, outside the plan
            return 1.0
        return float(plan[i, j]) / (row_mass if how is MergeWeights.SOURCE else column)

    # the anchor first, then by mass (descending), then row order
    rows.sort(key=lambda i: (-plan[i, j], i))
    parts = tuple((atc.source_names[i], weight(i)) for i in [anchor, *rows])
    listed = ", ".join(f"{name} x {w:.3g}" for name, w in parts)
    reason = f"{d.reason}; merged ({how.value} weights): {listed}"
    return replace(d, reason=reason, contributions=parts)


def _one_to_one(
    atc: ATCResult, plan: np.ndarray, min_similarity: float
) -> tuple[ModuleDecision, ...]:
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
                decisions.append(_decide(atc, plan, same, j, Decision.SAME_NAME, reason))
                continue
            invalid = atc.reason(target, target)
            prefix = (
                f"same-name pair invalid ({invalid}); "
                if invalid is not None
                else f"same-name phi {phi:.2f} < {min_similarity:g}; "
            )
        candidates = np.flatnonzero(valid[:, j] & (plan[:, j] > 0))
        if candidates.size:
            # largest mass, then larger phi, then the first row
            order = np.lexsort((candidates, -atc.phi[candidates, j], -plan[candidates, j]))
            best = int(candidates[order[0]])
            mass, phi = float(plan[best, j]), float(atc.phi[best, j])
            name = atc.source_names[best]
            if phi >= min_similarity:
                reason = f"{prefix}rematched to {name} (mass {mass:.4f}, phi {phi:.2f})"
                decisions.append(_decide(atc, plan, best, j, Decision.REMATCHED, reason))
                continue
            detail = f"most transport mass from {name}: mass {mass:.4f}, phi {phi:.2f}"
        else:
            detail = "no valid source module receives transport mass"
        reason = f"{prefix}no valid source module with phi >= {min_similarity:g} ({detail})"
        decisions.append(_skip(atc, same, j, reason))
    return tuple(decisions)


def _decide(
    atc: ATCResult, plan: np.ndarray, i: int, j: int, decision: Decision, reason: str
) -> ModuleDecision:
    return ModuleDecision(
        target=atc.target_names[j],
        source=atc.source_names[i],
        decision=decision,
        phi=float(atc.phi[i, j]),
        phi_left=float(atc.phi_left[i, j]),
        phi_right=float(atc.phi_right[i, j]),
        mass=float(plan[i, j]),
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
