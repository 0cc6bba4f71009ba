"""Adapter Transferability Cost between two base models (section 4.2.4, appendix D).

Source modules i = 1..S, target modules j = 1..T. With Phi_ij the subspace similarity of
(W_s^i, W_t^j) at rank k (eq. 4, or eq. 5 when weighted; 0 for invalid pairs), the cost is
C = 1 - Phi and the plan X* solves the exact optimal-transport problem with uniform marginals

    min_X <C, X>   s.t.  X 1_T = 1_S / S,  X^T 1_S = 1_T / T,  X >= 0,

by the network simplex (``ot.emd``). ATC = <C, X*> in [0, 1]. It is computed for the left (U)
and right (V) similarity; a combination of the two decides.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import ot
import torch

from core.errors import TransportError
from core.factors import Factors
from core.selection import RoleRule, role_of
from core.similarity import side_reasons, similarity_matrix
from core.vocabulary import Combine

__all__ = ["ATCResult", "Combine", "compute_atc", "solve_transport"]


def solve_transport(cost: np.ndarray) -> np.ndarray:
    """Exact OT plan with uniform marginals for an (S, T) cost matrix (``ot.emd``, float64).

    Returns:
        X* (S, T), rows summing to 1/S and columns to 1/T.

    Raises:
        TransportError: the solver did not report an optimal solution (``result_code`` != 1, or
            a warning such as reaching ``numItermax``).
    """
    s, t = cost.shape
    a, b = np.full(s, 1.0 / s), np.full(t, 1.0 / t)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan, log = ot.emd(
            a,
            b,
            np.ascontiguousarray(cost, dtype=np.float64),
            numItermax=max(100_000, 50 * (s + t) ** 2),
            log=True,
        )
    if log.get("result_code") != 1 or caught:
        why = log.get("warning") or "; ".join(str(w.message) for w in caught)
        raise TransportError(f"ot.emd did not reach an optimal plan ({s} x {t}): {why}")
    return np.asarray(plan, dtype=np.float64)


def _frozen(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


@dataclass(frozen=True, eq=False)
class ATCResult:
    """Similarities, plans and costs of one (source, target, k) comparison.

    All arrays are (S, T) float64 (bool for validity), read-only, rows = source modules in
    ``source_names`` order, columns = target modules in ``target_names`` order.

    Attributes:
        phi_left, phi_right: similarities on U and on V (0 where that side is invalid).
        phi: their combination (``combine``), used for matching.
        valid_left, valid_right: where each side is defined (appendix D).
        plan_left, plan_right, plan: optimal plans for costs 1 - phi_left, 1 - phi_right,
            1 - phi.
        atc_left, atc_right: <1 - phi_side, plan_side>; atc: their combination.
    """

    source_names: tuple[str, ...]
    target_names: tuple[str, ...]
    source_shapes: tuple[tuple[int, int], ...]
    target_shapes: tuple[tuple[int, int], ...]
    source_roles: tuple[str, ...]
    target_roles: tuple[str, ...]
    k: int
    weighted: bool
    combine: Combine
    phi_left: np.ndarray
    phi_right: np.ndarray
    phi: np.ndarray
    valid_left: np.ndarray
    valid_right: np.ndarray
    plan_left: np.ndarray
    plan_right: np.ndarray
    plan: np.ndarray
    atc_left: float
    atc_right: float
    atc: float

    @property
    def cost_left(self) -> np.ndarray:
        """C_left = 1 - phi_left."""
        return 1.0 - self.phi_left

    @property
    def cost_right(self) -> np.ndarray:
        """C_right = 1 - phi_right."""
        return 1.0 - self.phi_right

    @property
    def cost(self) -> np.ndarray:
        """C = 1 - phi (combined)."""
        return 1.0 - self.phi

    @property
    def valid(self) -> np.ndarray:
        """Pairs comparable on at least one side."""
        return self.valid_left | self.valid_right

    @property
    def source_marginal(self) -> np.ndarray:
        """Uniform source marginal, 1/S each."""
        return np.full(len(self.source_names), 1.0 / len(self.source_names))

    @property
    def target_marginal(self) -> np.ndarray:
        """Uniform target marginal, 1/T each."""
        return np.full(len(self.target_names), 1.0 / len(self.target_names))

    def source_index(self, name: str) -> int:
        """Row of source module ``name`` (KeyError if absent)."""
        return _index(self.source_names, name)

    def target_index(self, name: str) -> int:
        """Column of target module ``name`` (KeyError if absent)."""
        return _index(self.target_names, name)

    def reasons(self, source: str, target: str) -> tuple[str | None, str | None]:
        """Why the left / right similarity of a pair is invalid (None where valid)."""
        i, j = self.source_index(source), self.target_index(target)
        return side_reasons(
            self.source_roles[i], self.source_shapes[i], self.target_roles[j], self.target_shapes[j]
        )

    def reason(self, source: str, target: str) -> str | None:
        """Why a pair cannot be compared at all (appendix D), or None."""
        left, right = self.reasons(source, target)
        if left is None or right is None:
            return None
        return left if left == right else f"{left}; {right}"


def _index(names: tuple[str, ...], name: str) -> int:
    try:
        return names.index(name)
    except ValueError:
        raise KeyError(name) from None


def _groups(keys: Sequence[tuple[str, int, int]]) -> dict[tuple[str, int, int], list[int]]:
    """Module indices by similarity group (role, dimension, k), in module order."""
    rows: dict[tuple[str, int, int], list[int]] = {}
    for i, key in enumerate(keys):
        rows.setdefault(key, []).append(i)
    return rows


def _stack(
    bases: Sequence[torch.Tensor], sv: Sequence[torch.Tensor] | None, idx: list[int], k: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One group's stacked bases (g, dim, k) and singular values (g, k), in float64."""
    stack = torch.stack([bases[i][:, :k] for i in idx]).double()
    values = torch.stack([sv[i][:k] for i in idx]).double() if sv is not None else None
    return stack, values


