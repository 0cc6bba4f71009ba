"""Transfer a whole adapter from a source base to a target base (section 4.2, Algorithm 1).

Each target module that a decision (:mod:`core.matching`) gives a source module receives that
module's update, carried by :func:`core.projection.transfer_module` (eq. 3 in project mode, the
default at full thin rank k = p, which is the paper's Algorithm 1). Target factors are streamed in
shape-batches from a :class:`FactorStore` (or taken from a mapping); source factors are read only
when a module needs them (different shape, compact LoRA-X, copy mode without a known dS).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from core.adapter import AdapterKind, LoraAdapter, LoraModule
from core.atc import ATCResult
from core.errors import InputError, MissingModuleError, NonFiniteError, ShapeMismatchError
from core.factorize import FactorStore, FactorView
from core.factors import Factors
from core.finite import all_finite
from core.matching import Decision, ModuleDecision
from core.projection import (
    ModuleTransfer,
    TransferMode,
    needs_source_factors,
    needs_target_factors,
    transfer_module,
)

__all__ = ["ModuleReport", "TransferMode", "TransferResult", "transfer_adapter"]

FactorBank = FactorStore | Mapping[str, Factors]


@dataclass(frozen=True)
class ModuleReport:
    """What happened to one module.

    Attributes:
        target: the target module updated; for a dropped adapter module, the target module it
            would have gone to (None when the target base has no such module).
        source: the adapter (source) module.
        decision: same_name / rematched, or skipped for a dropped adapter module.
        mode: the transfer mode.
        rank: rank of the transferred update (0 when dropped).
        k: rank of the bases used (0 when dropped).
        energy_source: ||dW_s||_F^2 of the adapter module (r x r Gram products).
        energy_target: ||dW_t||_F^2 of the result (0 when dropped).
        phi: combined similarity of the pair (None without decisions).
        notes: reasons, risks and facts.
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


