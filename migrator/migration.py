"""One migration step on local files: open bases, assess them, carry an adapter across.

This is the layer that ``migrator atc`` / ``migrator transfer`` (files only), the pipeline and
remote executors share: it wires :mod:`core` with the settings (patterns, ranks, thresholds,
device, cache), and knows nothing of registries or databases.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from core.adapter import AdapterKind, AdapterLayout, LoraAdapter
from core.atc import ATCResult, compute_atc
from core.errors import InputError
from core.factor_cache import FactorCache
from core.factorize import FactorStore
from core.factors import Factors
from core.formats import (
    CoverageReport,
    decode_compact,
    encode_compact,
    read_adapter,
    resolve_modules,
    write_adapter,
)
from core.matching import Decision, ModuleDecision, match_modules
from core.selection import DEFAULT_PATTERNS, ModuleSelector, RoleRule
from core.transfer import TransferMode, TransferResult, transfer_adapter
from core.weights import WeightSource
from migrator.errors import NothingToTransferError
from migrator.settings import Settings

__all__ = [
    "Assessment",
    "BaseModel",
    "LoadedAdapter",
    "Migrated",
    "NothingToTransferError",
    "ProgressFn",
    "assess",
    "assessment_parameters",
    "load_adapter",
    "migrate",
    "module_map",
    "open_base",
    "role_rule",
    "write_migrated",
]

ProgressFn = Callable[[int, int, str], None]


def role_rule(settings: Settings) -> RoleRule:
    return RoleRule(substitutions=tuple((p, r) for p, r in settings.role_substitutions))


def selector(settings: Settings) -> ModuleSelector:
    return ModuleSelector(tuple(settings.module_patterns or DEFAULT_PATTERNS))


def assessment_parameters(settings: Settings) -> dict[str, object]:
    """Everything an assessment's result depends on besides the two bases' weights."""
    return {
        "similarity_rank": settings.similarity_rank,
        "weighted": settings.weighted_similarity,
        "combine": settings.atc_combine,
        "module_min_similarity": settings.module_min_similarity,
        "patterns": list(settings.module_patterns or DEFAULT_PATTERNS),
        "role_substitutions": [list(p) for p in settings.role_substitutions],
    }


@dataclass
class BaseModel:
    """A base model opened for migration: its weights and its (cached, lazy) factors.

    Attributes:
        label: how messages name it (``name/version`` or a path).
        source: streamed weights.
        store: factors of the selected modules.
    """

    label: str
    source: WeightSource
    store: FactorStore

    @property
    def modules(self) -> tuple[str, ...]:
        """The selected modules (adapter locations)."""
        return self.store.names

    def shapes(self) -> dict[str, tuple[int, int]]:
        """Every matrix of the base, name -> (m, n): what adapter names resolve against."""
        return {info.name: info.shape for info in self.source.modules()}


def open_base(
    path: Path,
    settings: Settings,
    *,
    label: str | None = None,
    weights_path: str | None = None,
    progress: ProgressFn | None = None,
) -> BaseModel:
    """Open a base model's weights and set up its factor store.

    Raises:
        InputError: no weights, pickle refused, corrupt files, or no module matching the
            adapter-location patterns (the message names the base).
    """
    source = WeightSource.open(path, allow_pickle=settings.allow_pickle, weights_path=weights_path)
    names = selector(settings).select(source.names)
    if not names:
        raise InputError(
            "no weight matches the adapter-location patterns (module_patterns); "
            f"{len(source.names)} matrices found",
            path=label or path,
        )
    store = FactorStore(
        source,
        names,
        cache=FactorCache(settings.factor_cache_dir),
        device=settings.device.value,
        progress=progress,
    )
    return BaseModel(label or str(path), source, store)


@dataclass(frozen=True)
class Assessment:
    """ATC of a base pair and the per-module decisions that follow from it."""

    atc: ATCResult
    decisions: tuple[ModuleDecision, ...]
    seconds: float

    def plot(self, out: Path, *, source_label: str, target_label: str) -> Path:
        """Write the similarity heatmap (left and right) with the chosen pairs marked."""
        from migrator.reports import plot_similarity

        atc = self.atc
        matches = [
            (atc.source_index(d.source), atc.target_index(d.target))
            for d in self.decisions
            if d.source is not None and d.decision is not Decision.SKIPPED
        ]
        return plot_similarity(
            atc.phi_left,
            atc.phi_right,
            atc.source_names,
            atc.target_names,
            out,
            title=f"{source_label} -> {target_label}: ATC {atc.atc:.3f}",
            matches=matches,
        )

    @property
    def counts(self) -> dict[str, int]:
        out = {d.value: 0 for d in Decision}
        for decision in self.decisions:
            out[decision.decision.value] += 1
        return out


def assess(source: BaseModel, target: BaseModel, settings: Settings) -> Assessment:
    """Subspace similarities, ATC and module decisions of ``source`` -> ``target``.

    Both bases are factorized once (full thin SVD, cached on disk by content), which later
    transfers reuse; the similarity reads and uses only the leading ``similarity_rank``
    triplets.
    """
    started = time.perf_counter()
    k = settings.similarity_rank
    # Factorizes what the cache lacks (a complete thin SVD, kept for the transfers) but reads
    # back only the leading k columns: an SDXL base's full factors are gigabytes.
    source.store.prefetch(rank=k)
    target.store.prefetch(rank=k)
    atc = compute_atc(
        source.store.view(rank=k),
        target.store.view(rank=k),
        k=k,
        weighted=settings.weighted_similarity,
        role_rule=role_rule(settings),
        combine=settings.atc_combine,
    )
    decisions = match_modules(atc, min_similarity=settings.module_min_similarity)
    return Assessment(atc, decisions, time.perf_counter() - started)


@dataclass(frozen=True)
class LoadedAdapter:
    """An adapter read from files and resolved onto its base's module names."""

    adapter: LoraAdapter
    coverage: CoverageReport
    input_kind: AdapterKind
    path: Path