def _side(
    bases: Sequence[torch.Tensor],
    other: Sequence[torch.Tensor],
    sv: Sequence[torch.Tensor] | None,
    other_sv: Sequence[torch.Tensor] | None,
    keys: Sequence[tuple[str, int, int]],
    other_keys: Sequence[tuple[str, int, int]],
) -> tuple[np.ndarray, np.ndarray]:
    """Similarities of one side, grouped by (role, dimension, k): one GEMM per group pair.

    Stacks are built one group pair at a time and freed after it, so the float64 copies held
    at once are those of the largest pair of groups, not of every module of both bases."""
    phi = np.zeros((len(bases), len(other)))
    valid = np.zeros((len(bases), len(other)), dtype=bool)
    others = _groups(other_keys)
    for (role, dim, k_a), rows in _groups(keys).items():
        matching = [(k_b, cols) for (r, d, k_b), cols in others.items() if (r, d) == (role, dim)]
        if not matching:
            continue
        a, s_a = _stack(bases, sv, rows, k_a)
        for k_b, cols in matching:
            kk = min(k_a, k_b)
            b, s_b = _stack(other, other_sv, cols, kk)
            block = similarity_matrix(
                a[..., :kk],
                b,
                kk,
                None if s_a is None else s_a[:, :kk],
                s_b,
            )
            phi[np.ix_(rows, cols)] = block.numpy()
            valid[np.ix_(rows, cols)] = True
            del b, s_b  # freed before the next group's stack is built
        del a, s_a
    return phi, valid


@dataclass(frozen=True)
class _Side:
    """One base's modules as the similarity needs them."""

    names: tuple[str, ...]
    factors: tuple[Factors, ...]
    ks: tuple[int, ...]
    roles: tuple[str, ...]

    @classmethod
    def of(cls, mapping: Mapping[str, Factors], k: int, rule: RoleRule | None) -> _Side:
        names = tuple(mapping)
        factors = tuple(mapping[name] for name in names)
        for name, f in zip(names, factors, strict=True):
            if f.rank < min(k, f.full_rank):
                raise ValueError(f"factors of {name} hold {f.rank} triplets; k = {k} needs more")
        ks = tuple(min(k, f.full_rank) for f in factors)
        return cls(names, factors, ks, tuple(role_of(name, rule) for name in names))

    def keys(self, dim: int) -> list[tuple[str, int, int]]:
        """(role, rows of U (dim 0) or V (dim 1), k) per module: the similarity groups."""
        return [
            (r, f.shape[dim], kk)
            for r, f, kk in zip(self.roles, self.factors, self.ks, strict=True)
        ]

    def values(self, weighted: bool) -> list[torch.Tensor] | None:
        return [f.S for f in self.factors] if weighted else None


