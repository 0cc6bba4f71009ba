"""What each adapter kind contributes to a transfer: one small strategy per kind, from a table.

A transfer mode (:mod:`core.modes`) carries a LoRA update; a kind says how a module of that kind
becomes an update on its source base, which dS it has for copy mode, whether the update must be
read in the source's basis, and what to note about the result.

| kind | update on the source | dS (copy mode) |
|---|---|---|
| LoRA-X, expanded (``lorax``) | s B A as stored | its dS, else s U_s,r^T B A V_s,r |
| plain LoRA (``lora``, paper Table 2) | s B A as stored | s U_s,r^T B A V_s,r (recovered) |
| LoRA-X, compact (``lorax-compact``) | U_s,r dS V_s,r^T (needs its exact base) | its dS |
| DoRA (a module with a magnitude) | s B A as stored, then the magnitude carried by its gain | as plain LoRA |

A strategy may also *finish* a carried module with the two bases' weights: DoRA's does, applying
:func:`core.dora.with_carried_magnitude` (m_t = m_s ||W_t + dW_t|| / ||W_s + dW_s||) after the
direction part is carried.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch

from core.adapter import AdapterKind, LoraModule
from core.dora import with_carried_magnitude
from core.errors import BaseMismatchError
from core.factors import Factors
from core.modes import Pair, TransferMode

__all__ = [
    "DORA_GAIN",
    "DORA_STRATEGY",
    "KIND_STRATEGIES",
    "PLAIN_LORA",
    "RECOVERED_DS",
    "SIGN_RISK",
    "CompactLoraX",
    "Dora",
    "KindStrategy",
    "LoraX",
    "PlainLora",
    "strategy_for",
]

PLAIN_LORA = "plain LoRA, not a LoRA-X: projected onto the target (paper Table 2)"
DORA_GAIN = (
    "DoRA: direction carried as a LoRA, magnitude by its gain "
    "m_t = m_s ||W_t + dW_t|| / ||W_s + dW_s|| (core.dora)"
)
Weight = Callable[[], torch.Tensor]
"""Loads one base weight, (m, n) float32, when a strategy needs it."""
RECOVERED_DS = "dS recovered from the source factors as U_s,r^T dW V_s,r"
SIGN_RISK = (
    "sign/rotation risk: a full dS or plain LoRA is carried through basis coordinates, which "
    "depend on the singular-vector signs of both bases (convention: largest |u_i| entry positive)"
)


def _need_rank(factors: Factors | None, r: int, module: LoraModule) -> Factors:
    if factors is None or factors.rank < r:
        held = "none" if factors is None else f"{factors.rank} triplets"
        raise ValueError(f"module {module.name}: source factors of rank {r} needed ({held})")
    return factors


def recovered_ds(module: LoraModule, source: Factors | None, r: int) -> torch.Tensor:
    """dS = s (U_s,r^T B)(A V_s,r): the update's r x r coordinates in the source basis."""
    source = _need_rank(source, r, module)
    up, down = module.up.float(), module.down.float()
    return module.scale * ((source.U[:, :r].T @ up) @ (down @ source.V[:, :r]))


@dataclass(frozen=True)
class KindStrategy:
    """How modules of one adapter kind enter a transfer (stateless; the base class is LoRA-X).

    Attributes:
        kind: the kind served.
        notes: what every result of this kind notes.
    """

    kind: AdapterKind = AdapterKind.LORAX
    notes: tuple[str, ...] = ()
    needs_weights: bool = False  # whether finish() reads the bases' weights

    def finish(
        self, module: LoraModule, carried: LoraModule, source_weight: Weight, target_weight: Weight
    ) -> tuple[LoraModule, tuple[str, ...]]:
        """The carried module made whole (nothing to add for most kinds), and notes."""
        return carried, ()

    def source_coordinates(self, module: LoraModule, mode: TransferMode) -> bool:
        """Whether the update must be read in the source basis (source factors needed)."""
        return mode is TransferMode.COPY and module.ds is None

    def pair(self, module: LoraModule, source: Factors | None) -> Pair:
        """The update on the source base."""
        return Pair(module.up.float(), module.down.float(), float(module.scale), module.ds)

    def copy_ds(
        self, module: LoraModule, source: Factors | None, r: int
    ) -> tuple[torch.Tensor, tuple[str, ...]]:
        """The dS copy mode carries, and what to note about it."""
        if module.ds is not None:
            return module.ds.float(), ()
        return recovered_ds(module, source, r), (RECOVERED_DS,)

    def sign_safe(self, module: LoraModule) -> bool:
        """Whether a different-shape map is independent of singular-vector signs (a diagonal
        dS is: it lands on the target's own singular vectors)."""
        return module.ds is not None and module.ds.ndim == 1


