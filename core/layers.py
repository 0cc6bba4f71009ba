"""Layers of a base, and an order-preserving layer map for successors of another depth.

A module's *layer* comes from its name: the last numeric path segment that is not the name's
final segment is the layer index, what precedes it (with the index wildcarded) the *stack*, what
follows it the *member* (``encoder.layer.3.attention.self.query``: stack ``encoder.layer.*``,
index 3, member ``attention.self.query``; ``unet.down_blocks.2.attentions.0.transformer_blocks
.1.attn1.to_out.0``: stack ``unet.down_blocks.2.attentions.0.transformer_blocks.*``, index 1,
member ``attn1.to_out.0``).

The ATC's transport plan (:mod:`core.atc`) may send mass between any valid modules of a role,
in any order. A depth-pruned or deepened successor keeps the order of its layers, so this module
offers a monotone alternative, as LoRASuite (Li et al. 2025, its layer allocation) does with CKA
between the layers of two LLMs: a dynamic program over a (source layers x target layers)
similarity matrix of each stack (by default the mean Phi of the two layers' same-member
modules), and a plan that only carries mass between aligned layers (:func:`ordered_plan`), which
:func:`core.matching.match_modules` accepts in place of the ATC's plan.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from core.atc import ATCResult

__all__ = [
    "LayerPosition",
    "OrderedPlan",
    "StackSimilarity",
    "layer_pairs",
    "layer_position",
    "monotone_alignment",
    "ordered_plan",
    "stack_similarities",
]


@dataclass(frozen=True)
class LayerPosition:
    """Where a module sits: ``stack`` (index wildcarded), ``index``, ``layer`` (the name up to
    and including the index) and ``member`` (the rest)."""

    stack: str
    index: int
    layer: str
    member: str


def layer_position(name: str) -> LayerPosition | None:
    """The layer of module ``name`` (module docstring), or None when it has no layer index."""
    parts = name.split(".")
    for i in range(len(parts) - 2, -1, -1):
        if parts[i].isdigit():
            stack = ".".join([*parts[:i], "*"])
            return LayerPosition(
                stack, int(parts[i]), ".".join(parts[: i + 1]), ".".join(parts[i + 1 :])
            )
    return None


def layer_pairs(pairs: Iterable[tuple[str | None, str]]) -> tuple[tuple[str, str], ...]:
    """(source layer, target layer) per target layer, from (source module, target module) pairs
    (e.g. the decisions' ``(source, target)``): each target layer takes the source layer most of
    its modules come from (ties: the lower source index). Modules without a layer are ignored.
    """
    votes: dict[str, dict[tuple[int, str], int]] = {}
    order: dict[str, tuple[str, int]] = {}
    for source, target in pairs:
        if source is None:
            continue
        s, t = layer_position(source), layer_position(target)
        if s is None or t is None:
            continue
        order.setdefault(t.layer, (t.stack, t.index))
        tally = votes.setdefault(t.layer, {})
        tally[(s.index, s.layer)] = tally.get((s.index, s.layer), 0) + 1
    out = []
    for target in sorted(votes, key=lambda name: order[name]):
        (_, source), _ = max(votes[target].items(), key=lambda kv: (kv[1], -kv[0][0]))
        out.append((source, target))
    return tuple(out)


def _injective(sim: np.ndarray) -> list[int]:
    """Strictly increasing f: rows -> columns (rows <= columns) maximising sum sim[i, f(i)]."""
    n, m = sim.shape
    dp = np.full((n, m), -np.inf)
    back = np.zeros((n, m), dtype=np.int64)
    dp[0] = sim[0]
    for i in range(1, n):
        best, arg = -np.inf, -1
        for j in range(i, m):
            if dp[i - 1, j - 1] > best:  # the best predecessor column k < j
                best, arg = dp[i - 1, j - 1], j - 1
            dp[i, j] = best + sim[i, j]
            back[i, j] = arg
    cols = [int(np.argmax(dp[n - 1]))]
    for i in range(n - 1, 0, -1):
        cols.append(int(back[i, cols[-1]]))
    return cols[::-1]


def _surjective(sim: np.ndarray) -> list[int]:
    """Non-decreasing onto f: rows -> columns (rows >= columns), f(i+1) - f(i) in {0, 1},
    maximising sum sim[i, f(i)]."""
    n, m = sim.shape
    dp = np.full((n, m), -np.inf)
    step = np.zeros((n, m), dtype=np.int64)
    dp[0, 0] = sim[0, 0]
    for i in range(1, n):
        for j in range(min(i, m - 1) + 1):
            stay = dp[i - 1, j]
            move = dp[i - 1, j - 1] if j > 0 else -np.inf
            step[i, j] = int(move > stay)
            dp[i, j] = max(stay, move) + sim[i, j]
    cols, j = [m - 1], m - 1
    for i in range(n - 1, 0, -1):
        j -= int(step[i, j])
        cols.append(j)
    return cols[::-1]


def monotone_alignment(sim: np.ndarray, *, cover: bool = True) -> tuple[tuple[int, int], ...]:
    """An order-preserving alignment of source layers (rows) and target layers (columns).

    Args:
        sim: (S_l, T_l) layer similarities (higher is more alike).
        cover: True: every layer of both sides is aligned; the longer side's layers each go to
            one layer of the shorter side, in order (a non-decreasing onto map, steps 0 or 1),
            so that a layer a pruned successor dropped is carried into a neighbour it kept.
            False: the shorter side's layers each take a distinct layer of the longer side, in
            order (strictly increasing; LoRASuite's allocation); the longer side's others are
            left out.

    Returns:
        (source layer, target layer) index pairs maximising the sum of ``sim`` over them,
        sorted; for S_l == T_l (both modes) the identity.

    Raises:
        ValueError: an empty or non-finite matrix.
    """
    sim = np.asarray(sim, dtype=np.float64)
    if sim.ndim != 2 or 0 in sim.shape or not np.isfinite(sim).all():
        raise ValueError(f"layer similarities must be a finite non-empty matrix, got {sim.shape}")
    flip = sim.shape[0] < sim.shape[1]  # make rows the longer side
    longer = sim.T if flip else sim
    if cover:
        pairs = list(enumerate(_surjective(longer)))
    else:  # the shorter side (columns of ``longer``) picks
        pairs = [(row, col) for col, row in enumerate(_injective(longer.T))]
    return tuple(sorted((b, a) if flip else (a, b) for a, b in pairs))


@dataclass(frozen=True, eq=False)
class StackSimilarity:
    """Layer similarities of one stack present in both bases.

    Attributes:
        stack: the stack name (index wildcarded).
        source_layers, target_layers: layer indices, ascending.
        sim: (len(source_layers), len(target_layers)) mean Phi of the layers' same-member valid
            module pairs (0 where they share none).
    """

    stack: str
    source_layers: tuple[int, ...]
    target_layers: tuple[int, ...]
    sim: np.ndarray


def _positions(names: Sequence[str]) -> list[LayerPosition | None]:
    return [layer_position(n) for n in names]


def stack_similarities(atc: ATCResult) -> dict[str, StackSimilarity]:
    """:class:`StackSimilarity` of every stack with layers in both bases of ``atc``."""
    src, tgt = _positions(atc.source_names), _positions(atc.target_names)
    stacks = {p.stack for p in src if p} & {p.stack for p in tgt if p}
    valid = atc.valid
    out = {}
    for stack in sorted(stacks):
        s_layers = sorted({p.index for p in src if p and p.stack == stack})
        t_layers = sorted({p.index for p in tgt if p and p.stack == stack})
        total = np.zeros((len(s_layers), len(t_layers)))
        count = np.zeros_like(total)
        t_at = {(p.index, p.member): j for j, p in enumerate(tgt) if p and p.stack == stack}
        for i, p in enumerate(src):
            if p is None or p.stack != stack:
                continue
            for b, t_index in enumerate(t_layers):
                j = t_at.get((t_index, p.member))
                if j is not None and valid[i, j]:
                    total[s_layers.index(p.index), b] += atc.phi[i, j]
                    count[s_layers.index(p.index), b] += 1
        sim = np.divide(total, count, out=np.zeros_like(total), where=count > 0)
        out[stack] = StackSimilarity(stack, tuple(s_layers), tuple(t_layers), sim)
    return out


@dataclass(frozen=True, eq=False)
class OrderedPlan:
    """An order-preserving replacement for the ATC's plan.

    Attributes:
        plan: (S, T) masses: within each stack present in both bases, source module i (layer a,
            member x) sends its marginal 1/S, split evenly over the target layers aligned with a,
            to the valid same-member modules there (nothing to or from other modules); entries
            between modules outside those stacks are the ATC's plan.
        alignments: stack -> (source layer, target layer) index pairs.
    """

    plan: np.ndarray
    alignments: Mapping[str, tuple[tuple[int, int], ...]]


def ordered_plan(
    atc: ATCResult,
    *,
    cover: bool = True,
    similarities: Mapping[str, np.ndarray] | None = None,
) -> OrderedPlan:
    """An order-preserving plan for :func:`core.matching.match_modules` (``plan=``).

    Args:
        atc: the comparison of the two bases.
        cover: see :func:`monotone_alignment`.
        similarities: stack -> (source layers x target layers) similarity to align on instead
            of the mean Phi (e.g. per-layer CKA of the functional check), layers ascending.

    Returns:
        An :class:`OrderedPlan`.
    """
    plan = np.array(atc.plan, dtype=np.float64)
    src, tgt = _positions(atc.source_names), _positions(atc.target_names)
    mass = 1.0 / len(atc.source_names)
    layered = stack_similarities(atc)
    # modules of stacks both bases have exchange mass only along the alignment
    rows = [i for i, p in enumerate(src) if p and p.stack in layered]
    cols = [j for j, p in enumerate(tgt) if p and p.stack in layered]
    plan[rows, :] = 0.0
    plan[:, cols] = 0.0
    alignments = {}
    for stack, layers in layered.items():
        custom = similarities.get(stack) if similarities is not None else None
        pairs = monotone_alignment(layers.sim if custom is None else custom, cover=cover)
        alignments[stack] = tuple(
            (layers.source_layers[a], layers.target_layers[b]) for a, b in pairs
        )
        aligned: dict[int, list[int]] = {}
        for a, b in alignments[stack]:
            aligned.setdefault(a, []).append(b)
        t_at = {(p.index, p.member): j for j, p in enumerate(tgt) if p and p.stack == stack}
        for i, p in enumerate(src):
            if p is None or p.stack != stack:
                continue
            targets = aligned.get(p.index, [])
            for b in targets:
                j = t_at.get((b, p.member))
                if j is not None and atc.valid[i, j]:
                    plan[i, j] = mass / len(targets)
    plan.setflags(write=False)
    return OrderedPlan(plan, alignments)
