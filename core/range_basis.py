"""Range bases of same-shape weight batches: what project mode needs at full thin rank.

For W (m, n) with m != n, the long-side matrix M (L, p) is W when m > n and W^T when m < n
(L = max(m, n), p = min(m, n)). A Householder QR M = Q R (``torch.geqrf``, batched, on the CPU
or CUDA) gives an orthonormal basis Q of range(M) when M has full column rank p: then
Q Q^T = U U^T (m > n) or V V^T (m < n) exactly, the projector Algorithm 1 forms from the SVD.
A QR costs about a fifth of the SVD here (2048 x 1280: 0.23 s against 1.04 s on one thread).

Which basis is stored: the range (p columns, ``torch.linalg.householder_product``) or, when the
complement is smaller (L - p < p, e.g. 2048 x 1280: 768 columns against 1280), an orthonormal
basis N of range(M)^perp (``torch.ormqr`` applied to the last L - p columns of the identity),
with P = I - N N^T. Both come from the same QR.

Rank check (M = Q R, so sigma(R) = sigma(M)): M is treated as rank-deficient when an estimate
of sigma_min(R) is at most tol = L * eps(float32) * c, with c the largest column norm of M
(sigma_max / sqrt(p) <= c <= sigma_max; ``numpy.linalg.matrix_rank`` uses L * eps * sigma_max).
The estimate is the smallest |R_ii| (an upper bound of sigma_min) and then inverse iteration on
R^T R (triangular solves, a few milliseconds for p = 1280; a sigma_min far below the rest is found
in a step or two). Such a matrix falls back to its thin SVD: the basis is its U or V
(``method="svd"``), as in Algorithm 1, whose trailing columns complete a range of dimension < p
arbitrarily (the SVD's choice).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from core.errors import FactorizationError
from core.factors import RangeBasis, Side
from core.finite import all_finite
from core.svd import resolve_device, stack_batch

__all__ = ["range_basis", "range_basis_batch", "stores_complement"]

_ESTIMATE_STEPS = 3


def stores_complement(shape: tuple[int, int]) -> bool:
    """Whether a rectangular weight's basis is stored as the range's complement (L - p < p)."""
    long, p = max(shape), min(shape)
    return long != p and long - p < p


def _sigma_min(a: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """Estimates (from above) of sigma_min(R) for the R factors held in geqrf results (b, L, p)
    (those flagged in ``skip`` (b,) get a meaningless 1).

    Inverse iteration on R^T R, two triangular solves a step (they read only R's triangle: one
    copy of the p x p block, LAPACK's layout, and no masking); the start vector is fixed, so it
    is reproducible. A sigma_min far below the others, the case that matters, is found in a step
    or two.
    """
    b, _, p = a.shape
    lower = a.mT[..., :p].contiguous()  # R^T; its .mT is R, column-major
    eye = torch.eye(p, dtype=a.dtype, device=a.device)
    lower[skip] = eye  # matrices already known to be deficient: solve something harmless
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(p, 1, generator=gen).to(device=a.device, dtype=a.dtype)
    y = y.expand(b, p, 1).contiguous()
    for _ in range(_ESTIMATE_STEPS):
        y = torch.linalg.solve_triangular(lower, y, upper=False)
        y = torch.linalg.solve_triangular(lower.mT, y, upper=True)
        y = y / y.norm(dim=-2, keepdim=True).clamp_min(1e-30)
    # ||R y|| by one more solve: R^T R y = lambda y gives ||R y|| = 1 / ||R^-T y||
    w = torch.linalg.solve_triangular(lower, y, upper=False)
    return 1.0 / w.norm(dim=(-2, -1)).clamp_min(1e-30)


def _deficient(a: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(b,) bools: whether each matrix is numerically rank-deficient (module docstring).

    Args:
        a: geqrf results (b, L, p).
        scale: (b,) the largest column norm of each matrix, a lower bound of sigma_max (and at
            least sigma_max / sqrt(p)).
    """
    long, p = a.shape[-2:]
    diag = torch.diagonal(a[..., :p, :], dim1=-2, dim2=-1).abs()
    tol = long * torch.finfo(torch.float32).eps * scale
    bad = (diag.amin(-1) <= tol) | ~torch.isfinite(diag).all(-1)
    if bool(bad.all()):
        return bad
    # a NaN estimate counts as deficient; the ones already known are left as they are
    return bad | ~(_sigma_min(a, bad) > tol)


def _qr_bases(long_side: torch.Tensor, complement: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(bases, deficient) from one batched QR of the long-side matrices (b, L, p)."""
    scale = long_side.norm(dim=-2).amax(-1)
    a, tau = torch.geqrf(long_side)
    deficient = _deficient(a, scale)
    if complement:
        b, long, p = long_side.shape
        tail = torch.zeros(long, long - p, dtype=a.dtype, device=a.device)
        tail[p:] = torch.eye(long - p, dtype=a.dtype, device=a.device)
        bases = torch.ormqr(a, tau, tail.expand(b, long, long - p).contiguous())
    else:
        bases = torch.linalg.householder_product(a, tau)
    return bases, deficient


def _svd_basis(w: torch.Tensor) -> torch.Tensor:
    """The SVD fallback for one (m, n) weight: U (m > n) or V (m < n) of ``svd(W)`` itself, as
    Algorithm 1 computes it (so even the arbitrary completion of a deficient range agrees)."""
    u, _, vh = torch.linalg.svd(w, full_matrices=False)
    return u if w.shape[0] > w.shape[1] else vh.mT


def range_basis_batch(
    matrices: Sequence[torch.Tensor],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    digests: Sequence[str] | None = None,
) -> tuple[RangeBasis, ...]:
    """Range bases of same-shape weights in one batched QR (see the module docstring).

    Square weights need nothing: their bases are :meth:`RangeBasis.identity`, computed from the
    shape alone (the matrices are not read).

    Args:
        matrices: b >= 1 finite matrices, each (m, n); float16/bfloat16 computed in ``dtype``.
        device: where to compute (``"cpu"``, ``"cuda"``, ``"auto"``).
        dtype: compute dtype (float32, or float64); bases are returned as float32.
        digests: content digests to record in each basis.

    Returns:
        b :class:`RangeBasis` (float32, CPU, contiguous), in input order: ``method="qr"``, or
        ``"svd"`` for a rank-deficient matrix.

    Raises:
        ValueError: empty input, mixed shapes, non-2-D input.
        NonFiniteError: an input holding NaN or Inf.
        FactorizationError: the QR or SVD failed or returned non-finite bases.
    """
    if not matrices:
        raise ValueError("a factorization needs at least one matrix")
    m, n = (int(x) for x in matrices[0].shape)
    if m == n and all(tuple(w.shape) == (m, n) for w in matrices):
        return tuple(
            RangeBasis.identity((m, n), digests[i] if digests else "") for i in range(len(matrices))
        )
    stack = stack_batch(matrices, resolve_device(device), dtype, digests)
    side: Side = "left" if m > n else "right"
    long_side = stack if m > n else stack.mT
    complement = stores_complement((m, n))
    try:
        bases, deficient = _qr_bases(long_side, complement)
        fallback = [int(i) for i in deficient.nonzero().flatten()]
        svd_bases = {i: _svd_basis(stack[i]) for i in fallback}
    except RuntimeError as exc:  # torch.linalg.LinAlgError derives from RuntimeError
        raise FactorizationError(f"QR of a {m} x {n} batch failed: {exc}") from exc
    out = []
    for i in range(len(matrices)):
        basis = svd_bases.get(i, bases[i])
        basis = basis.to(device="cpu", dtype=torch.float32).contiguous().clone()
        if not all_finite(basis):
            raise FactorizationError(f"QR of a {m} x {n} batch returned a non-finite basis")
        out.append(
            RangeBasis(
                (m, n),
                side,
                basis,
                complement=complement and i not in svd_bases,
                method="svd" if i in svd_bases else "qr",
                digest=digests[i] if digests else "",
            )
        )
    return tuple(out)


def range_basis(
    matrix: torch.Tensor,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    digest: str = "",
) -> RangeBasis:
    """The range basis of one weight; see :func:`range_basis_batch`."""
    return range_basis_batch(
        [matrix], device=device, dtype=dtype, digests=[digest] if digest else None
    )[0]