class LoraX(KindStrategy):
    """An expanded LoRA-X: dW = U_r dS V_r^T stored as an ordinary pair."""


@dataclass(frozen=True)
class PlainLora(KindStrategy):
    """A plain LoRA: not confined to the base's subspace; projected all the same (Table 2)."""

    kind: AdapterKind = AdapterKind.LORA
    notes: tuple[str, ...] = (PLAIN_LORA,)

    def source_coordinates(self, module: LoraModule, mode: TransferMode) -> bool:
        return mode is TransferMode.COPY

    def copy_ds(
        self, module: LoraModule, source: Factors | None, r: int
    ) -> tuple[torch.Tensor, tuple[str, ...]]:
        return recovered_ds(module, source, r), (RECOVERED_DS,)

    def sign_safe(self, module: LoraModule) -> bool:
        return False


@dataclass(frozen=True)
class Dora(PlainLora):
    """A DoRA module: its direction s B A carried as a plain LoRA, then its magnitude carried to
    the target by the gain rule (:mod:`core.dora`)."""

    notes: tuple[str, ...] = (PLAIN_LORA, DORA_GAIN)
    needs_weights: bool = True

    def finish(
        self, module: LoraModule, carried: LoraModule, source_weight: Weight, target_weight: Weight
    ) -> tuple[LoraModule, tuple[str, ...]]:
        return with_carried_magnitude(module, carried, source_weight(), target_weight())


@dataclass(frozen=True)
class CompactLoraX(KindStrategy):
    """A compact LoRA-X: only dS, decoded against the exact base tensor it was trained on:
    B = U_s,r, A = dS V_s,r^T."""

    kind: AdapterKind = AdapterKind.LORAX_COMPACT

    def source_coordinates(self, module: LoraModule, mode: TransferMode) -> bool:
        return True

    @staticmethod
    def _check_base(module: LoraModule, source: Factors) -> None:
        if module.base_digest and source.digest and module.base_digest != source.digest:
            raise BaseMismatchError(
                f"compact LoRA-X was trained on base tensor {module.base_digest}, the source "
                f"base holds {source.digest}",
                key=module.name,
            )

    def pair(self, module: LoraModule, source: Factors | None) -> Pair:
        assert module.ds is not None
        source = _need_rank(source, module.rank, module)
        self._check_base(module, source)
        r = module.rank
        ds = module.ds.float()
        matrix = torch.diag(ds[:r]) if ds.ndim == 1 else ds[:r, :r]
        return Pair(source.U[:, :r], matrix @ source.V[:, :r].T, 1.0, ds)

    def copy_ds(
        self, module: LoraModule, source: Factors | None, r: int
    ) -> tuple[torch.Tensor, tuple[str, ...]]:
        assert module.ds is not None
        if source is not None:
            self._check_base(module, source)
        return module.ds.float(), ()


#: The strategy of each adapter kind.
KIND_STRATEGIES: Mapping[AdapterKind, KindStrategy] = MappingProxyType(
    {
        AdapterKind.LORAX: LoraX(),
        AdapterKind.LORA: PlainLora(),
        AdapterKind.LORAX_COMPACT: CompactLoraX(),
    }
)


#: The strategy of a DoRA module, whatever its adapter's kind.
DORA_STRATEGY = Dora()


def strategy_for(module: LoraModule, kind: AdapterKind | str) -> KindStrategy:
    """The strategy for a module of an adapter of ``kind`` (a compact module is compact and a
    DoRA module is DoRA whatever the adapter says)."""
    if module.is_compact:
        return KIND_STRATEGIES[AdapterKind.LORAX_COMPACT]
    if module.is_dora:
        return DORA_STRATEGY
    kind = AdapterKind(kind)
    if kind is AdapterKind.LORAX_COMPACT:  # decoded modules of a compact adapter
        kind = AdapterKind.LORAX
    return KIND_STRATEGIES[kind]