@dataclass(frozen=True, eq=False)
class TransferResult:
    """A transferred adapter and its figures.

    Attributes:
        adapter: the new adapter; module names are the target's, layout, kind, config and
            metadata as the input's.
        modules: one :class:`ModuleReport` per updated target module, then one (decision
            ``skipped``) per adapter module whose own target module received nothing.
        modules_transferred: target modules that receive an update (rematched ones included).
        modules_rematched: of those, the ones fed by a source module of another name.
        modules_skipped: adapter modules that feed no target module (dropped). An adapter module
            whose same-named target was skipped but that feeds a rematched target is not
            counted (its report row says so).
        energy_retained: sum ||dW_t||_F^2 over updated target modules / sum ||dW_s||_F^2 over all
            adapter modules (1.0 for an all-zero adapter).
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


@dataclass(frozen=True)
class _Pair:
    target: str
    source: str
    decision: Decision
    phi: float | None


def _store(bank: FactorBank) -> FactorStore | None:
    """The store behind ``bank``, if any (a view is answered at the rank the transfer needs)."""
    if isinstance(bank, FactorStore):
        return bank
    return bank.store if isinstance(bank, FactorView) else None


def _shape(bank: FactorBank, name: str) -> tuple[int, int] | None:
    store = _store(bank)
    if store is not None:
        return store.shape(name) if name in store else None
    assert not isinstance(bank, FactorStore)
    factors = bank.get(name)
    return None if factors is None else factors.shape


def _get(bank: FactorBank, name: str, rank: int | None) -> Factors:
    store = _store(bank)
    if store is not None:
        factors = store.factors(name, rank)
    else:
        assert not isinstance(bank, FactorStore)
        factors = bank[name]
    if not factors.exact:
        raise ValueError(f"module {name}: randomized factors are for similarity, not transfer")
    return factors


def _stream(
    bank: FactorBank, names: Sequence[str], rank: int | None
) -> Iterator[tuple[str, Factors]]:
    store = _store(bank)
    if store is not None:
        yield from store.iter_factors(names, rank)
    else:
        for name in names:
            yield name, _get(bank, name, rank)


def _check_adapter(adapter: LoraAdapter, source: FactorBank, used: set[str]) -> None:
    """Shapes against the source base; presence for used modules; finite values."""
    for name, module in adapter.modules.items():
        shape = _shape(source, name)
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


def _plan(
    adapter: LoraAdapter, target: FactorBank, decisions: Sequence[ModuleDecision] | None
) -> tuple[list[_Pair], dict[str, tuple[str | None, float | None, str]]]:
    """Pairs to transfer, and per adapter module not fed as its own target:
    (target it would have gone to, phi, reason)."""
    pairs: list[_Pair] = []
    left_out: dict[str, tuple[str | None, float | None, str]] = {}
    if decisions is None:
        for name in adapter.modules:
            if _shape(target, name) is None:
                left_out[name] = (None, None, "no module of that name in the target base")
            else:
                pairs.append(_Pair(name, name, Decision.SAME_NAME, None))
        return pairs, left_out
    seen: set[str] = set()
    for d in decisions:
        if d.target in seen:
            raise ValueError(f"two decisions for target module {d.target}")
        seen.add(d.target)
        if (
            d.decision is not Decision.SKIPPED
            and d.source is not None
            and d.source in adapter.modules
        ):
            pairs.append(_Pair(d.target, d.source, Decision(d.decision), d.phi))
        elif d.target in adapter.modules:
            left_out[d.target] = (d.target, d.phi, d.reason)
    fed = {pair.source for pair in pairs}
    took = {pair.target: pair for pair in pairs}
    for name in adapter.modules:
        if name in fed or name in left_out:
            continue
        if name in took:
            why = f"target module of that name took {took[name].source}'s update instead"
            left_out[name] = (name, None, why)
        else:
            left_out[name] = (None, None, "not among the decided target modules")
    return pairs, left_out


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
        target: the target base's factors (project mode at ``rank`` None needs all p triplets).
        decisions: from :func:`core.matching.match_modules`; None maps each adapter module to
            the target module of the same name.
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
    pairs, left_out = _plan(adapter, target, decisions)
    _check_adapter(adapter, source, {p.source for p in pairs})
    by_target = {p.target: p for p in pairs}
    if mode is TransferMode.PROJECT:
        target_rank = rank
    else:
        target_rank = max((rank or adapter.modules[p.source].rank for p in pairs), default=1)
    results: dict[str, ModuleTransfer] = {}
    target_shapes: dict[str, tuple[int, ...] | None] = {}
    digests: dict[str, str] = {}
    target_store = _store(target)

    def carry(name: str, t_factors: Factors | None, shape: tuple[int, int]) -> None:
        pair = by_target[name]
        module = adapter.modules[pair.source]
        needs_source = needs_source_factors(module, shape, mode)
        s_factors = _get(source, pair.source, None) if needs_source else None
        try:
            results[name] = transfer_module(
                module, t_factors, s_factors, mode=mode, rank=rank, lorax=adapter.is_lorax
            )
        except InputError as exc:  # name the adapter file in the message
            raise type(exc)(exc.reason, path=adapter.source, key=exc.key or name) from exc
        digests[name] = t_factors.digest if t_factors is not None else ""
        if target_store is not None:
            stored = target_store.info(name).stored_shape
            target_shapes[name] = stored if len(stored) != 2 else None
        else:
            same = name == pair.source and shape == module.shape
            target_shapes[name] = module.weight_shape if same else None

    # Square modules at full rank in project mode are carried as they are (the projectors are
    # the identity): their target factors are neither read nor computed.
    streamed = []
    for pair in pairs:
        shape = _shape(target, pair.target)
        assert shape is not None  # _plan kept only targets the bank has
        if needs_target_factors(adapter.modules[pair.source], shape, mode, rank):
            streamed.append(pair.target)
        else:
            carry(pair.target, None, shape)
    for name, t_factors in _stream(target, streamed, target_rank):
        carry(name, t_factors, t_factors.shape)
    return _assemble(adapter, pairs, left_out, results, target_shapes, digests, mode, rank, atc)


def _assemble(
    adapter: LoraAdapter,
    pairs: list[_Pair],
    left_out: dict[str, tuple[str | None, float | None, str]],
    results: dict[str, ModuleTransfer],
    target_shapes: dict[str, tuple[int, ...] | None],
    digests: dict[str, str],
    mode: TransferMode,
    rank: int | None,
    atc: ATCResult | None,
) -> TransferResult:
    modules: dict[str, LoraModule] = {}
    reports: list[ModuleReport] = []
    energy = {name: module.energy() for name, module in adapter.modules.items()}
    for pair in pairs:
        res = results[pair.target]
        own = adapter.modules.get(pair.target)
        digest = digests[pair.target] if res.ds is not None else ""
        out = LoraModule(
            name=pair.target,
            up=res.up,
            down=res.down,
            scale=res.scale,
            ds=res.ds,
            base_digest=digest or None,
            source_key=own.source_key if own is not None else None,
            weight_shape=target_shapes.get(pair.target),
        )
        modules[pair.target] = out
        fed_by = () if pair.source == pair.target else (f"fed by source module {pair.source}",)
        reports.append(
            ModuleReport(
                target=pair.target,
                source=pair.source,
                decision=pair.decision,
                mode=mode,
                rank=out.rank,
                k=res.k,
                energy_source=energy[pair.source],
                energy_target=out.energy(),
                phi=pair.phi,
                notes=fed_by + res.notes,
            )
        )
    fed = {pair.source: pair.target for pair in pairs}
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
    total_source = sum(energy.values())
    total_target = sum(r.energy_target for r in reports)
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
        adapter=LoraAdapter(
            modules=modules,
            kind=adapter.kind,
            layout=adapter.layout,
            config=adapter.config,
            metadata=adapter.metadata,
            source=adapter.source,
        ),
        modules=tuple(reports),
        mode=mode,
        rank=rank,
        modules_transferred=len(pairs),
        modules_rematched=sum(p.source != p.target for p in pairs),
        modules_skipped=sum(name not in fed for name in adapter.modules),
        energy_retained=total_target / total_source if total_source > 0 else 1.0,
        adapter_weighted_similarity=similarity,
        is_lorax=adapter.is_lorax,
        notes=tuple(notes),
        atc=atc,
    )
