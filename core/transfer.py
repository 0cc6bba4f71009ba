"""Transfer a whole adapter from a source base to a target base (section 4.2, Algorithm 1).

Every module the adapter adapts is considered. A decision (:mod:`core.matching`) gives a target
module its source module(s); an adapter module outside the decided set goes to the target module
of the same name (the assessed module set is a setting, the adapter's own keys are not); what
reaches no target module is named in the result with its reason. Each carried update is
:func:`core.projection.transfer_module` (eq. 3 in project mode, the default at full thin rank,
which is the paper's Algorithm 1). A target fed by several source modules receives the weighted
sum of their carried updates, as one LoRA of the summed rank.

Factors are read only where :func:`core.projection.module_needs` says so, and only what serves
(:mod:`core.factor_bank`): of the target, streamed in shape-batches from a :class:`FactorStore`
(or taken from a mapping), a range basis (one QR) for a rectangular module in project mode at
full rank, the exact leading r triplets in subspace and copy modes; of the source, the leading
triplets for a different shape, a compact LoRA-X, or copy mode without a known dS.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from core.adapter import AdapterKind, LoraAdapter, LoraModule
from core.atc import ATCResult
from core.decisions import Decision, ModuleDecision
from core.errors import InputError
from core.factor_bank import (
    FactorBank,
    bank_factors,
    bank_shape,
    bank_store,
    bank_weight,
    merge_needs,
    stream_for_needs,
)
from core.factorize import FactorStore
from core.factors import Factors, RangeBasis
from core.kinds import strategy_for
from core.modes import BaseNeed, TransferMode
from core.projection import ModuleTransfer, module_needs, transfer_module
from core.transfer_plan import OUTSIDE_ASSESSED, LeftOut, Planned, check_adapter, plan_targets

__all__ = ["OUTSIDE_ASSESSED", "ModuleReport", "TransferMode", "TransferResult", "transfer_adapter"]


@dataclass(frozen=True)
class ModuleReport:
    """What happened to one module.

    Attributes:
        target: the target module updated; for a dropped adapter module, the target module it
            would have gone to (None when the target base has no such module).
        source: the adapter (source) module (the heaviest one for a merged target).
        decision: same_name / rematched, or skipped for a dropped adapter module.
        mode: the transfer mode.
        rank: rank of the transferred update (0 when dropped).
        k: rank of the bases used (0 when dropped).
        energy_source: ||dW_s||_F^2 of the adapter module(s) (r x r Gram products).
        energy_target: ||dW_t||_F^2 of the result (0 when dropped).
        phi: combined similarity of the pair (None without an assessed decision).
        notes: reasons, risks and facts.
        contributions: (source, weight) of every module feeding this target.
    """

    target: str | None
    source: str
    decision: Decision
    mode: TransferMode
    rank: int
    k: int
    energy_source: float
    energy_target: float
    phi: float | None
    notes: tuple[str, ...]
    contributions: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True, eq=False)
class TransferResult:
    """A transferred adapter and its figures.

    Attributes:
        adapter: the new adapter; module names are the target's; kind, layout, config,
            metadata and every other attribute as the input's.
        modules: one :class:`ModuleReport` per updated target module, then one (decision
            ``skipped``) per adapter module whose own target module received nothing.
        modules_transferred: target modules that receive an update (rematched ones included).
        modules_rematched: of those, the ones fed by a source module of another name.
        modules_skipped: adapter modules that feed no target module (dropped). An adapter module
            whose same-named target was skipped but that feeds a rematched target is not
            counted (its report row says so).
        energy_retained: sum ||dW_t||_F^2 over updated target modules / sum ||dW_s||_F^2 over all
            adapter modules (1.0 for an all-zero adapter).
        dropped_energy_share: sum ||dW_s||_F^2 over the dropped adapter modules / the total: the
            share of the adapter that reached no target module (0.0 for an all-zero adapter).
        adapter_weighted_similarity: sum phi * ||dW_s||_F^2 / sum ||dW_s||_F^2 over the report
            rows that have a phi (dropped rows count with their same-name phi); None without
            decisions.
        is_lorax: False for a plain LoRA input ("not a LoRA-X").
        notes: adapter-level notes.
        atc: the comparison the decisions came from, if given.
    """

    adapter: LoraAdapter
    modules: tuple[ModuleReport, ...]
    mode: TransferMode
    rank: int | None
    modules_transferred: int
    modules_rematched: int
    modules_skipped: int
    energy_retained: float
    adapter_weighted_similarity: float | None
    is_lorax: bool
    notes: tuple[str, ...]
    atc: ATCResult | None = None
    dropped_energy_share: float = 0.0

    @property
    def left_out(self) -> tuple[tuple[str, str], ...]:
        """(adapter module, reason) of every module whose update reaches no target module."""
        fed = {s for r in self.modules if r.rank > 0 for s, _ in r.contributions}
        return tuple(
            (r.source, r.notes[0] if r.notes else "")
            for r in self.modules
            if r.decision is Decision.SKIPPED and r.source not in fed
        )


# --- carrying -------------------------------------------------------------------------------


def _combine(carried: Sequence[tuple[ModuleTransfer, float]]) -> ModuleTransfer:
    """sum_i w_i s_i B_i A_i as one pair: up = [w_1 s_1 B_1, ...], down = [A_1; ...], scale 1."""
    if len(carried) == 1 and carried[0][1] == 1.0:
        return carried[0][0]
    up = torch.cat([t.up * (w * t.scale) for t, w in carried], dim=1)
    down = torch.cat([t.down for t, _ in carried], dim=0)
    notes = tuple(dict.fromkeys(n for t, _ in carried for n in t.notes))
    return ModuleTransfer(up, down, 1.0, None, max(t.k for t, _ in carried), notes)


class _Carrier:
    """Carries the planned pairs, reading factors only where a module needs them."""

    def __init__(
        self,
        adapter: LoraAdapter,
        source: FactorBank,
        target: FactorBank,
        mode: TransferMode,
        rank: int | None,
    ) -> None:
        self.adapter, self.source, self.target = adapter, source, target
        self.mode, self.rank = mode, rank
        self.results: dict[tuple[str, str], ModuleTransfer] = {}
        self.digests: dict[str, str] = {}

    def one(self, name: str, src: str, t_factors: Factors | RangeBasis | None) -> None:
        module = self.adapter.modules[src]
        shape = t_factors.shape if t_factors is not None else bank_shape(self.target, name)
        assert shape is not None
        need = module_needs(module, shape, self.mode, self.rank, self.adapter.kind)
        s_factors = None
        if need.source is not None:
            s_factors = bank_factors(self.source, src, need.source.rank)
        try:
            self.results[(name, src)] = transfer_module(
                module, t_factors, s_factors, mode=self.mode, rank=self.rank, kind=self.adapter.kind
            )
        except InputError as exc:  # name the adapter file in the message
            raise type(exc)(exc.reason, path=self.adapter.source, key=exc.key or name) from exc
        self.digests[name] = t_factors.digest if t_factors is not None else ""

    def run(self, planned: Sequence[Planned]) -> None:
        """Square modules at full rank in project mode first (no target factors read or
        computed), then the rest with what each needs of the target streamed in batches: a
        range basis (project mode at full rank), the exact leading triplets, or all of them."""
        needs: dict[str, list[BaseNeed]] = {}
        for p in planned:
            shape = bank_shape(self.target, p.target)
            assert shape is not None  # _plan kept only targets the bank has
            for src, _ in p.sources:
                module = self.adapter.modules[src]
                need = module_needs(module, shape, self.mode, self.rank, self.adapter.kind).target
                if need is None:
                    self.one(p.target, src, None)
                else:
                    needs.setdefault(p.target, []).append(need)
        wanted = {name: merge_needs(ns) for name, ns in needs.items()}
        sources = {p.target: p.sources for p in planned}
        for name, t_factors in stream_for_needs(self.target, wanted):
            for src, _ in sources[name]:
                if (name, src) not in self.results:
                    self.one(name, src, t_factors)

    def carried(self, p: Planned) -> ModuleTransfer:
        return _combine([(self.results[(p.target, s)], w) for s, w in p.sources])


def transfer_adapter(
    adapter: LoraAdapter,
    source: FactorBank,
    target: FactorBank,
    decisions: Sequence[ModuleDecision] | None = None,
    *,
    mode: TransferMode | str = TransferMode.PROJECT,
    rank: int | None = None,
    atc: ATCResult | None = None,
) -> TransferResult:
    """Transfer ``adapter`` from the ``source`` base to the ``target`` base, training-free.

    Args:
        adapter: the adapter, its module names resolved to the source base's.
        source: the source base's factors (a :class:`FactorStore` or name -> exact factors).
        target: the target base's factors (project mode at ``rank`` None needs all p triplets
            of the modules :func:`core.projection.module_needs` reads).
        decisions: from :func:`core.matching.match_modules`; adapter modules they do not decide
            (and every module when None) go to the target module of the same name.
        mode: project (eq. 3), subspace (a LoRA-X of the target) or copy (Table 5 ablation).
        rank: see :func:`core.projection.transfer_module` (project: k, default p).
        atc: the comparison behind ``decisions``, kept in the result.

    Returns:
        A :class:`TransferResult`. A module's scale is kept and folded into ``down`` where the
        mode rebuilds it, so that scale * up @ down is the transferred update; up and down are
        float32. A module's ``ds`` is taken as the true dS (dW = U_r dS V_r^T).

    Raises:
        ShapeMismatchError: an adapter module whose shape differs from the source base's weight.
        MissingModuleError: a transferred adapter module absent from the source base.
        NonFiniteError: NaN/Inf in the adapter.
        BaseMismatchError: a compact module trained on another base tensor.
        ValueError: duplicate decisions, or factors too small for the request.
    """
    mode = TransferMode(mode)
    planned, left_out = plan_targets(adapter, target, decisions)
    check_adapter(adapter, source, {s for p in planned for s, _ in p.sources})
    carrier = _Carrier(adapter, source, target, mode, rank)
    carrier.run(planned)
    carried = {p.target: carrier.carried(p) for p in planned}
    modules = {
        p.target: _output_module(adapter, p, carried[p.target], carrier.digests, bank_store(target))
        for p in planned
    }
    finished = _finish(adapter, planned, modules, source, target)
    energy = {name: module.energy() for name, module in adapter.modules.items()}
    reports = _reports(planned, left_out, modules, carried, energy, mode, finished)
    return _result(adapter, modules, reports, energy, mode, rank, atc)


def _finish(
    adapter: LoraAdapter,
    planned: Sequence[Planned],
    modules: dict[str, LoraModule],
    source: FactorBank,
    target: FactorBank,
) -> dict[str, tuple[str, ...]]:
    """Let each kind strategy that needs the bases' weights finish its carried modules (DoRA:
    the magnitude, from the heaviest source of a merged target); returns their notes."""
    notes: dict[str, tuple[str, ...]] = {}
    for p in planned:
        module = adapter.modules[p.primary]
        strategy = strategy_for(module, adapter.kind)
        if not strategy.needs_weights:
            continue
        modules[p.target], extra = strategy.finish(
            module,
            modules[p.target],
            functools.partial(bank_weight, source, p.primary),
            functools.partial(bank_weight, target, p.target),
        )
        if len(p.sources) > 1:
            extra = (*extra, f"DoRA magnitude carried from {p.primary}, the heaviest source")
        notes[p.target] = extra
    return notes


def _output_module(
    adapter: LoraAdapter,
    p: Planned,
    res: ModuleTransfer,
    digests: Mapping[str, str],
    target_store: FactorStore | None,
) -> LoraModule:
    own = adapter.modules.get(p.target)
    if target_store is not None:
        stored = target_store.info(p.target).stored_shape
        weight_shape = stored if len(stored) != 2 else None
    else:  # no file to ask: keep the module's own stored shape where it went to itself
        shape = (int(res.up.shape[0]), int(res.down.shape[1]))
        itself = own is not None and p.sources == ((p.target, 1.0),) and own.shape == shape
        weight_shape = own.weight_shape if itself and own is not None else None
    digest = digests.get(p.target, "") if res.ds is not None else ""
    return LoraModule(
        name=p.target,
        up=res.up,
        down=res.down,
        scale=res.scale,
        ds=res.ds,
        base_digest=digest or None,
        source_key=own.source_key if own is not None else None,
        weight_shape=weight_shape,
    )


def _reports(
    planned: Sequence[Planned],
    left_out: LeftOut,
    modules: Mapping[str, LoraModule],
    carried: Mapping[str, ModuleTransfer],
    energy: Mapping[str, float],
    mode: TransferMode,
    finished: Mapping[str, tuple[str, ...]],
) -> list[ModuleReport]:
    reports: list[ModuleReport] = []
    for p in planned:
        out, res = modules[p.target], carried[p.target]
        fed_by = tuple(f"fed by source module {s}" for s, _ in p.sources if s != p.target)
        extra = finished.get(p.target, ())
        reports.append(
            ModuleReport(
                target=p.target,
                source=p.primary,
                decision=p.decision,
                mode=mode,
                rank=out.rank,
                k=res.k,
                energy_source=sum(energy[s] for s, _ in p.sources),
                energy_target=out.energy(),
                phi=p.phi,
                notes=(*((p.note,) if p.note else ()), *fed_by, *res.notes, *extra),
                contributions=p.sources,
            )
        )
    fed = {s: p.target for p in planned for s, _ in p.sources}
    for name, (where, phi, why) in left_out.items():
        if name in fed:
            why = f"{why} (its update still feeds {fed[name]})"
        reports.append(
            ModuleReport(
                target=where,
                source=name,
                decision=Decision.SKIPPED,
                mode=mode,
                rank=0,
                k=0,
                energy_source=energy[name],
                energy_target=0.0,
                phi=phi,
                notes=(why,),
            )
        )
    return reports


def _result(
    adapter: LoraAdapter,
    modules: dict[str, LoraModule],
    reports: Sequence[ModuleReport],
    energy: Mapping[str, float],
    mode: TransferMode,
    rank: int | None,
    atc: ATCResult | None,
) -> TransferResult:
    planned = [r for r in reports if r.contributions]  # the rest are dropped modules
    fed = {s for r in planned for s, _ in r.contributions}
    total_source = sum(energy.values())
    total_target = sum(r.energy_target for r in reports)
    dropped = sum(e for name, e in energy.items() if name not in fed)
    weighted = [(r.phi, r.energy_source) for r in reports if r.phi is not None]
    weight = sum(w for _, w in weighted)
    similarity = None
    if weighted:
        similarity = sum(p * w for p, w in weighted) / weight if weight > 0 else 0.0
    notes: list[str] = []
    if not adapter.is_lorax:
        notes.append("not a LoRA-X: a plain LoRA projected onto the target (paper Table 2)")
    if adapter.kind is AdapterKind.LORAX_COMPACT and mode is TransferMode.PROJECT:
        notes.append("project mode yields no dS: write the result in expanded form")
    return TransferResult(
        adapter=dataclasses.replace(adapter, modules=modules),
        modules=tuple(reports),
        mode=mode,
        rank=rank,
        modules_transferred=len(planned),
        modules_rematched=sum(any(s != r.target for s, _ in r.contributions) for r in planned),
        modules_skipped=sum(name not in fed for name in adapter.modules),
        energy_retained=total_target / total_source if total_source > 0 else 1.0,
        dropped_energy_share=dropped / total_source if total_source > 0 else 0.0,
        adapter_weighted_similarity=similarity,
        is_lorax=adapter.is_lorax,
        notes=tuple(notes),
        atc=atc,
    )