def _same_tensors(source: Sequence[Factors], target: Sequence[Factors]) -> list[tuple[int, int]]:
    """Pairs known to be the same matrix: the same factors, or equal content digests. They span
    the same subspaces, so their Phi is 1 exactly, not 1 minus the orthonormality error of
    float32 factors (about 1e-7 per entry, 1e-6 in Psi)."""
    by_digest: dict[str, list[int]] = {}
    by_id: dict[int, list[int]] = {}
    for j, f in enumerate(target):
        by_id.setdefault(id(f), []).append(j)
        if f.digest:
            by_digest.setdefault(f.digest, []).append(j)
    pairs: list[tuple[int, int]] = []
    for i, f in enumerate(source):
        same = set(by_id.get(id(f), [])) | set(by_digest.get(f.digest, []) if f.digest else [])
        pairs.extend((i, j) for j in sorted(same))
    return pairs


def compute_atc(
    source: Mapping[str, Factors],
    target: Mapping[str, Factors],
    *,
    k: int,
    weighted: bool = False,
    role_rule: RoleRule | None = None,
    combine: Combine | str = Combine.MEAN,
) -> ATCResult:
    """Similarities, optimal plans and the ATC of two bases (section 4.2.4, appendix D).

    Each module's similarity rank is min(k, p); a pair uses the smaller of its two. Pairs are
    grouped by (role, rows) for the left and (role, columns) for the right similarity and each
    group pair is one batched GEMM (:func:`core.similarity.similarity_matrix`).

    Args:
        source: module name -> factors holding at least min(k, p) triplets (S modules).
        target: the same for the target base (T modules).
        k: similarity rank (``similarity_rank``); should be < p (a truncation).
        weighted: use eq. 5 instead of eq. 4.
        role_rule: how names map to roles (default: numeric segments wildcarded).
        combine: how left and right combine (:class:`Combine`).

    Returns:
        An :class:`ATCResult`. For a model against itself: Phi_ii = 1, the plan is the identity
        / S and ATC = 0 exactly: pairs of the same factors or equal content digests get Phi = 1.

    Raises:
        ValueError: empty inputs, k < 1, or factors holding fewer than min(k, p) triplets.
        TransportError: ``ot.emd`` did not reach an optimal plan.
    """
    how = Combine(combine)
    if k < 1:
        raise ValueError(f"similarity rank k must be positive, got {k}")
    if not source or not target:
        raise ValueError("ATC needs at least one source and one target module")
    s_side, t_side = _Side.of(source, k, role_rule), _Side.of(target, k, role_rule)
    s_f, t_f = s_side.factors, t_side.factors
    phi_l, valid_l = _side(
        [f.U for f in s_f], [f.U for f in t_f], s_side.values(weighted), t_side.values(weighted),
        s_side.keys(0), t_side.keys(0),
    )  # fmt: skip
    phi_r, valid_r = _side(
        [f.V for f in s_f], [f.V for f in t_f], s_side.values(weighted), t_side.values(weighted),
        s_side.keys(1), t_side.keys(1),
    )  # fmt: skip
    for i, j in _same_tensors(s_f, t_f):
        phi_l[i, j] = 1.0 if valid_l[i, j] else 0.0
        phi_r[i, j] = 1.0 if valid_r[i, j] else 0.0
    s_names, t_names, s_roles, t_roles = s_side.names, t_side.names, s_side.roles, t_side.roles
    phi = how.phi(phi_l, phi_r)
    plans = [solve_transport(1.0 - x) for x in (phi_l, phi_r, phi)]
    atc_l = float(np.sum((1.0 - phi_l) * plans[0]))
    atc_r = float(np.sum((1.0 - phi_r) * plans[1]))
    return ATCResult(
        source_names=s_names,
        target_names=t_names,
        source_shapes=tuple(f.shape for f in s_f),
        target_shapes=tuple(f.shape for f in t_f),
        source_roles=s_roles,
        target_roles=t_roles,
        k=k,
        weighted=weighted,
        combine=how,
        phi_left=_frozen(phi_l),
        phi_right=_frozen(phi_r),
        phi=_frozen(phi),
        valid_left=_frozen(valid_l),
        valid_right=_frozen(valid_r),
        plan_left=_frozen(plans[0]),
        plan_right=_frozen(plans[1]),
        plan=_frozen(plans[2]),
        atc_left=atc_l,
        atc_right=atc_r,
        atc=how.cost(atc_l, atc_r),
    )
