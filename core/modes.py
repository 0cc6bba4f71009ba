"""The transfer modes: one small pure function each, and what each needs of the two bases.

Notation (section 4.2): source base W_s (m, n) = U_s S_s V_s^T, target base W_t (m', n') =
U_t S_t V_t^T, an update dW = s B A with B (m, r), A (r, n) and scale s; X_k is the first k
columns of X. Products run right to left: an m x m projector U U^T is never formed.

| mode | function | formula |
|---|---|---|
| project, same shape (eq. 3; Algorithm 1 at k = p) | :func:`project` | B' = L (L^T B), A' = (A R) R^T, L = U_t,k, R = V_t,k |
| project, different shape (section 4.2.2) | :func:`reshaped` | B' = U_t,k (U_s,k^T B), A' = (A V_s,k) V_t,k^T |
| subspace (k = r: a LoRA-X of the target) | :func:`subspace` | dS' = s (L_r^T B)(A R_r); up = U_t,r, down = (dS' / s) V_t,r^T |
| copy (Table 5 ablation) | :func:`copy` | up = U_t,r, down = (dS / s) V_t,r^T |

In :func:`subspace`, (L, R) = (U_t, V_t) for the same shape (projection onto the target's
subspaces) and (U_s, V_s) when the shapes differ (coordinates in the source basis carried to the
target basis). For a diagonal LoRA-X, B = U_s,r and A = diag(d) V_s,r^T, so the different-shape
maps give U_t,r diag(d) V_t,r^T: dS copied onto the target's singular vectors, unaffected by the
sign convention. When only one dimension differs, both sides still go through basis coordinates:
projecting the equal side onto the target while carrying the other side's coordinates would pair
u_t,i with v_s,i, whose relative signs are arbitrary. For a full dS or a plain LoRA the
coordinates depend on the signs (and, for repeated singular values, rotations) of both bases'
singular vectors: a risk the result notes.

Project mode keeps a side whose dimension equals k as it is: U_t,k is then square and orthogonal,
so U_t,k U_t,k^T = I exactly (Algorithm 1 computes that identity in float32, to about 1e-6). A
square module at full rank is therefore carried unchanged and reads no factors at all, and a
rectangular one at full rank needs only an orthonormal basis of its long side's range (any basis
of range(W_t): the projector L L^T does not depend on which). :func:`needs` states, per module,
what each base must provide.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from core.factors import Factors
from core.vocabulary import TransferMode

__all__ = [
    "BaseNeed",
    "ModuleNeeds",
    "Pair",
    "TransferMode",
    "copy",
    "needs",
    "project",
    "reshaped",
    "subspace",
]


@dataclass(frozen=True, eq=False)
class Pair:
    """A LoRA update s * up @ down: up (m, r), down (r, n), float32.

    Attributes:
        up, down: the factors.
        scale: s.
        ds: dS when the pair is a LoRA-X written as U_r dS V_r^T ((r, r) or (r,)), else None.
    """

    up: torch.Tensor
    down: torch.Tensor
    scale: float
    ds: torch.Tensor | None = None


@dataclass(frozen=True)
class BaseNeed:
    """What one base must provide for one module.

    Attributes:
        left, right: whether its left (U) and right (V) singular vectors are read.
        rank: how many leading columns (None: all p).
        exact: True when they must be the leading singular vectors themselves; False when any
            orthonormal basis of the same span serves (a range basis: a QR of W or W^T).
    """

    left: bool
    right: bool
    rank: int | None
    exact: bool = True


@dataclass(frozen=True)
class ModuleNeeds:
    """What a module's transfer reads of each base (None: nothing)."""

    source: BaseNeed | None
    target: BaseNeed | None


def _both(rank: int | None) -> BaseNeed:
    return BaseNeed(left=True, right=True, rank=rank)


