"""The factors of one weight matrix, and the sign convention every factorization follows.

A weight W of shape (m, n) = (out, in), as in ``nn.Linear``, has the thin SVD
W = U diag(S) V^T with p = min(m, n). :class:`Factors` holds the leading k <= p columns;
:class:`RangeBasis` holds only what project mode at full thin rank needs (Algorithm 1): an
orthonormal basis of the range of W's long side (or of its orthogonal complement).

Sign convention (applied by :func:`canonical_signs` to every factorization in this package):
singular vectors are defined up to a joint sign flip of (u_i, v_i). We flip each pair so that the
entry of u_i with the largest absolute value is positive (the first such entry on ties). This
makes factors of the same tensor identical across runs, devices and cache hits, which matters for
full dS, plain LoRA and different-shape transfers, where the coordinates in the basis are used
directly (DESIGN.md, "Transfer, different shape").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

__all__ = ["BasisMethod", "Factors", "RangeBasis", "Side", "canonical_signs"]

Side = Literal["left", "right", "none"]
BasisMethod = Literal["qr", "svd", "identity"]


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


@dataclass(frozen=True, eq=False)
class RangeBasis:
    """The projectors of eq. 3 at full thin rank k = p for one weight W (m, n), nothing more.

    At k = p the short side's factor is square and orthogonal, so its projector is the identity
    (V V^T = I when m > n, U U^T = I when m < n, both when m = n); the long side's projector
    onto range(W) (m > n: U U^T) or range(W^T) (m < n: V V^T) is Q Q^T for any orthonormal
    basis Q of that range: a QR of W (or W^T) gives one exactly when W has full column (row)
    rank. Where the complement is the smaller of the two, it is stored instead:
    P = I - N N^T with N an orthonormal basis of range(W)^perp (the long side has L - p < p).

    Attributes:
        shape: (m, n) of W.
        side: ``"left"`` (basis in R^m, m > n), ``"right"`` (basis in R^n, m < n), ``"none"``
            (square: both projectors are the identity, nothing is stored).
        basis: (L, c) orthonormal columns (L = max(m, n); c = p, or L - p when ``complement``),
            float32; None when ``side`` is ``"none"``.
        complement: True when ``basis`` spans the orthogonal complement of the range.
        method: ``"qr"`` (Householder QR of the long-side matrix), ``"svd"`` (the SVD's U or V:
            the fallback for a rank-deficient W, and the basis derived from cached full factors),
            ``"identity"`` (square).
        digest: content digest of W ("" when unknown).
    """

    shape: tuple[int, int]
    side: Side
    basis: torch.Tensor | None
    complement: bool = False
    method: BasisMethod = "qr"
    digest: str = ""

    def __post_init__(self) -> None:
        m, n = self.shape
        side: Side = "none" if m == n else ("left" if m > n else "right")
        if self.side != side:
            raise ValueError(f"a {m} x {n} weight's range basis is on side {side!r}")
        if side == "none":
            if self.basis is not None:
                raise ValueError("a square weight's range basis holds no tensor")
            return
        long, p = max(m, n), min(m, n)
        cols = long - p if self.complement else p
        if self.basis is None or tuple(self.basis.shape) != (long, cols):
            got = None if self.basis is None else tuple(self.basis.shape)
            raise ValueError(
                f"range basis of a {m} x {n} weight must be ({long}, {cols}), got {got}"
            )

    @classmethod
    def identity(cls, shape: tuple[int, int], digest: str = "") -> RangeBasis:
        """The basis of a square weight: both projectors are the identity."""
        if shape[0] != shape[1]:
            raise ValueError(f"only a square weight has identity projectors, not {shape}")
        return cls(shape, "none", None, method="identity", digest=digest)

    @classmethod
    def from_factors(cls, factors: Factors) -> RangeBasis:
        """The basis held by complete exact factors (U when m > n, V when m < n).

        Raises:
            ValueError: factors that are not all p triplets of an exact SVD.
        """
        m, n = factors.shape
        if m == n:
            return cls.identity(factors.shape, factors.digest)
        if not factors.complete:
            raise ValueError("a range basis needs complete exact factors")
        side: Side = "left" if m > n else "right"
        basis = factors.U if m > n else factors.V
        return cls(factors.shape, side, basis, method="svd", digest=factors.digest)

    @property
    def rank(self) -> int:
        """k = p = min(m, n): the rank of the projection these projectors make."""
        return min(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored basis."""
        return 0 if self.basis is None else self.basis.numel() * self.basis.element_size()

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        """P x for x (L, r): Q (Q^T x), or x - N (N^T x); right to left, never L x L."""
        assert self.basis is not None
        q = self.basis.to(device=x.device, dtype=x.dtype)
        inner = q @ (q.T @ x)
        return x - inner if self.complement else inner

    def project_up(self, up: torch.Tensor) -> torch.Tensor:
        """B' = U U^T B for the up factor B (m, r): the identity unless ``side`` is left."""
        return self._project(up) if self.side == "left" else up

    def project_down(self, down: torch.Tensor) -> torch.Tensor:
        """A' = A V V^T for the down factor A (r, n): the identity unless ``side`` is right."""
        return self._project(down.T).T if self.side == "right" else down

    def to(self, device: torch.device | str) -> RangeBasis:
        """A copy on another device."""
        basis = None if self.basis is None else self.basis.to(device)
        return RangeBasis(self.shape, self.side, basis, self.complement, self.method, self.digest)
