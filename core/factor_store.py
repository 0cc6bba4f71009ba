"""Lazy factors of one base model: streamed tensor by tensor, batched by shape, cached.

A :class:`FactorStore` serves each consumer what it needs and nothing more (DESIGN.md,
"Factorization cache"):

================================  ============================================  ==================
consumer                          call                                          computes, keeps
================================  ============================================  ==================
assessment (ATC, similarity_rank  ``prefetch(rank=k, exact=False)``, then       randomized top k
k)                                ``view(rank=k, exact=False)``
assessment, ``exact`` setting     ``prefetch(rank=k, complete=False)``, then    exact SVD, top
                                  ``view(rank=k, complete=False)``              :func:`kept_rank`
project mode at full rank         ``iter_range_bases(names)`` /                 QR, long-side
(Algorithm 1)                     ``range_basis(name)``                         basis; square:
                                                                                nothing
subspace mode (rank r)            ``iter_top_factors(names, r)`` /              exact SVD, top
                                  ``top_factors(name, r)``                      :func:`kept_rank`
different-shape mapping, compact  ``factors(name)`` (all p triplets)            exact thin SVD
LoRA-X, other ranks
================================  ============================================  ==================

Lookups go to the in-memory LRU, then the disk cache, then a computation of the missing ones of
a batch. Not thread-safe.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TypeVar

import torch

from core.errors import MissingModuleError, NonFiniteError
from core.factor_cache import FactorCache
from core.factor_requests import FactorRequest, FactorView, kept_rank, nbytes, truncated
from core.factors import Factors, RangeBasis
from core.heap import release_free_memory
from core.range_basis import range_basis_batch
from core.svd import (
    DEFAULT_DEPTH,
    DEFAULT_OVERSAMPLE,
    factorize_batch,
    krylov_variant,
    resolve_device,
)
from core.weights import ModuleInfo, WeightSource

__all__ = ["FactorStore", "FactorView", "ProgressCallback", "kept_rank"]

ProgressCallback = Callable[[int, int, str], None]
"""``progress(done, total, name)``, called after each module is factorized or found."""

T = TypeVar("T", Factors, RangeBasis)


class FactorStore:
    """Lazy factors and range bases of the modules of one base model (see the module doc).

    Matrices are read one tensor at a time from ``source`` and factorized in same-shape batches
    of at most ``batch_bytes`` of float32 input, so memory stays bounded by one batch plus the
    LRU (``memory_bytes``), not by the model.

    Args:
        source: the base model's weights.
        names: the modules served (default: every matrix of ``source``).
        cache: optional on-disk cache; write failures are not fatal (counted in
            ``cache_write_errors``).
        device: where factorizations run (``"cpu"``, ``"cuda"``, ``"auto"``); on CUDA the
            stored float16/bfloat16 tensors are moved as they are and computed in float32.
        progress: optional ``progress(done, total, name)`` for the iterating calls.
        memory_bytes: budget of the in-memory LRU of factors and bases.
        batch_bytes: budget of the float32 input of one batch (default: 32 MiB on the CPU,
            where LAPACK factorizes the matrices of a batch one by one and a larger batch only
            costs memory; 256 MiB on CUDA, where a batch runs in parallel).
        oversample, n_iter, seed: randomized SVD settings (:func:`core.svd.factorize_batch`).

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
        n_iter: int | None = None,
        seed: int = 0,
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
        self.oversample = DEFAULT_OVERSAMPLE if oversample is None else oversample
        self.n_iter = DEFAULT_DEPTH if n_iter is None else n_iter
        self.seed = seed
        self.variant = krylov_variant(self.oversample, self.n_iter, seed)
        self.computed = 0  # matrices factorized by this store (not found in a cache)
        self.computed_by_kind = {"exact": 0, "randomized": 0, "basis": 0}
        self.cache_write_errors = 0
        self._lru: OrderedDict[tuple[str, str], Factors | RangeBasis] = OrderedDict()
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

    # --- thin SVD factors ---------------------------------------------------------------------

    def factors(
        self, name: str, rank: int | None = None, exact: bool = True, *, complete: bool = True
    ) -> Factors:
        """Factors of one module: the leading min(rank, p) triplets (rank None: all p, exact).

        Args:
            name: the module.
            rank: triplets wanted (None: all p).
            exact: False for randomized top-``rank`` factors (similarity only).
            complete: for an exact request, keep (in memory and on disk) the complete thin SVD
                (True) or only its leading :func:`kept_rank` triplets (False).

        Raises:
            MissingModuleError, CorruptFileError, NonFiniteError, FactorizationError.
            ValueError: ``exact=False`` without a rank.
        """
        return next(iter(self.iter_factors([name], rank, exact, complete=complete)))[1]

    def top_factors(self, name: str, rank: int) -> Factors:
        """Exact top-``rank`` factors of one module (subspace mode), the rest not kept."""
        return self.factors(name, rank, complete=False)

    def prefetch(
        self,
        names: Iterable[str] | None = None,
        rank: int | None = None,
        exact: bool = True,
        *,
        complete: bool = True,
    ) -> None:
        """Factorize ``names`` (default: all) in batches so later lookups hit the caches."""
        for _ in self.iter_factors(names, rank, exact, complete=complete):
            pass

    def view(
        self, rank: int | None = None, exact: bool = True, *, complete: bool = True
    ) -> Mapping[str, Factors]:
        """A lazy read-only mapping name -> factors(name, rank, exact, complete=complete) over
        :attr:`names`. Lookups one by one do not batch: :meth:`prefetch` the same first."""
        return FactorView(self, rank, exact, complete)

    def iter_factors(
        self,
        names: Iterable[str] | None = None,
        rank: int | None = None,
        exact: bool = True,
        *,
        complete: bool = True,
    ) -> Iterator[tuple[str, Factors]]:
        """Yield (name, factors) for ``names`` (default: all), grouped by shape in batches.

        The order is by shape group, then the given order. At most one batch of matrices and
        its factors is held at a time besides the LRU.
        """
        if not exact and rank is None:
            raise ValueError("randomized factors need a rank")
        request = FactorRequest(rank, exact, complete or rank is None)
        yield from self._iterate(
            names, lambda n: self._lookup(n, request), lambda ns: self._compute(ns, request)
        )

    def iter_top_factors(
        self, names: Iterable[str] | None, rank: int
    ) -> Iterator[tuple[str, Factors]]:
        """:meth:`iter_factors` of exact top-``rank`` factors, the rest not kept."""
        return self.iter_factors(names, rank, complete=False)

    # --- range bases --------------------------------------------------------------------------

    def range_basis(self, name: str) -> RangeBasis:
        """The :class:`RangeBasis` of one module (project mode at full rank)."""
        return next(iter(self.iter_range_bases([name])))[1]

    def prefetch_range_bases(self, names: Iterable[str] | None = None) -> None:
        """Compute the range bases of ``names`` (default: all) in batches."""
        for _ in self.iter_range_bases(names):
            pass

    def iter_range_bases(
        self, names: Iterable[str] | None = None
    ) -> Iterator[tuple[str, RangeBasis]]:
        """Yield (name, range basis) for ``names`` (default: all), grouped by shape in batches.

        A square module's basis is the identity: nothing is read, computed or stored.
        """
        yield from self._iterate(names, self._lookup_basis, self._compute_bases)

    # --- machinery ----------------------------------------------------------------------------

    def _iterate(
        self,
        names: Iterable[str] | None,
        lookup: Callable[[str], T | None],
        compute: Callable[[list[str]], list[T]],
    ) -> Iterator[tuple[str, T]]:
        wanted = list(dict.fromkeys(self.names if names is None else names))
        groups: dict[tuple[int, int], list[str]] = {}
        for name in wanted:
            groups.setdefault(self.shape(name), []).append(name)
        done, total = 0, len(wanted)
        for (m, n), group in groups.items():
            per_batch = max(1, self.batch_bytes // (4 * m * n))
            for start in range(0, len(group), per_batch):
                batch = group[start : start + per_batch]
                found = {name: lookup(name) for name in batch}
                missing = [name for name, item in found.items() if item is None]
                if missing:
                    found.update(zip(missing, compute(missing), strict=True))
                    release_free_memory()  # the batch's temporaries, see core.heap
                for name in batch:
                    item = found[name]
                    assert item is not None
                    done += 1
                    if self.progress is not None:
                        self.progress(done, total, name)
                    yield name, item

    def _lookup(self, name: str, request: FactorRequest) -> Factors | None:
        held = self._lru.get((name, "svd"))
        if isinstance(held, Factors) and request.served_by(held):
            self._lru.move_to_end((name, "svd"))
            return truncated(held, request.rank)
        if self.cache is None:
            return None
        found = self.cache.get(
            self.source.digest(name), rank=request.rank, exact=request.exact, variant=self.variant
        )
        if found is not None:
            self._remember(name, "svd", found)
        return found

    def _lookup_basis(self, name: str) -> RangeBasis | None:
        m, n = self.shape(name)
        if m == n:
            return RangeBasis.identity((m, n))
        held = self._lru.get((name, "basis"))
        if isinstance(held, RangeBasis):
            self._lru.move_to_end((name, "basis"))
            return held
        factors = self._lru.get((name, "svd"))
        if isinstance(factors, Factors) and factors.complete:
            return RangeBasis.from_factors(factors)
        if self.cache is None:
            return None
        found = self.cache.get_basis(self.source.digest(name), (m, n))
        if found is not None:
            self._remember(name, "basis", found)
        return found

    def _load(self, names: list[str]) -> tuple[list[str], list[torch.Tensor]]:
        """Digests and matrices of a batch: float32 on the CPU; on CUDA the stored tensors as
        they are (converted on the device)."""
        digests = [self.source.digest(name) for name in names]
        if self.device.type == "cpu":
            return digests, [self.source.matrix(name) for name in names]
        return digests, [
            self.source.stored_tensor(name).reshape(self.shape(name)) for name in names
        ]

    def _named(self, exc: NonFiniteError, names: list[str], digests: list[str]) -> NonFiniteError:
        """A kernel's NonFiniteError (keyed by digest) re-raised naming the file and key."""
        if exc.key in digests:
            info = self.source.info(names[digests.index(exc.key)])
            return NonFiniteError("NaN/Inf values in the weight", path=info.file, key=info.key)
        return exc

    def _compute(self, names: list[str], request: FactorRequest) -> list[Factors]:
        digests, matrices = self._load(names)
        try:
            computed = factorize_batch(
                matrices,
                rank=None if request.exact else request.rank,
                method="exact" if request.exact else "randomized",
                device=self.device,
                oversample=self.oversample,
                n_iter=self.n_iter,
                seed=self.seed,
                digests=digests,
            )
        except NonFiniteError as exc:
            raise self._named(exc, names, digests) from exc
        del matrices
        self._count("exact" if request.exact else "randomized", len(names))
        results = []
        for name, factors in zip(names, computed, strict=True):
            if request.exact and not request.complete:
                assert request.rank is not None
                factors = truncated(factors, kept_rank(request.rank, factors.full_rank))
            self._store(factors)
            self._remember(name, "svd", factors)
            results.append(truncated(factors, request.rank))
        return results

    def _compute_bases(self, names: list[str]) -> list[RangeBasis]:
        digests, matrices = self._load(names)
        try:
            bases = range_basis_batch(matrices, device=self.device, digests=digests)
        except NonFiniteError as exc:
            raise self._named(exc, names, digests) from exc
        del matrices
        self._count("basis", len(names))
        for name, basis in zip(names, bases, strict=True):
            self._store(basis)
            self._remember(name, "basis", basis)
        return list(bases)

    def _count(self, kind: str, count: int) -> None:
        self.computed += count
        self.computed_by_kind[kind] += count

    def _store(self, item: Factors | RangeBasis) -> None:
        """Write ``item`` to the cache, if there is one; a failure is counted, not raised."""
        if self.cache is None:
            return
        try:
            if isinstance(item, RangeBasis):
                self.cache.put_basis(item)
            else:
                self.cache.put(item, variant=self.variant)
        except OSError:
            self.cache_write_errors += 1

    def _remember(self, name: str, kind: str, item: Factors | RangeBasis) -> None:
        old = self._lru.pop((name, kind), None)
        if old is not None:
            self._lru_bytes -= nbytes(old)
        self._lru[(name, kind)] = item
        self._lru_bytes += nbytes(item)
        while self._lru_bytes > self.memory_bytes and len(self._lru) > 1:
            _, evicted = self._lru.popitem(last=False)
            self._lru_bytes -= nbytes(evicted)
