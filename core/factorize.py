"""Thin SVDs of base weights: exact or randomized top-k, batched by shape, cached on disk.

W (m, n) = U diag(S) V^T, p = min(m, n) (DESIGN.md, "The math"). Every result follows the sign
convention of :func:`core.factors.canonical_signs`: each pair (u_i, v_i) is flipped so that the
largest-magnitude entry of u_i is positive.

- :func:`factorize` / :func:`factorize_batch`: pure functions, tensors in, :class:`Factors` out
  (float32, on the CPU, whatever device computed them).
- :class:`FactorCache`: factors on disk keyed by (tensor digest, method, rank).
- :class:`FactorStore`: lazy factors of one :class:`WeightSource`, streamed tensor by tensor,
  batched by shape, with a bounded in-memory LRU.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import torch

from core.errors import FactorizationError, MissingModuleError, NonFiniteError
from core.factor_cache import CacheStats, FactorCache, Method
from core.factors import Factors, canonical_signs
from core.finite import all_finite
from core.weights import ModuleInfo, WeightSource

__all__ = [
    "CacheStats",
    "FactorCache",
    "FactorStore",
    "FactorView",
    "Method",
    "ProgressCallback",
    "factorize",
    "factorize_batch",
    "resolve_device",
]

ProgressCallback = Callable[[int, int, str], None]
"""``progress(done, total, name)``, called after each module is factorized or found."""


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` -> CUDA when present, else the CPU; anything else as given."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def factorize_batch(
    matrices: Sequence[torch.Tensor],
    *,
    rank: int | None = None,
    method: Method = "exact",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    oversample: int | None = None,
    n_iter: int = 4,
    seed: int = 0,
    digests: Sequence[str] | None = None,
) -> tuple[Factors, ...]:
    """Thin SVDs of same-shape matrices in one batched call.

    ``exact``: ``torch.linalg.svd(full_matrices=False)`` on the (b, m, n) stack; all p triplets
    are computed and the leading ``rank`` kept (rank None, or >= p, keeps all p).

    ``randomized``: ``torch.svd_lowrank(q=rank + oversample, niter=n_iter)`` (Halko et al.),
    seeded with ``seed`` inside ``torch.random.fork_rng`` so results are reproducible and the
    caller's RNG is untouched. Meant for similarity ranks k << p. Measured accuracy (defaults:
    oversample = rank, 4 power iterations) against the exact SVD, on the 24 attention matrices of
    all-MiniLM-L6-v2 (384 x 384, slowly decaying spectra) at k = 32: Psi_k(U_rand, U_exact) from
    0.971 to 0.999 (mean 0.993; V alike) and top-k singular values within 1.3 % relative; at
    k = 64, Psi >= 0.9998 on the layers checked. torch's own default (oversample 10, 2
    iterations) gives 0.83-0.93 there. On a spectrum decaying like e^{-i/10}: Psi > 0.999999,
    singular values within 1e-6. When rank + oversample >= p it falls back to the exact SVD
    (``exact=True``).

    Args:
        matrices: b >= 1 finite matrices, each (m, n).
        rank: k, the triplets kept; required for ``randomized``.
        method: ``"exact"`` or ``"randomized"``.
        device: where to compute (``"cpu"``, ``"cuda"``, ``"auto"``).
        dtype: compute dtype (float32, or float64 where accuracy matters); results are float32.
        oversample: extra columns of the randomized range finder (default: rank).
        n_iter: power iterations of the randomized range finder.
        seed: seed of the randomized range finder.
        digests: content digests to record in each :class:`Factors`.

    Returns:
        b :class:`Factors` (float32, CPU, contiguous, canonical signs), in input order.

    Raises:
        ValueError: empty input, mixed shapes, non-2-D input, bad rank or method.
        NonFiniteError: an input holding NaN or Inf.
        FactorizationError: the SVD failed or returned non-finite factors.
    """
    if not matrices:
        raise ValueError("factorize_batch needs at least one matrix")
    shape = tuple(matrices[0].shape)
    if len(shape) != 2 or any(tuple(w.shape) != shape for w in matrices):
        raise ValueError(f"factorize_batch needs 2-D matrices of one shape, got {shape} first")
    if digests is not None and len(digests) != len(matrices):
        raise ValueError("one digest per matrix is needed")
    m, n = shape
    p = min(m, n)
    if rank is not None and rank < 1:
        raise ValueError(f"rank must be positive, got {rank}")
    k = p if rank is None else min(rank, p)
    if method not in ("exact", "randomized"):
        raise ValueError(f"unknown factorization method {method!r}")
    if method == "randomized" and rank is None:
        raise ValueError("the randomized SVD needs a rank")
    dev = resolve_device(device)
    stack = torch.stack([w.detach().to(device=dev, dtype=dtype) for w in matrices])
    if not all_finite(stack):
        finite = torch.isfinite(stack).flatten(1).all(dim=1)
        i = int((~finite).nonzero()[0])
        raise NonFiniteError(
            f"matrix {i} of the batch holds NaN/Inf", key=digests[i] if digests else None
        )
    q = k + (k if oversample is None else oversample)
    exact = method == "exact" or q >= p
    try:
        if exact:
            u, s, vh = torch.linalg.svd(stack, full_matrices=False)
            v = vh.mT
        else:
            fork = [dev.index or 0] if dev.type == "cuda" else []
            with torch.random.fork_rng(devices=fork, device_type=dev.type):
                torch.manual_seed(seed)
                u, s, v = torch.svd_lowrank(stack, q=q, niter=n_iter)
    except RuntimeError as exc:  # torch.linalg.LinAlgError derives from RuntimeError
        raise FactorizationError(f"SVD of a {m} x {n} batch failed: {exc}") from exc
    u, v = canonical_signs(u[..., :k], v[..., :k])
    u, s, v = (t.to(device="cpu", dtype=torch.float32).contiguous() for t in (u, s[..., :k], v))
    if not (all_finite(u) and all_finite(s) and all_finite(v)):
        raise FactorizationError(f"SVD of a {m} x {n} batch returned non-finite factors")
    return tuple(
        Factors(
            U=u[i].clone(),
            S=s[i].clone(),
            V=v[i].clone(),
            shape=(m, n),
            exact=exact,
            digest=digests[i] if digests else "",
        )
        for i in range(len(matrices))
    )


def factorize(
    matrix: torch.Tensor,
    *,
    rank: int | None = None,
    method: Method = "exact",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    oversample: int | None = None,
    n_iter: int = 4,
    seed: int = 0,
    digest: str = "",
) -> Factors:
    """Thin SVD of one (m, n) matrix: W = U diag(S) V^T, leading ``rank`` triplets.

    See :func:`factorize_batch` for the arguments, accuracy and errors.
    """
    return factorize_batch(
        [matrix],
        rank=rank,
        method=method,
        device=device,
        dtype=dtype,
        oversample=oversample,
        n_iter=n_iter,
        seed=seed,
        digests=None if not digest else [digest],
    )[0]


def _clone_truncated(factors: Factors, rank: int | None) -> Factors:
    """The leading ``rank`` triplets as fresh tensors (so the larger factors can be freed)."""
    k = factors.full_rank if rank is None else min(rank, factors.full_rank)
    if k == factors.rank:
        return factors
    return Factors(
        U=factors.U[:, :k].clone(),
        S=factors.S[:k].clone(),
        V=factors.V[:, :k].clone(),
        shape=factors.shape,
        exact=factors.exact,
        digest=factors.digest,
    )


def _serves(factors: Factors, rank: int | None, exact: bool) -> bool:
    """Whether ``factors`` answer a request for ``rank`` triplets (None: all p) by truncation.

    Exact factors answer any request they hold enough triplets for; randomized factors answer
    only a randomized request of exactly their rank (their leading triplets depend on k).
    """
    want = factors.full_rank if rank is None else min(rank, factors.full_rank)
    if factors.exact:
        return factors.rank >= want
    return not exact and factors.rank == want


def _nbytes(factors: Factors) -> int:
    return sum(t.numel() * t.element_size() for t in (factors.U, factors.S, factors.V))


class FactorStore:
    """Lazy factors of the modules of one base model.

    Matrices are read one tensor at a time from ``source``; factors come from the in-memory LRU,
    then the disk ``cache``, then an SVD. :meth:`iter_factors` and :meth:`prefetch` factorize
    same-shape matrices together, in batches of at most ``batch_bytes`` of input, so memory stays
    bounded by one batch plus the LRU (``memory_bytes``), not by the model.

    Exact requests compute the complete thin SVD (all p triplets: ``torch.linalg.svd`` computes
    them anyway), store it on disk, and answer smaller ranks by truncation. Randomized requests
    (``exact=False``) compute only their rank. Not thread-safe.

    Args:
        source: the base model's weights.
        names: the modules served (default: every matrix of ``source``).
        cache: optional on-disk cache; write failures are not fatal (counted in
            ``cache_write_errors``).
        device: where SVDs run (``"cpu"``, ``"cuda"``, ``"auto"``).
        progress: optional ``progress(done, total, name)``, called by :meth:`iter_factors` and
            :meth:`prefetch`.
        memory_bytes: budget of the in-memory LRU of factors.
        batch_bytes: budget of the float32 input of one batched SVD (default: 32 MiB on the
            CPU, where LAPACK factorizes the matrices of a batch one by one and a larger batch
            only costs memory, about four copies of it at the peak; 256 MiB on CUDA, where a
            batch runs in parallel).
        oversample, n_iter: randomized SVD settings (see :func:`factorize_batch`).

    Raises:
        MissingModuleError: a name in ``names`` that ``source`` lacks.
    """

    def __init__(
        self,
        source: WeightSource,
        names: Iterable[str] | None = None,
        *,
        cache: FactorCache | None = None,
        device: str | torch.device = "cpu",
        progress: ProgressCallback | None = None,
        memory_bytes: int = 512 << 20,
        batch_bytes: int | None = None,
        oversample: int | None = None,
        n_iter: int = 4,
    ) -> None:
        self.source = source
        self.names = tuple(source.names if names is None else names)
        for name in self.names:
            source.info(name)
        self._known = frozenset(self.names)
        self.cache = cache
        self.device = resolve_device(device)
        self.progress = progress
        self.memory_bytes = memory_bytes
        if batch_bytes is None:
            batch_bytes = (256 << 20) if self.device.type == "cuda" else (32 << 20)
        self.batch_bytes = batch_bytes
        self.oversample = oversample
        self.n_iter = n_iter
        self.computed = 0  # matrices factorized by this store (not found in a cache)
        self.cache_write_errors = 0
        self._lru: OrderedDict[str, Factors] = OrderedDict()
        self._lru_bytes = 0

    def __contains__(self, name: object) -> bool:
        return name in self._known

    def info(self, name: str) -> ModuleInfo:
        """The source's :class:`ModuleInfo` of a served module (MissingModuleError otherwise)."""
        if name not in self._known:
            raise MissingModuleError(
                "module not served by this factor store", path=self.source.path, key=name
            )
        return self.source.info(name)

    def shape(self, name: str) -> tuple[int, int]:
        """(m, n) of module ``name``, from the file header (no SVD)."""
        return self.info(name).shape

    def factors(self, name: str, rank: int | None = None, exact: bool = True) -> Factors:
        """Factors of one module: the leading min(rank, p) triplets (rank None: all p, exact).

        Raises:
            MissingModuleError, CorruptFileError, NonFiniteError, FactorizationError.
            ValueError: ``exact=False`` without a rank.
        """
        return next(iter(self.iter_factors([name], rank, exact)))[1]

    def prefetch(
        self, names: Iterable[str] | None = None, rank: int | None = None, exact: bool = True
    ) -> None:
        """Factorize ``names`` (default: all) in batches so later lookups hit the caches."""
        for _ in self.iter_factors(names, rank, exact):
            pass

    def view(self, rank: int | None = None, exact: bool = True) -> Mapping[str, Factors]:
        """A lazy read-only mapping name -> factors(name, rank, exact) over :attr:`names`.

        Lookups one by one do not batch: call :meth:`prefetch` with the same arguments first.
        """
        return FactorView(self, rank, exact)

    def iter_factors(
        self, names: Iterable[str] | None = None, rank: int | None = None, exact: bool = True
    ) -> Iterator[tuple[str, Factors]]:
        """Yield (name, factors) for ``names`` (default: all), grouped by shape in batches.

        The order is by shape group, then the given order. At most one batch of matrices and
        its factors is held at a time besides the LRU.
        """
        if not exact and rank is None:
            raise ValueError("randomized factors need a rank")
        wanted = list(dict.fromkeys(self.names if names is None else names))
        groups: dict[tuple[int, int], list[str]] = {}
        for name in wanted:
            groups.setdefault(self.shape(name), []).append(name)
        done, total = 0, len(wanted)
        for (m, n), group in groups.items():
            per_batch = max(1, self.batch_bytes // (4 * m * n))
            for start in range(0, len(group), per_batch):
                batch = group[start : start + per_batch]
                found = {name: self._lookup(name, rank, exact) for name in batch}
                missing = [name for name, f in found.items() if f is None]
                if missing:
                    found.update(zip(missing, self._compute(missing, rank, exact), strict=True))
                for name in batch:
                    factors = found[name]
                    assert factors is not None
                    done += 1
                    if self.progress is not None:
                        self.progress(done, total, name)
                    yield name, factors

    def _lookup(self, name: str, rank: int | None, exact: bool) -> Factors | None:
        held = self._lru.get(name)
        if held is not None and _serves(held, rank, exact):
            self._lru.move_to_end(name)
            return _clone_truncated(held, rank)
        if self.cache is None:
            return None
        found = self.cache.get(self.source.digest(name), rank=rank, exact=exact)
        if found is not None:
            self._remember(name, found)
        return found

    def _compute(self, names: list[str], rank: int | None, exact: bool) -> list[Factors]:
        digests = [self.source.digest(name) for name in names]
        matrices = [self.source.matrix(name) for name in names]
        computed = factorize_batch(
            matrices,
            rank=None if exact else rank,
            method="exact" if exact else "randomized",
            device=self.device,
            oversample=self.oversample,
            n_iter=self.n_iter,
            digests=digests,
        )
        del matrices
        self.computed += len(names)
        results = []
        for name, factors in zip(names, computed, strict=True):
            if self.cache is not None:
                try:
                    self.cache.put(factors)
                except OSError:
                    self.cache_write_errors += 1
            served = _clone_truncated(factors, rank)
            self._remember(name, served)
            results.append(served)
        return results

    def _remember(self, name: str, factors: Factors) -> None:
        old = self._lru.pop(name, None)
        if old is not None:
            self._lru_bytes -= _nbytes(old)
        self._lru[name] = factors
        self._lru_bytes += _nbytes(factors)
        while self._lru_bytes > self.memory_bytes and len(self._lru) > 1:
            _, evicted = self._lru.popitem(last=False)
            self._lru_bytes -= _nbytes(evicted)


class FactorView(Mapping[str, Factors]):
    """Read-only mapping name -> factors over a :class:`FactorStore` at one (rank, exact).

    Attributes:
        store: the store behind the view (consumers that need another rank ask it directly).
        rank, exact: the request every lookup makes.
    """

    def __init__(self, store: FactorStore, rank: int | None, exact: bool) -> None:
        self.store, self.rank, self.exact = store, rank, exact

    def __getitem__(self, name: str) -> Factors:
        if name not in self.store:
            raise KeyError(name)
        return self.store.factors(name, self.rank, self.exact)

    def __iter__(self) -> Iterator[str]:
        return iter(self.store.names)

    def __len__(self) -> int:
        return len(self.store.names)
