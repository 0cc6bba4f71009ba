"""Which target module each adapter module goes to, before anything is carried.

A decision (:mod:`core.matching`) names a target module's source module(s); an adapter module
that no decision names goes to the target module of the same name (the assessed module set is a
setting, the adapter's own keys are not); what reaches no target module is kept with its reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from core.adapter import LoraAdapter
from core.decisions import Decision, ModuleDecision
from core.errors import MissingModuleError, NonFiniteError, ShapeMismatchError
from core.factor_bank import FactorBank, bank_shape
from core.finite import all_finite

__all__ = ["OUTSIDE_ASSESSED", "LeftOut", "Planned", "check_adapter", "plan_targets"]

OUTSIDE_ASSESSED = "outside the assessed module set: carried to the target module of the same name"


@dataclass(frozen=True)
class Planned:
    """One target module and the adapter modules that feed it."""

    target: str
    sources: tuple[tuple[str, float], ...]
    decision: Decision
    phi: float | None
    note: str | None = None

    @property
    def primary(self) -> str:
        return max(self.sources, key=lambda s: s[1])[0]


def check_adapter(adapter: LoraAdapter, source: FactorBank, used: set[str]) -> None:
    """Shapes against the source base; presence for used modules; finite values."""
    for name, module in adapter.modules.items():
        shape = bank_shape(source, name)
        if shape is None:
            if name in used:
                raise MissingModuleError(
                    "adapter module has no weight of that name in the source base",
                    path=adapter.source,
                    key=name,
                )
            continue
        if shape != module.shape:
            m, n = module.shape
            raise ShapeMismatchError(
                f"adapter update is {m} x {n} but the source base weight is "
                f"{shape[0]} x {shape[1]}: the adapter was not trained on this base",
                path=adapter.source,
                key=name,
            )
        tensors = [module.ds] if module.is_compact else [module.up, module.down]
        if any(t is not None and not all_finite(t) for t in tensors):
            raise NonFiniteError("adapter module holds NaN/Inf", path=adapter.source, key=name)


LeftOut = dict[str, tuple[str | None, float | None, str]]
"""adapter module -> (target it would have gone to, phi, reason)."""


def _decided(
    adapter: LoraAdapter, decisions: Sequence[ModuleDecision]
) -> tuple[list[Planned], LeftOut]:
    planned: list[Planned] = []
    left_out: LeftOut = {}
    seen: set[str] = set()
    for d in decisions:
        if d.target in seen:
            raise ValueError(f"two decisions for target module {d.target}")
        seen.add(d.target)
        sources = tuple((s, w) for s, w in d.sources if s in adapter.modules)
        if sources:
            planned.append(Planned(d.target, sources, Decision(d.decision), d.phi))
        elif d.target in adapter.modules:
            left_out[d.target] = (d.target, d.phi, d.reason)
    return planned, left_out


def plan_targets(
    adapter: LoraAdapter, target: FactorBank, decisions: Sequence[ModuleDecision] | None
) -> tuple[list[Planned], LeftOut]:
    """Target modules to update and, per adapter module fed nowhere, why."""
    planned, left_out = _decided(adapter, decisions or ())
    decided = {d.target for d in decisions or ()}
    fed = {s for p in planned for s, _ in p.sources}
    took = {p.target: p for p in planned}
    for name in adapter.modules:
        if name in fed or name in left_out:
            continue
        if name in took:
            why = f"target module of that name took {took[name].primary}'s update instead"
            left_out[name] = (name, None, why)
        elif name not in decided and bank_shape(target, name) is not None:
            note = OUTSIDE_ASSESSED if decisions is not None else None
            planned.append(Planned(name, ((name, 1.0),), Decision.SAME_NAME, None, note))
        else:
            left_out[name] = (None, None, "no module of that name in the target base")
    return planned, left_out
