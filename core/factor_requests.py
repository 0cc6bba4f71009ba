"""What a factor request asks of a :class:`core.factor_store.FactorStore`, and its views."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from core.factors import Factors, RangeBasis

if TYPE_CHECKING:
    from core.factor_store import FactorStore

__all__ = ["MIN_KEPT_RANK", "FactorRequest", "FactorView", "kept_rank", "nbytes", "truncated"]

MIN_KEPT_RANK = 64


def kept_rank(rank: int, p: int) -> int:
    """Triplets an exact top-``rank`` request keeps: ``rank`` rounded up to a power of two, at
    least 64, at most p, so the adapters of one base (ranks 8 to 64, say) share one SVD."""
    return min(p, max(MIN_KEPT_RANK, 1 << max(0, rank - 1).bit_length()))


@dataclass(frozen=True)
class FactorRequest:
    """What a factor lookup asks for: ``rank`` (None: all p), ``exact``, and whether exact
    factors are kept ``complete`` (all p) or truncated to :func:`kept_rank`."""

    rank: int | None
    exact: bool
    complete: bool

    def served_by(self, factors: Factors) -> bool:
        """Whether ``factors`` answer this request by truncation: exact factors answer any
        request they hold enough triplets for; randomized ones only a randomized request of
        exactly their rank (their leading triplets depend on k)."""
        want = factors.full_rank if self.rank is None else min(self.rank, factors.full_rank)
        if factors.exact:
            return factors.rank >= want
        return not self.exact and factors.rank == want


def truncated(factors: Factors, rank: int | None) -> Factors:
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


def nbytes(item: Factors | RangeBasis) -> int:
    """Bytes of the tensors an in-memory cache holds for ``item``."""
    if isinstance(item, RangeBasis):
        return item.nbytes
    return sum(t.numel() * t.element_size() for t in (item.U, item.S, item.V))


class FactorView(Mapping[str, Factors]):
    """Read-only mapping name -> factors over a :class:`FactorStore` at one request.

    Attributes:
        store: the store behind the view (consumers that need another rank ask it directly).
        rank, exact, complete: the request every lookup makes.
    """

    def __init__(
        self, store: FactorStore, rank: int | None, exact: bool, complete: bool = True
    ) -> None:
        self.store, self.rank, self.exact, self.complete = store, rank, exact, complete

    def __getitem__(self, name: str) -> Factors:
        if name not in self.store:
            raise KeyError(name)
        return self.store.factors(name, self.rank, self.exact, complete=self.complete)

    def __iter__(self) -> Iterator[str]:
        return iter(self.store.names)

    def __len__(self) -> int:
        return len(self.store.names)
