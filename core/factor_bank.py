"""Where a transfer reads factors: a :class:`FactorStore`, a view of one, or a plain mapping
name -> :class:`Factors` (tests, small tools). A view is answered by its store at what the
transfer asks for, not at the view's own rank.

A store is asked for the least that serves each module's :class:`core.modes.BaseNeed`: a
:class:`RangeBasis` (one QR) where any orthonormal basis of the range serves (project mode at
full rank), the exact leading triplets only (:meth:`FactorStore.top_factors`) where a rank is
given, the complete thin SVD only where all p triplets are needed. A mapping answers with the
factors it holds.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import torch

from core.factorize import FactorStore, FactorView
from core.factors import Factors, RangeBasis
from core.modes import BaseNeed

__all__ = [
    "FactorBank",
    "bank_factors",
    "bank_shape",
    "bank_store",
    "bank_weight",
    "merge_needs",
    "stream_factors",
    "stream_for_needs",
]

FactorBank = FactorStore | Mapping[str, Factors]


def bank_store(bank: FactorBank) -> FactorStore | None:
    """The store behind ``bank``, if any (a view is answered at the rank the transfer needs)."""
    if isinstance(bank, FactorStore):
        return bank
    return bank.store if isinstance(bank, FactorView) else None


def bank_shape(bank: FactorBank, name: str) -> tuple[int, int] | None:
    store = bank_store(bank)
    if store is not None:
        return store.shape(name) if name in store else None
    assert not isinstance(bank, FactorStore)
    factors = bank.get(name)
    return None if factors is None else factors.shape


def bank_factors(bank: FactorBank, name: str, rank: int | None) -> Factors:
    """Exact factors of ``name`` holding at least ``rank`` triplets (None: all p); a store
    keeps only the leading ones (:meth:`FactorStore.top_factors`) when a rank is given."""
    store = bank_store(bank)
    if store is not None:
        factors = store.factors(name) if rank is None else store.top_factors(name, rank)
    else:
        assert not isinstance(bank, FactorStore)
        factors = bank[name]
    if not factors.exact:
        raise ValueError(f"module {name}: randomized factors are for similarity, not transfer")
    return factors


def merge_needs(needs: Iterable[BaseNeed]) -> BaseNeed:
    """One need serving several (a target fed by several source modules): exact factors if
    any needs them, at the largest rank (None, all p, wins)."""
    needs = list(needs)
    ranks = [n.rank for n in needs]
    rank = None if None in ranks else max(r for r in ranks if r is not None)
    return BaseNeed(
        left=any(n.left for n in needs),
        right=any(n.right for n in needs),
        rank=rank,
        exact=any(n.exact for n in needs),
    )


def stream_factors(
    bank: FactorBank, wanted: Mapping[str, int | None]
) -> Iterator[tuple[str, Factors]]:
    """(name, exact factors) for every wanted name at its rank; a store batches same-rank
    requests and keeps only the leading triplets of ranked ones."""
    store = bank_store(bank)
    by_rank: dict[int | None, list[str]] = {}
    for name, rank in wanted.items():
        by_rank.setdefault(rank, []).append(name)
    for rank, names in by_rank.items():
        if store is None:
            for name in names:
                yield name, bank_factors(bank, name, rank)
        elif rank is None:
            yield from store.iter_factors(names)
        else:
            yield from store.iter_top_factors(names, rank)


def stream_for_needs(
    bank: FactorBank, wanted: Mapping[str, BaseNeed]
) -> Iterator[tuple[str, Factors | RangeBasis]]:
    """(name, what serves its need) for every wanted name, in shape batches from a store:
    range bases where ``exact`` is False (a mapping gives its factors), exact factors else."""
    store = bank_store(bank)
    loose = [name for name, need in wanted.items() if not need.exact]
    exact = {name: need.rank for name, need in wanted.items() if need.exact}
    if store is not None:
        yield from store.iter_range_bases(loose)
    else:
        exact |= dict.fromkeys(loose)
    yield from stream_factors(bank, exact)


def bank_weight(bank: FactorBank, name: str) -> torch.Tensor:
    """The (m, n) float32 weight of ``name``: read from the store's weights, or rebuilt from a
    mapping's complete exact factors (U diag(S) V^T).

    Raises:
        ValueError: a mapping whose factors of ``name`` are not complete.
    """
    store = bank_store(bank)
    if store is not None:
        return store.source.matrix(name)
    factors = bank_factors(bank, name, None)
    if factors.rank < min(factors.shape):
        raise ValueError(f"module {name}: the weight needs all {min(factors.shape)} triplets")
    return (factors.U * factors.S) @ factors.V.T
