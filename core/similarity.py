"""Subspace similarity of weight matrices (paper eq. 4 and eq. 5) and pair validity (appendix D).

For orthonormal U_A (m, >= k) and U_B (m, >= k):

    Psi_k(U_A, U_B) = ||U_A,k^T U_B,k||_F^2 / k = sum_ij <u_A^i, u_B^j>^2 / k  in [0, 1]   (eq. 4)

Left similarity uses U, right similarity V (Phi_l, Phi_r). k must be a truncation: at k = p a
square matrix has Psi = 1 with any other (DESIGN.md, "Subspace similarity"). The weighted variant
(appendix C, eq. 5) weighs each triplet by its singular value:

    Phi_w = sum_ij s_A^i s_B^j <u_A^i, u_B^j>^2 / (sqrt(sum_i (s_A^i)^2) sqrt(sum_j (s_B^j)^2))

which is ||A^T B||_F^2 / (||A^T A||_F ||B^T B||_F) for A = U_A diag(sqrt s_A) and lies in [0, 1]
by Cauchy-Schwarz. All products run in float64.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from core.selection import RoleRule, role_of

__all__ = [
    "ModuleRef",
    "NamedShape",
    "pair_validity",
    "side_reasons",
    "side_validity",
    "similarity_matrix",
    "subspace_similarity",
    "subspace_similarity_batch",
    "weighted_subspace_similarity",
]

_BLOCK_BYTES = 64 << 20  # bound on one Gram block of similarity_matrix


class NamedShape(Protocol):
    """Anything with a module name and an (m, n) shape (:class:`ModuleInfo`, :class:`ModuleRef`)."""

    @property
    def name(self) -> str: ...

    @property
    def shape(self) -> tuple[int, int]: ...


@dataclass(frozen=True)
class ModuleRef:
    """A module name with its weight shape (m, n)."""

    name: str
    shape: tuple[int, int]


def _check(u_a: torch.Tensor, u_b: torch.Tensor, k: int) -> None:
    if u_a.shape[-2] != u_b.shape[-2]:
        raise ValueError(f"bases of different dimensions: {u_a.shape[-2]} vs {u_b.shape[-2]}")
    if not 1 <= k <= min(u_a.shape[-1], u_b.shape[-1]):
        raise ValueError(
            f"k = {k} must be in [1, {min(u_a.shape[-1], u_b.shape[-1])}] (columns held)"
        )


def subspace_similarity_batch(
    u_a: torch.Tensor,
    u_b: torch.Tensor,
    k: int,
    s_a: torch.Tensor | None = None,
    s_b: torch.Tensor | None = None,
) -> torch.Tensor:
    """Psi_k for b pairs at once (eq. 4; eq. 5 when singular values are given).

    Args:
        u_a, u_b: (b, m, >= k) orthonormal columns (U for left, V for right similarity).
        k: the similarity rank.
        s_a, s_b: (b, >= k) singular values for the weighted variant (eq. 5), or None.

    Returns:
        (b,) float64 similarities in [0, 1].
    """
    _check(u_a, u_b, k)
    a, b = u_a[..., :k].double(), u_b[..., :k].double()
    gram = (a.mT @ b).square()  # (b, k, k): <u_A^i, u_B^j>^2
    if s_a is None or s_b is None:
        return (gram.sum(dim=(-2, -1)) / k).clamp(0.0, 1.0)
    wa, wb = s_a[..., :k].double(), s_b[..., :k].double()
    num = (wa.unsqueeze(-1) * gram * wb.unsqueeze(-2)).sum(dim=(-2, -1))
    den = wa.square().sum(-1).sqrt() * wb.square().sum(-1).sqrt()
    return torch.where(den > 0, num / den.clamp_min(1e-300), 0.0).clamp(0.0, 1.0)


def subspace_similarity(u_a: torch.Tensor, u_b: torch.Tensor, k: int) -> float:
    """Psi_k(U_A, U_B) = ||U_A,k^T U_B,k||_F^2 / k (eq. 4), in [0, 1].

    Args:
        u_a: (m, >= k) orthonormal columns; u_b: (m, >= k).
        k: similarity rank, 1 <= k <= columns of both.

    Raises:
        ValueError: different m, or k out of range.
    """
    return float(subspace_similarity_batch(u_a.unsqueeze(0), u_b.unsqueeze(0), k)[0])


def weighted_subspace_similarity(
    u_a: torch.Tensor, s_a: torch.Tensor, u_b: torch.Tensor, s_b: torch.Tensor, k: int
) -> float:
    """Singular-value-weighted similarity (appendix C, eq. 5) of the leading k triplets.

    Args:
        u_a: (m, >= k), s_a: (>= k,) of one matrix; u_b, s_b of the other.
        k: similarity rank.

    Returns:
        sum_ij s_a^i s_b^j <u_a^i, u_b^j>^2 / (||s_a,k|| ||s_b,k||) in [0, 1]; 0 when either
        matrix is zero.
    """
    return float(
        subspace_similarity_batch(
            u_a.unsqueeze(0), u_b.unsqueeze(0), k, s_a.unsqueeze(0), s_b.unsqueeze(0)
        )[0]
    )


def similarity_matrix(
    u_a: torch.Tensor,
    u_b: torch.Tensor,
    k: int,
    s_a: torch.Tensor | None = None,
    s_b: torch.Tensor | None = None,
) -> torch.Tensor:
    """Psi_k for every pair of two stacks (eq. 4, or eq. 5 with singular values).

    One GEMM per block: the S x k columns of the first stack against the T x k of the second,
    (S k, m) @ (m, T k), then squared and summed per k x k block; source rows are processed in
    chunks so a block stays under 64 MiB.

    Args:
        u_a: (S, m, >= k); u_b: (T, m, >= k).
        k: similarity rank.
        s_a: (S, >= k) and s_b: (T, >= k) for the weighted variant, or None.

    Returns:
        (S, T) float64 in [0, 1].
    """
    _check(u_a, u_b, k)
    n_a, m, n_b = u_a.shape[0], u_a.shape[1], u_b.shape[0]
    a, b = u_a[..., :k].double(), u_b[..., :k].double()
    weighted = s_a is not None and s_b is not None
    if weighted:
        assert s_a is not None and s_b is not None
        wa, wb = s_a[..., :k].double(), s_b[..., :k].double()
        a, b = a * wa.sqrt().unsqueeze(1), b * wb.sqrt().unsqueeze(1)
    right = b.permute(1, 0, 2).reshape(m, n_b * k)  # (m, T k)
    out = torch.empty(n_a, n_b, dtype=torch.float64)
    chunk = max(1, _BLOCK_BYTES // (8 * k * k * max(n_b, 1)))
    for start in range(0, n_a, chunk):
        left = a[start : start + chunk].mT.reshape(-1, m)  # (c k, m)
        block = (left @ right).reshape(-1, k, n_b, k).square().sum(dim=(1, 3))
        out[start : start + chunk] = block
    if not weighted:
        return (out / k).clamp(0.0, 1.0)
    den = wa.square().sum(-1).sqrt().unsqueeze(1) * wb.square().sum(-1).sqrt().unsqueeze(0)
    return torch.where(den > 0, out / den.clamp_min(1e-300), 0.0).clamp(0.0, 1.0)


def _role_reason(role_s: str, role_t: str) -> str | None:
    if role_s != role_t:
        return f"different roles ({role_s} vs {role_t}; appendix D b)"
    return None


def side_reasons(
    role_s: str, shape_s: Sequence[int], role_t: str, shape_t: Sequence[int]
) -> tuple[str | None, str | None]:
    """(left reason, right reason) for roles and shapes already known; None means valid.

    Left similarity compares U (m rows): it needs m = m'. Right compares V (n rows): n = n'.
    """
    role = _role_reason(role_s, role_t)
    if role is not None:
        return role, role
    (m, n), (m2, n2) = shape_s, shape_t
    left = None if m == m2 else f"left bases differ in dimension ({m} vs {m2} rows)"
    right = None if n == n2 else f"right bases differ in dimension ({n} vs {n2} columns)"
    return left, right


def side_validity(
    source: NamedShape, target: NamedShape, rule: RoleRule | None = None
) -> tuple[str | None, str | None]:
    """Why the left and the right similarity of a pair are invalid (None: valid).

    Appendix D: invalid when (a) the shapes do not allow the comparison (left needs equal rows
    m = m', right equal columns n = n') or (b) the modules play different roles
    (:func:`core.selection.role_of`).
    """
    return side_reasons(
        role_of(source.name, rule), source.shape, role_of(target.name, rule), target.shape
    )


def pair_validity(
    source: NamedShape, target: NamedShape, rule: RoleRule | None = None
) -> str | None:
    """Why a (source, target) module pair cannot be compared at all, or None if it can.

    A pair is invalid (appendix D) when the roles differ, or when both dimensions differ so that
    neither the left nor the right similarity exists. A pair with one dimension in common is
    valid on that side only (see :func:`side_validity`); its other side counts as 0.
    """
    left, right = side_validity(source, target, rule)
    if left is None or right is None:
        return None
    if left == right:
        return left
    (m, n), (m2, n2) = source.shape, target.shape
    return f"different shapes ({m} x {n} vs {m2} x {n2}; appendix D a)"
