"""The work of one transfer job that needs no job database: download, transfer under the
approved module decisions, write, log the migration run, register the new version. It runs in
the daemon (local executor) or on a remote worker (Ray), and returns a small, picklable result;
the job database is written by the caller.

The job carries the assessment it was planned and approved with (:class:`ApprovedAssessment`):
its ATC, the parameters it was computed under, every module decision and the rendered
heatmap. The worker applies exactly those decisions; it never re-assesses the bases, so a setting
changed after an approval cannot publish a module map other than the approved one.

Registration is idempotent: a version of the lineage already on the target and transferred from
the same source (registered by an earlier run of this job, or by a job of another job database
sharing the registry) is found and returned instead of registering a second one, so a job that
is re-run after a crash between registering and recording ends with exactly one version.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.adapter import LoraAdapter
from core.decisions import ModuleDecision
from core.errors import InputError
from core.transfer import TransferResult
from db.jobs import POLICY_ACTOR
from migrator.adapters import (
    CarriedAdapter,
    carry_adapter,
    conversion_notes,
    load_adapter,
    single_file_of,
    write_carried,
)
from migrator.documents import ModuleCounts, module_map
from migrator.pipeline.context import Workspace, crash_point
from migrator.policy import (
    Signal,
    Verdict,
    agreement_of,
    signals_from_json,
    signals_json,
    transfer_signals,
)
from migrator.registry import ModelVersionInfo, Registry, RunInfo, Tag, VersionRef
from migrator.reports import TransferSummary, version_description
from migrator.settings import Settings

__all__ = [
    "ApprovedAssessment",
    "MissingAssessmentError",
    "TransferDone",
    "TransferHeld",
    "TransferRequest",
    "find_registered",
    "perform_transfer",
]


@dataclass(frozen=True)
class ApprovedAssessment:
    """The assessment a job was planned and approved with, as the job database stores it.

    Attributes:
        assessment_id: its row in the job database.
        atc, atc_left, atc_right: the figures the policy decided on.
        parameters: what it was computed under (``migrator.bases.assessment_parameters``).
        decisions: every target module's decision.
        figures: file name -> bytes of the figures rendered from it (the heatmap).
    """

    assessment_id: int
    atc: float
    atc_left: float
    atc_right: float
    parameters: Mapping[str, Any]
    decisions: tuple[ModuleDecision, ...]
    figures: Mapping[str, bytes] = field(default_factory=dict)
    signals: Mapping[str, Any] = field(default_factory=dict)  # drift, functional check


class MissingAssessmentError(InputError):
    """A job whose stored assessment is gone: there are no approved decisions to apply."""


class TransferHeld(Exception):
    """A job approved by the policy whose transferred adapter fails a signal: it waits for an
    admin and nothing is registered (``reason``; ``signals``: the transfer's, as stored)."""

    def __init__(self, reason: str, signals: list[dict[str, Any]]) -> None:
        super().__init__(reason, signals)
        self.reason, self.signals = reason, signals

    def __str__(self) -> str:
        return self.reason


@dataclass(frozen=True)
class TransferRequest:
    """What a worker needs to know of a claimed job."""

    job_id: int
    adapter: VersionRef
    source: VersionRef
    target: VersionRef
    mode: str
    approved_by: str
    assessment: ApprovedAssessment | None  # None: its stored assessment was deleted
    signals: tuple[Mapping[str, Any], ...] = ()  # the planning decision's, as stored


@dataclass(frozen=True)
class TransferDone:
    """What a worker reports back: the registered version and a few figures."""

    job_id: int
    version: VersionRef
    run_id: str | None
    format: str
    layout: str | None
    rank: int | None
    reused: bool  # found already registered (a re-run after a crash)
    signals: tuple[Mapping[str, Any], ...] = ()  # measured on the transferred adapter


def find_registered(registry: Registry, request: TransferRequest) -> ModelVersionInfo | None:
    """A version of the job's lineage already on its target, transferred from the same source:
    the one an earlier run of this job registered, or one another job database sharing the
    registry made. The oldest such version that is not marked a duplicate (the one the
    reconciler keeps)."""
    found = registry.find_versions(
        request.adapter.name,
        {Tag.TRANSFERRED_FROM: str(request.adapter), Tag.BASE: str(request.target)},
    )
    kept = [v for v in found if Tag.DUPLICATE_OF not in v.tags and Tag.JOB in v.tags]
    return kept[0] if kept else None


def _reused(request: TransferRequest, existing: ModelVersionInfo) -> TransferDone:
    fmt = existing.tags.get(Tag.FORMAT, "lora")
    return TransferDone(request.job_id, existing.ref, existing.run_id, fmt, None, None, True)


def perform_transfer(
    settings: Settings,
    registry: Registry,
    workspace: Workspace,
    request: TransferRequest,
    *,
    before_publish: Callable[[], None] | None = None,
) -> TransferDone:
    """Carry the job's adapter to its target base under the approved decisions and register
    the result.

    Args:
        before_publish: called right before anything is written to the registry (the local
            executor checks its lease there: work whose lease moved on is not published).

    Raises:
        InputError: bad adapter or base content (not worth retrying).
        RegistryError, OSError, ...: passing faults (worth retrying).
    """
    existing = find_registered(registry, request)
    if existing is not None:
        return _reused(request, existing)
    approved = request.assessment
    if approved is None:
        raise MissingAssessmentError(
            f"job {request.job_id} has no stored assessment, so no approved module decisions: "
            "reject it and let the next pass plan the transfer again"
        )
    source = workspace.base(registry.get_version(request.source))
    target = workspace.base(registry.get_version(request.target))
    adapter_info = registry.get_version(request.adapter)
    adapter_path = workspace.adapter_files(request.adapter)
    loaded = load_adapter(adapter_path, source, settings)
    crash_point("mid_transfer")
    carried = carry_adapter(loaded, source, target, approved.decisions, settings, mode=request.mode)
    checked = _transfer_signals(settings, registry, workspace, request, loaded.adapter, carried)
    out = settings.scratch_dir / "jobs" / str(request.job_id)
    if out.exists():
        shutil.rmtree(out)
    adapter_dir = out / "adapter"
    write_carried(carried, adapter_dir, like=single_file_of(adapter_path))
    artifacts: dict[str, Path] = {"adapter": adapter_dir}
    rows = module_map(approved.decisions, carried.result)
    (out / "module_map.json").write_text(json.dumps(rows, indent=2))
    artifacts["module_map.json"] = out / "module_map.json"
    for name, content in approved.figures.items():
        (out / name).write_bytes(content)
        artifacts[name] = out / name
    if before_publish is not None:
        before_publish()
    run = registry.log_run(
        experiment=settings.experiment_name,
        run_name=f"{request.adapter} -> {request.target}",
        job_key=str(request.job_id),
        params=_params(
            request, approved, carried.result, loaded.input_kind.value, carried.layout.value
        ),
        metrics=_metrics(approved, carried.result, [*request.signals, *checked]),
        tags={Tag.TRANSFERRED_FROM: str(request.adapter), Tag.BASE: str(request.target)},
        artifacts=artifacts,
    )
    crash_point("after_run")
    shown = signals_from_json([*request.signals, *checked])
    version = _register(registry, request, approved, run, carried.result, adapter_info, shown)
    crash_point("after_register")
    fmt = version.tags.get(Tag.FORMAT, "lora")
    rank = carried.adapter.rank
    return TransferDone(
        request.job_id, version.ref, run.run_id, fmt, carried.layout.value, rank, False, checked
    )


def _transfer_signals(
    settings: Settings,
    registry: Registry,
    workspace: Workspace,
    request: TransferRequest,
    adapter: LoraAdapter,
    carried: CarriedAdapter,
) -> tuple[dict[str, Any], ...]:
    """The signals measured on the transferred adapter, before anything is registered: the
    share of its energy left out, its effect agreement (:mod:`migrator.policy`).

    Raises:
        TransferHeld: one fails and the job was approved by the policy, not by an admin.
    """
    check: dict[str, Any] = {"unavailable": "the functional check is off"}
    if settings.functional_check:
        folders = [
            workspace.base_folder(registry.get_version(ref))
            for ref in (request.source, request.target)
        ]
        check = workspace.functional.adapter_check(
            folders[0], folders[1], adapter, carried.result.adapter
        )
    agreement, unavailable = agreement_of(check, "agreement")
    signals = transfer_signals(
        carried.result.dropped_energy_share, agreement, unavailable, settings
    )
    stored = tuple(signals_json(signals))
    failing = [x.line() for x in signals if x.verdict is Verdict.HOLD]
    if failing and request.approved_by == POLICY_ACTOR:
        left_out = "; ".join(f"{m} ({why})" for m, why in carried.result.left_out[:5])
        reason = "held after the transfer, nothing registered: " + "; ".join(failing)
        raise TransferHeld(reason + (f"; left out: {left_out}" if left_out else ""), list(stored))
    return stored


def _params(
    request: TransferRequest,
    approved: ApprovedAssessment,
    result: TransferResult,
    input_kind: str,
    layout: str,
) -> dict[str, str]:
    parameters = approved.parameters
    return {
        "adapter": str(request.adapter),
        "source_base": str(request.source),
        "target_base": str(request.target),
        "mode": result.mode.value,
        "rank": str(result.rank),
        "similarity_rank": str(parameters.get("similarity_rank")),
        "module_min_similarity": str(parameters.get("module_min_similarity")),
        "assessment_id": str(approved.assessment_id),
        "input_kind": input_kind,
        "layout": layout,
    }


def _metrics(
    approved: ApprovedAssessment, result: TransferResult, signals: Sequence[Mapping[str, Any]]
) -> dict[str, float]:
    measured = {
        f"signal_{x['name']}": float(x["value"]) for x in signals if x.get("value") is not None
    }
    return {
        **measured,
        "atc": approved.atc,
        "atc_left": approved.atc_left,
        "atc_right": approved.atc_right,
        "energy_retained": result.energy_retained,
        "dropped_energy_share": result.dropped_energy_share,
        "adapter_weighted_similarity": result.adapter_weighted_similarity or 0.0,
        "modules_transferred": result.modules_transferred,
        "modules_rematched": result.modules_rematched,
        "modules_skipped": result.modules_skipped,
        **ModuleCounts.of_transfer(result, approved.decisions).metrics(),
    }


def _register(
    registry: Registry,
    request: TransferRequest,
    approved: ApprovedAssessment,
    run: RunInfo,
    result: TransferResult,
    adapter_info: ModelVersionInfo,
    signals: Sequence[Signal],
) -> ModelVersionInfo:
    found = find_registered(registry, request)
    if found is not None:
        return found  # registered before a crash: the same version, not a second one
    fmt = adapter_info.tags.get(Tag.FORMAT, "lorax" if result.is_lorax else "lora")
    tags = {
        Tag.ROLE: "adapter",
        Tag.BASE: str(request.target),
        Tag.FORMAT: fmt,
        Tag.TRANSFERRED_FROM: str(request.adapter),
        Tag.JOB: str(request.job_id),
        Tag.ATC: f"{approved.atc:.4f}",
        Tag.APPROVED_BY: request.approved_by,
        Tag.MODE: result.mode.value,
        Tag.ENERGY: f"{result.energy_retained:.4f}",
    }
    summary = TransferSummary(
        adapter_name=request.adapter.name,
        source_version=request.adapter.version,
        source_link=registry.version_link(request.adapter),
        old_base=str(request.source),
        old_base_link=registry.version_link(request.source),
        new_base=str(request.target),
        new_base_link=registry.version_link(request.target),
        run_link=registry.run_link(run),
        job_id=request.job_id,
        atc=approved.atc,
        atc_left=approved.atc_left,
        atc_right=approved.atc_right,
        mode=result.mode.value,
        energy_retained=result.energy_retained,
        counts=ModuleCounts.of_transfer(result, approved.decisions),
        approved_by=request.approved_by,
        is_lorax=result.is_lorax,
        notes=(*result.notes, *conversion_notes(result.adapter)),
        signals=tuple((x.name, x.line()) for x in signals),
    )
    return registry.create_version(
        name=request.adapter.name,
        run=run,
        artifact_path="adapter",
        tags=tags,
        description=version_description(summary),
    )
