"""How a base's factorization is cut into remote tasks: pure shape-group planning, no Ray.

Same-shape matrices are factorized in one batched SVD, so modules are grouped by shape; a group
is cut into even tasks of about ``1 / (parallelism * tasks_per_worker)`` of the total cost
(m n min(m, n) per module, the SVD's flop count up to a constant) and at most ``max_bytes`` of
float32 input, never below one module, so that ``parallelism`` workers end close together.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from migrator.bases import OpenedBase
from migrator.registry import ModelVersionInfo

__all__ = ["BATCH_BYTES", "FactorGroup", "factor_groups", "split_modules"]

BATCH_BYTES = 256 << 20  # float32 input of one factorization task at most (FactorStore's batch)


@dataclass(frozen=True)
class FactorGroup:
    """One factorization task's share of a base: modules of one shape, factorized in batches.

    Attributes:
        label: the base, as messages name it.
        path: the base's weights as the daemon opened them; used where the worker sees it too
            (the same machine, or a shared volume), else the base is downloaded on the worker.
        version: the base's registry version, for that download (None: the path must do).
        shape: (m, n) of every module of the group.
        names: the modules.
    """

    label: str
    path: str
    version: ModelVersionInfo | None
    shape: tuple[int, int]
    names: tuple[str, ...]

    @property
    def cost(self) -> float:
        """Relative SVD cost: sum of m n min(m, n) (the flop count up to a constant)."""
        m, n = self.shape
        return float(len(self.names)) * m * n * min(m, n)


def split_modules(
    modules: Sequence[tuple[str, tuple[int, int]]],
    *,
    label: str,
    path: str,
    parallelism: int,
    version: ModelVersionInfo | None = None,
    tasks_per_worker: int = 2,
    max_bytes: int = BATCH_BYTES,
) -> list[FactorGroup]:
    """Cut (name, (m, n)) modules into factorization tasks, largest first (pure: no I/O)."""
    by_shape: dict[tuple[int, int], list[str]] = {}
    for name, shape in modules:
        by_shape.setdefault(shape, []).append(name)

    def unit(shape: tuple[int, int]) -> float:
        return float(shape[0]) * shape[1] * min(shape)

    total = sum(unit(shape) * len(names) for shape, names in by_shape.items())
    target = total / max(1, parallelism * tasks_per_worker)
    groups = []
    for shape, names in by_shape.items():
        per_task = max(1, min(int(target // unit(shape)), max_bytes // (4 * shape[0] * shape[1])))
        size = math.ceil(len(names) / math.ceil(len(names) / per_task))  # even chunks
        for start in range(0, len(names), size):
            groups.append(
                FactorGroup(label, path, version, shape, tuple(names[start : start + size]))
            )
    return sorted(groups, key=lambda g: g.cost, reverse=True)


def _cached(base: OpenedBase, name: str, rank: int) -> bool:
    cache = base.store.cache
    assert cache is not None
    exact = base.exact_assessment
    found = cache.get(base.source.digest(name), rank=rank, exact=exact, variant=base.store.variant)
    return found is not None


def factor_groups(
    base: OpenedBase,
    *,
    parallelism: int,
    rank: int | None = None,
    version: ModelVersionInfo | None = None,
    tasks_per_worker: int = 2,
    max_bytes: int = BATCH_BYTES,
    skip_cached: bool = True,
) -> list[FactorGroup]:
    """The factorization tasks of a base's assessed modules (see :func:`split_modules`).

    Args:
        base: the base (headers, content digests and cache entries are read here).
        rank: the similarity rank the assessment reads (default: the base's).
        parallelism: workers expected to take the tasks (GPUs, or CPU slots).
        version: the base's registry version, for workers that cannot reach ``base``'s path.
        skip_cached: leave out modules whose assessment factors (the leading
            ``similarity_rank`` triplets, randomized or exact as ``base`` assesses) are cached.
    """
    store = base.store
    modules = []
    for name in base.selected:
        k = base.assessment_rank if rank is None else rank
        if skip_cached and store.cache is not None and _cached(base, name, k):
            continue
        modules.append((name, store.shape(name)))
    return split_modules(
        modules,
        label=base.label,
        path=str(base.source.path),
        parallelism=parallelism,
        version=version,
        tasks_per_worker=tasks_per_worker,
        max_bytes=max_bytes,
    )