def load_adapter(path: Path, base: BaseModel, settings: Settings) -> LoadedAdapter:
    """Read an adapter (any layout), resolve it onto ``base`` and expand a compact LoRA-X.

    Raises:
        InputError and subclasses: unreadable file, unknown layout, a module the base lacks or
            whose shape differs, a compact LoRA-X made for another base tensor.
    """
    adapter = read_adapter(path, allow_pickle=settings.allow_pickle)
    adapter, coverage = resolve_modules(adapter, base.shapes(), strict=True)
    kind = adapter.kind
    if kind is AdapterKind.LORAX_COMPACT:
        adapter = decode_compact(adapter, _full_factors(base, adapter.modules))
    return LoadedAdapter(adapter, coverage, kind, path)


def _full_factors(base: BaseModel, names: Mapping[str, object]) -> dict[str, Factors]:
    """Exact factors of ``names`` (modules outside the selection included) from ``base``."""
    missing = [n for n in names if n not in base.store]
    store = base.store
    if missing:  # adapter modules outside the selected locations: factorize them too
        store = FactorStore(
            base.source,
            list(dict.fromkeys([*base.store.names, *missing])),
            cache=base.store.cache,
            device=base.store.device,
        )
    return {name: store.factors(name) for name in names}


@dataclass(frozen=True)
class Migrated:
    """A transferred adapter, ready to write, and its figures."""

    result: TransferResult
    adapter: LoraAdapter  # what to write: compact again when the input was compact

    @property
    def layout(self) -> AdapterLayout:
        return self.adapter.layout


def migrate(
    loaded: LoadedAdapter,
    source: BaseModel,
    target: BaseModel,
    assessment: Assessment | None,
    settings: Settings,
    *,
    mode: str | None = None,
    rank: int | None = None,
) -> Migrated:
    """Transfer ``loaded`` from ``source`` to ``target`` under the assessment's decisions.

    With ``assessment`` None, modules go to the target module of the same name.
    """
    mode = TransferMode(mode or settings.transfer_mode)
    rank = rank if rank is not None else settings.transfer_rank
    result = transfer_adapter(
        loaded.adapter,
        source.store,
        target.store,
        None if assessment is None else assessment.decisions,
        mode=mode,
        rank=rank,
        atc=None if assessment is None else assessment.atc,
    )
    if result.modules_transferred == 0:
        raise NothingToTransferError(
            f"no module of the adapter reaches a module of {target.label} with similarity >= "
            f"module_min_similarity ({settings.module_min_similarity}); nothing to transfer",
            path=loaded.path,
        )
    out = result.adapter
    if loaded.input_kind is AdapterKind.LORAX_COMPACT:
        out = encode_compact(out, _full_factors(target, out.modules))
    return Migrated(result, out)


def write_migrated(migrated: Migrated, out: Path, *, like: Path | None = None) -> list[Path]:
    """Write the transferred adapter under ``out`` in its input layout.

    A PEFT adapter becomes the folder ``out``; a single-file adapter keeps the input's file name
    (``like``) inside ``out`` unless ``out`` ends in ``.safetensors``.
    """
    adapter = migrated.adapter
    if adapter.layout is AdapterLayout.PEFT or out.suffix == ".safetensors":
        return write_adapter(adapter, out)
    out.mkdir(parents=True, exist_ok=True)
    if like is not None and like.is_file() and like.suffix == ".safetensors":
        return write_adapter(adapter, out / like.name)
    return write_adapter(adapter, out)


def module_map(assessment: Assessment | None, result: TransferResult) -> list[dict[str, object]]:
    """One row per module: the decision for each target module and what the adapter gave it."""
    reports = {r.target: r for r in result.modules if r.target is not None}
    rows: list[dict[str, object]] = []
    decisions = assessment.decisions if assessment is not None else ()
    for d in decisions:
        report = reports.get(d.target)
        rows.append(
            {
                "target": d.target,
                "source": d.source,
                "decision": d.decision.value,
                "phi": round(d.phi, 6),
                "phi_left": round(d.phi_left, 6),
                "phi_right": round(d.phi_right, 6),
                "transport_mass": d.mass,
                "reason": d.reason,
                "adapter_update": report is not None and report.rank > 0,
                "energy_source": None if report is None else report.energy_source,
                "energy_target": None if report is None else report.energy_target,
                "notes": [] if report is None else list(report.notes),
            }
        )
    for r in result.modules:  # adapter modules dropped, or all modules without an assessment
        if assessment is None or r.decision is Decision.SKIPPED:
            rows.append(
                {
                    "target": r.target,
                    "source": r.source,
                    "decision": r.decision.value,
                    "phi": r.phi,
                    "adapter_update": r.rank > 0,
                    "energy_source": r.energy_source,
                    "energy_target": r.energy_target,
                    "notes": list(r.notes),
                }
            )
    return rows
