"""Where a transfer reads factors: a :class:`FactorStore`, a view of one, or a plain mapping
name -> :class:`Factors` (tests, small tools). A view is answered by its store at the rank the
transfer asks for, not at the view's own rank."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from core.factorize import FactorStore, FactorView
from core.factors import Factors

__all__ = ["FactorBank", "bank_factors", "bank_shape", "bank_store", "stream_factors"]

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
    store = bank_store(bank)
    if store is not None:
        factors = store.factors(name, rank)
    else:
        assert not isinstance(bank, FactorStore)
        factors = bank[name]
    if not factors.exact:
        raise ValueError(f"module {name}: randomized factors are for similarity, not transfer")
    return factors


def stream_factors(
    bank: FactorBank, wanted: Mapping[str, int | None]
) -> Iterator[tuple[str, Factors]]:
    """(name, factors) for every wanted name at its rank; a store batches same-rank requests."""
    store = bank_store(bank)
    by_rank: dict[int | None, list[str]] = {}
    for name, rank in wanted.items():
        by_rank.setdefault(rank, []).append(name)
    for rank, names in by_rank.items():
        if store is not None:
            yield from store.iter_factors(names, rank)
        else:
            for name in names:
                yield name, bank_factors(bank, name, rank)
