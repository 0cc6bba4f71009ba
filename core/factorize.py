"""Factorizations of base weights: the public entry points, one import away.

W (m, n) = U diag(S) V^T, p = min(m, n) (DESIGN.md, "The math"). The parts live by concern:

- :mod:`core.svd`: :func:`factorize` / :func:`factorize_batch`, exact thin SVDs and the
  randomized (block Krylov) top-k SVD of assessments, with its accuracy bound;
- :mod:`core.range_basis`: :func:`range_basis_batch`, the QR range bases project mode needs at
  full thin rank (:class:`core.factors.RangeBasis`);
- :mod:`core.factor_cache`: :class:`FactorCache`, entries on disk by content digest, LRU under
  a size cap, shared safely by several processes (:mod:`core.cache_files`);
- :mod:`core.factor_store`: :class:`FactorStore`, what each consumer needs of one base,
  streamed, batched by shape, cached.
"""

from __future__ import annotations

from core.factor_cache import CacheStats, FactorCache, Method
from core.factor_store import FactorStore, FactorView, ProgressCallback, kept_rank
from core.factors import RangeBasis
from core.range_basis import range_basis, range_basis_batch
from core.svd import factorize, factorize_batch, resolve_device

__all__ = [
    "CacheStats",
    "FactorCache",
    "FactorStore",
    "FactorView",
    "Method",
    "ProgressCallback",
    "RangeBasis",
    "factorize",
    "factorize_batch",
    "kept_rank",
    "range_basis",
    "range_basis_batch",
    "resolve_device",
]
