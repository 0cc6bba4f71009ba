"""Carry one adapter module to a target base (section 4.2, eq. 3, Algorithm 1).

:func:`transfer_module` picks the module's kind strategy (:mod:`core.kinds`: how the module
becomes an update on its source base) and the mode's function (:mod:`core.modes`: project,
reshaped, subspace, copy, each with its formula) from two tables, and checks that the factors it
was given are the ones :func:`module_needs` says the pair needs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from core.adapter import AdapterKind, LoraModule
from core.errors import NonFiniteError
from core.factors import Factors, RangeBasis
from core.finite import all_finite
from core.kinds import PLAIN_LORA, SIGN_RISK, KindStrategy, strategy_for
from core.modes import ModuleNeeds, Pair, TransferMode, copy, needs, project, reshaped, subspace

__all__ = [
    "PLAIN_LORA",
    "SIGN_RISK",
    "ModuleTransfer",
    "TransferMode",
    "module_needs",
    "transfer_module",
]


@dataclass(frozen=True, eq=False)
class ModuleTransfer:
    """One transferred module.

    Attributes:
        up: B' (m', r_out), float32.
        down: A' (r_out, n'), float32.
        scale: the multiplier of up @ down (the input's scale; 1 if that was 0 and the mode
            rebuilds the pair).
        ds: dS of the result as a LoRA-X of the target (subspace: (r, r); copy: the source's
            form), None in project mode.
        k: the rank of the bases used.
        notes: risks and facts worth reporting.
    """

    up: torch.Tensor
    down: torch.Tensor
    scale: float
    ds: torch.Tensor | None
    k: int
    notes: tuple[str, ...]


def _result_rank(
    module: LoraModule, target_shape: tuple[int, int], mode: TransferMode, rank: int | None
) -> int:
    """r of a subspace or copy result: ``rank`` (default the module's), capped by the bases."""
    cap = min(target_shape)
    if mode is TransferMode.COPY:
        return min(rank or module.rank, module.rank, cap)
    if module.shape != tuple(target_shape):
        cap = min(cap, min(module.shape))
    return min(rank or module.rank, cap)


def module_needs(
    module: LoraModule,
    target_shape: tuple[int, int],
    mode: TransferMode | str = TransferMode.PROJECT,
    rank: int | None = None,
    kind: AdapterKind | str = AdapterKind.LORAX,
) -> ModuleNeeds:
    """What :func:`transfer_module` reads of each base for this module (see
    :func:`core.modes.needs`): nothing of the target for a square, non-compact module at full
    rank in project mode, which eq. 3 leaves unchanged."""
    mode = TransferMode(mode)
    strategy = strategy_for(module, kind)
    target_shape = (int(target_shape[0]), int(target_shape[1]))
    return needs(
        module.shape,
        target_shape,
        mode,
        rank=_result_rank(module, target_shape, mode, rank),
        k=rank if mode is TransferMode.PROJECT else None,
        source_coordinates=strategy.source_coordinates(module, mode),
    )


Carried = tuple[Pair, int, tuple[str, ...]]
"""(the carried update, the rank of the bases used, notes)."""
Target = Factors | RangeBasis | None
"""What a carrier reads of the target base: factors, a range basis (project mode at full rank)
or nothing."""


class CarryJob(NamedTuple):
    """What a carrier works on: the module, its kind's strategy, the factors it was given and
    the rank asked for."""

    module: LoraModule
    strategy: KindStrategy
    source: Factors | None
    target: Target
    rank: int | None


Carrier = Callable[[CarryJob], Carried]


def _need(factors: Factors | RangeBasis | None, k: int, name: str) -> Factors:
    assert factors is not None
    if isinstance(factors, RangeBasis):
        raise ValueError(f"module {name}: a range basis serves project mode at full rank only")
    if factors.rank < k:
        raise ValueError(f"module {name}: factors hold {factors.rank} triplets, {k} are needed")
    return factors


def _carry_project(job: CarryJob) -> Carried:
    module, strategy, source, target, rank = job
    pair = strategy.pair(module, source)
    if target is None:  # square at full rank: the projectors are the identity
        return pair, min(module.shape), ()
    m, n = target.shape
    k = min(m, n) if rank is None else min(rank, m, n)
    if isinstance(target, RangeBasis) and k == target.rank:  # Algorithm 1 from a QR basis
        up, down = target.project_up(pair.up.float()), target.project_down(pair.down.float())
        return Pair(up, down, pair.scale), k, ()
    target = _need(target, k, module.name)
    left = target.U[:, :k] if k < m else None
    right = target.V[:, :k] if k < n else None
    return project(pair, left, right), k, ()


def _carry_reshaped(job: CarryJob) -> Carried:
    module, strategy, source, target, rank = job
    assert source is not None and target is not None
    pair = strategy.pair(module, source)
    cap = min(min(target.shape), source.full_rank)
    k = cap if rank is None else min(rank, cap)
    return reshaped(pair, _need(source, k, module.name), _need(target, k, module.name), k), k, ()


def _carry_subspace(job: CarryJob) -> Carried:
    module, strategy, source, target, rank = job
    assert target is not None
    pair = strategy.pair(module, source)
    r = _result_rank(module, target.shape, TransferMode.SUBSPACE, rank)
    coordinates = _need(source if module.shape != target.shape else target, r, module.name)
    return subspace(pair, coordinates, _need(target, r, module.name), r), r, ()


def _carry_copy(job: CarryJob) -> Carried:
    module, strategy, source, target, rank = job
    assert target is not None
    r = _result_rank(module, target.shape, TransferMode.COPY, rank)
    ds, notes = strategy.copy_ds(module, source, r)
    scale = float(module.scale) if module.scale != 0 else 1.0
    return copy(ds, scale, _need(target, r, module.name), r), r, notes


#: (mode, shapes differ) -> the function that carries the update.
CARRIERS: dict[tuple[TransferMode, bool], Carrier] = {
    (TransferMode.PROJECT, False): _carry_project,
    (TransferMode.PROJECT, True): _carry_reshaped,
    (TransferMode.SUBSPACE, False): _carry_subspace,
    (TransferMode.SUBSPACE, True): _carry_subspace,
    (TransferMode.COPY, False): _carry_copy,
    (TransferMode.COPY, True): _carry_copy,
}


def _shape_notes(
    module: LoraModule, target_shape: tuple[int, int], mode: TransferMode, strategy: KindStrategy
) -> list[str]:
    if module.shape == target_shape:
        return []
    (m, n), (mt, nt) = module.shape, target_shape
    notes = [f"different shape {m} x {n} -> {mt} x {nt}: mapped through basis coordinates"]
    if mode is not TransferMode.COPY and not strategy.sign_safe(module):
        notes.append(SIGN_RISK)
    return notes


def transfer_module(
    module: LoraModule,
    target: Factors | RangeBasis | None,
    source: Factors | None = None,
    *,
    mode: TransferMode | str = TransferMode.PROJECT,
    rank: int | None = None,
    kind: AdapterKind | str = AdapterKind.LORAX,
) -> ModuleTransfer:
    """Carry one adapter module to the target base (formulas: :mod:`core.modes`).

    Args:
        module: the adapter module on the source base, (m, n), rank r.
        target: factors of the target weight (m', n'); a :class:`RangeBasis` of it where
            :func:`module_needs` says any basis of the range serves (project mode at full rank:
            exactly Algorithm 1's projector); None where it says none are read (the module is
            then returned as it is).
        source: factors of the source weight, where :func:`module_needs` asks for them (a
            different shape, a compact module, copy mode without a known dS).
        mode: :class:`TransferMode`.
        rank: project: k (None: p, or min(p_s, p_t) across shapes); subspace: r_out (None: r);
            copy: dS truncated to this rank (None: r).
        kind: the adapter's kind (:mod:`core.kinds`); a plain LoRA adds a note.

    Returns:
        A :class:`ModuleTransfer`.

    Raises:
        ValueError: factors missing or too small for the request.
        BaseMismatchError: a compact module whose base digest differs from ``source``'s.
        NonFiniteError: a non-finite result.
    """
    mode = TransferMode(mode)
    strategy = strategy_for(module, kind)
    if source is not None and source.shape != module.shape:
        raise ValueError(
            f"module {module.name}: source factors {source.shape} != adapter {module.shape}"
        )
    target_shape = module.shape if target is None else target.shape
    need = module_needs(module, target_shape, mode, rank, kind)
    for side, wanted, given in (("target", need.target, target), ("source", need.source, source)):
        if wanted is not None and given is None:
            raise ValueError(f"module {module.name}: this transfer needs the {side} base's factors")
    carry = CARRIERS[(mode, module.shape != target_shape)]
    pair, k, carried_notes = carry(CarryJob(module, strategy, source, target, rank))
    notes = (*strategy.notes, *_shape_notes(module, target_shape, mode, strategy), *carried_notes)
    up, down = pair.up.float().contiguous(), pair.down.float().contiguous()
    if not (all_finite(up) and all_finite(down)):
        raise NonFiniteError("transferred module is not finite", key=module.name)
    ds = None if mode is TransferMode.PROJECT or pair.ds is None else pair.ds.float()
    return ModuleTransfer(up, down, float(pair.scale), ds, k, notes)
