"""The factors of one weight matrix, and the sign convention every factorization follows.

A weight W of shape (m, n) = (out, in), as in ``nn.Linear``, has the thin SVD
W = U diag(S) V^T with p = min(m, n). :class:`Factors` holds the leading k <= p columns.

Sign convention (applied by :func:`canonical_signs` to every factorization in this package):
singular vectors are defined up to a joint sign flip of (u_i, v_i). We flip each pair so that the
entry of u_i with the largest absolute value is positive (the first such entry on ties). This
makes factors of the same tensor identical across runs, devices and cache hits, which matters for
full dS, plain LoRA and different-shape transfers, where the coordinates in the basis are used
directly (DESIGN.md, "Transfer, different shape").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Factors", "canonical_signs"]


def canonical_signs(u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip singular-vector pairs to the package's sign convention.

    Args:
        u: left singular vectors, shape (..., m, k).
        v: right singular vectors, shape (..., n, k) (columns, not rows of V^T).

    Returns:
        (u, v) with column i of both multiplied by sign(u[argmax |u[:, i]|, i]). New tensors; the
        inputs are not modified.
    """
    idx = u.abs().argmax(dim=-2, keepdim=True)  # (..., 1, k): first index of the largest |entry|
    signs = torch.sign(torch.gather(u, -2, idx))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return u * signs, v * signs


@dataclass(frozen=True, eq=False)
class Factors:
    """Leading singular triplets of one weight matrix.

    Attributes:
        U: (m, k) left singular vectors, orthonormal columns.
        S: (k,) singular values, descending, non-negative.
        V: (n, k) right singular vectors (columns), orthonormal.
        shape: (m, n) of the factorized matrix.
        exact: True when computed by a full thin SVD (then k may reach p = min(m, n));
            False for the randomized top-k path, which is meant for similarity only.
        digest: content digest of the factorized tensor ("" when unknown).
    """

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor
    shape: tuple[int, int]
    exact: bool = True
    digest: str = ""

    def __post_init__(self) -> None:
        m, n = self.shape
        k = self.S.shape[0]
        if self.U.shape != (m, k) or self.V.shape != (n, k):
            raise ValueError(
                f"inconsistent factors: U {tuple(self.U.shape)}, S {tuple(self.S.shape)}, "
                f"V {tuple(self.V.shape)} for a matrix of shape {self.shape}"
            )

    @property
    def rank(self) -> int:
        """k, the number of singular triplets held."""
        return int(self.S.shape[0])

    @property
    def full_rank(self) -> int:
        """p = min(m, n), the rank of the thin SVD."""
        return min(self.shape)

    @property
    def complete(self) -> bool:
        """True when these are all p triplets of an exact thin SVD."""
        return self.exact and self.rank == self.full_rank

    def truncate(self, k: int) -> Factors:
        """The leading k triplets (k <= rank)."""
        if k > self.rank:
            raise ValueError(f"cannot truncate factors of rank {self.rank} to {k}")
        if k == self.rank:
            return self
        return Factors(
            U=self.U[:, :k],
            S=self.S[:k],
            V=self.V[:, :k],
            shape=self.shape,
            exact=self.exact,
            digest=self.digest,
        )

    def to(self, device: torch.device | str) -> Factors:
        """A copy on another device."""
        return Factors(
            U=self.U.to(device),
            S=self.S.to(device),
            V=self.V.to(device),
            shape=self.shape,
            exact=self.exact,
            digest=self.digest,
        )