def needs(
    source_shape: tuple[int, int],
    target_shape: tuple[int, int],
    mode: TransferMode | str,
    *,
    rank: int,
    k: int | None = None,
    source_coordinates: bool = False,
) -> ModuleNeeds:
    """What a module of ``source_shape`` carried to ``target_shape`` needs of both bases.

    Args:
        source_shape, target_shape: (m, n) and (m', n').
        mode: the transfer mode.
        rank: r, the update's rank (subspace and copy read r columns).
        k: project mode's rank (None: full thin rank).
        source_coordinates: the update must be read in the source basis first (a compact
            LoRA-X, or copy mode without a known dS).

    Returns:
        :class:`ModuleNeeds`. Project mode, same shape, at full rank: nothing of a square target
        and only the long side's range basis of a rectangular one.
    """
    mode = TransferMode(mode)
    source = _both(rank) if source_coordinates else None
    if mode is not TransferMode.PROJECT:
        if mode is TransferMode.SUBSPACE and source_shape != target_shape:
            source = _both(rank)
        return ModuleNeeds(source, _both(rank))
    m, n = target_shape
    if source_shape != target_shape:
        cap = min(min(source_shape), min(target_shape))
        kk = cap if k is None else min(k, cap)
        return ModuleNeeds(_both(kk), _both(kk))
    kk = min(m, n) if k is None else min(k, m, n)
    left, right = kk < m, kk < n
    if not (left or right):
        return ModuleNeeds(source, None)
    full = kk == min(m, n)
    return ModuleNeeds(source, BaseNeed(left=left, right=right, rank=kk, exact=not full))


def project(pair: Pair, left: torch.Tensor | None, right: torch.Tensor | None) -> Pair:
    """Eq. 3: B' = L (L^T B), A' = (A R) R^T; a side given as None is the identity.

    Args:
        pair: the update (m, n).
        left: (m, k) orthonormal columns spanning the target's left subspace (U_t,k), or None.
        right: (n, k) orthonormal columns spanning its right subspace (V_t,k), or None.

    Returns:
        The projected pair, same shapes and scale; ``ds`` dropped (no LoRA-X form).
    """
    up, down = pair.up.float(), pair.down.float()
    if left is not None:
        up = left @ (left.T @ up)
    if right is not None:
        down = (down @ right) @ right.T
    return Pair(up, down, pair.scale)


def reshaped(pair: Pair, source: Factors, target: Factors, k: int) -> Pair:
    """Section 4.2.2, different shapes: B' = U_t,k (U_s,k^T B), A' = (A V_s,k) V_t,k^T.

    Args:
        pair: the update on the source (m, n).
        source, target: factors of W_s (m, n) and W_t (m', n') holding >= k triplets.
        k: the basis rank, at most min(p_s, p_t).

    Returns:
        The update on the target (m', n'), rank and scale unchanged.
    """
    up = target.U[:, :k] @ (source.U[:, :k].T @ pair.up.float())
    down = (pair.down.float() @ source.V[:, :k]) @ target.V[:, :k].T
    return Pair(up, down, pair.scale)


def subspace(pair: Pair, coordinates: Factors, target: Factors, r: int) -> Pair:
    """k = r: dS' = s (L_r^T B)(A R_r), up = U_t,r, down = (dS' / s) V_t,r^T.

    Args:
        pair: the update on the source.
        coordinates: the factors (L, R) the update is read in: the target's for the same shape,
            the source's when the shapes differ.
        target: the target's factors (>= r triplets).
        r: the result's rank.

    Returns:
        A LoRA-X of the target with a full (r, r) ``ds`` (the true dS: dW' = U_t,r dS' V_t,r^T);
        a zero scale becomes 1 (dS' is 0 then).
    """
    left, right = coordinates.U[:, :r], coordinates.V[:, :r]
    ds = pair.scale * ((left.T @ pair.up.float()) @ (pair.down.float() @ right))
    scale = pair.scale if pair.scale != 0 else 1.0
    return Pair(target.U[:, :r], (ds / scale) @ target.V[:, :r].T, scale, ds)


def copy(ds: torch.Tensor, scale: float, target: Factors, r: int) -> Pair:
    """Table 5 ablation: the source dS on the target's singular vectors, up = U_t,r,
    down = (dS / s) V_t,r^T.

    Args:
        ds: (r,) diagonal or (r, r) dS (at least r entries).
        scale: s of the result (not 0).
        target: the target's factors (>= r triplets).
        r: the rank kept.

    Returns:
        The pair, ``ds`` in the input's form truncated to r.
    """
    ds = ds.float()[:r] if ds.ndim == 1 else ds.float()[:r, :r]
    matrix = torch.diag(ds) if ds.ndim == 1 else ds
    return Pair(target.U[:, :r], (matrix / scale) @ target.V[:, :r].T, scale, ds)
