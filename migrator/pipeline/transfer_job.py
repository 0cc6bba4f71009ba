"""The work of one transfer job that needs no job database: download, transfer, write, log the
migration run, register the new version. It runs in the daemon (local executor) or on a remote
worker (Ray), and returns a small, picklable result; the job database is written by the caller.

Registration is idempotent: a version carrying this job's ``lorax.job`` tag (with the same
source and target) is found and returned instead of registering a second one, so a job that is
re-run after a crash between registering and recording ends with exactly one version.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from core.transfer import TransferResult
from migrator.migration import assess, load_adapter, migrate, module_map, write_migrated
from migrator.pipeline.context import Workspace, crash_point
from migrator.registry import ModelVersionInfo, Registry, RunInfo, Tag, VersionRef
from migrator.reports import TransferSummary, version_description
from migrator.settings import Settings

__all__ = ["TransferDone", "TransferRequest", "find_registered", "perform_transfer"]


@dataclass(frozen=True)
class TransferRequest:
    """What a worker needs to know of a claimed job."""

    job_id: int
    adapter: VersionRef
    source: VersionRef
    target: VersionRef
    mode: str
    approved_by: str


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


def find_registered(registry: Registry, request: TransferRequest) -> ModelVersionInfo | None:
    """The version an earlier run of this job registered, if any."""
    found = registry.find_version_by_tag(request.adapter.name, Tag.JOB, str(request.job_id))
    if (
        found is not None
        and found.tags.get(Tag.TRANSFERRED_FROM) == str(request.adapter)
        and found.tags.get(Tag.BASE) == str(request.target)
    ):
        return found
    return None


def perform_transfer(
    settings: Settings,
    registry: Registry,
    workspace: Workspace,
    request: TransferRequest,
    *,
    before_publish: Callable[[], None] | None = None,
) -> TransferDone:
    """Carry the job's adapter to its target base and register the result.

    Args:
        before_publish: called right before anything is written to the registry (the local
            executor checks its lease there: work whose lease moved on is not published).

    Raises:
        InputError: bad adapter or base content (not worth retrying).
        RegistryError, OSError, ...: passing faults (worth retrying).
    """
    existing = find_registered(registry, request)
    if existing is not None:
        return TransferDone(
            request.job_id,
            existing.ref,
            existing.run_id,
            existing.tags.get(Tag.FORMAT, "lora"),
            None,
            None,
            reused=True,
        )
    s = settings
    source = workspace.base(registry.get_version(request.source))
    target = workspace.base(registry.get_version(request.target))
    adapter_info = registry.get_version(request.adapter)
    adapter_path = workspace.adapter_files(request.adapter)
    loaded = load_adapter(adapter_path, source, s)
    assessment = assess(source, target, s)  # cached factors: recomputing is cheap and exact
    crash_point("mid_transfer")
    migrated = migrate(loaded, source, target, assessment, s, mode=request.mode)
    result = migrated.result
    out = s.scratch / "jobs" / str(request.job_id)
    if out.exists():
        shutil.rmtree(out)
    adapter_dir = out / "adapter"
    write_migrated(migrated, adapter_dir, like=_single_file(adapter_path))
    (out / "module_map.json").write_text(json.dumps(module_map(assessment, result), indent=2))
    atc = assessment.atc
    assessment.plot(
        out / "similarity.png", source_label=str(request.source), target_label=str(request.target)
    )
    if before_publish is not None:
        before_publish()
    run = registry.log_run(
        experiment=s.experiment_name,
        run_name=f"{request.adapter} -> {request.target}",
        job_key=str(request.job_id),
        params={
            "adapter": str(request.adapter),
            "source_base": str(request.source),
            "target_base": str(request.target),
            "mode": result.mode.value,
            "rank": str(result.rank),
            "similarity_rank": str(s.similarity_rank),
            "module_min_similarity": str(s.module_min_similarity),
            "input_kind": loaded.input_kind.value,
            "layout": migrated.layout.value,
        },
        metrics={
            "atc": atc.atc,
            "atc_left": atc.atc_left,
            "atc_right": atc.atc_right,
            "energy_retained": result.energy_retained,
            "adapter_weighted_similarity": result.adapter_weighted_similarity or 0.0,
            "modules_transferred": result.modules_transferred,
            "modules_rematched": result.modules_rematched,
            "modules_skipped": result.modules_skipped,
            "assess_seconds": assessment.seconds,
        },
        tags={Tag.TRANSFERRED_FROM: str(request.adapter), Tag.BASE: str(request.target)},
        artifacts={
            "adapter": adapter_dir,
            "module_map.json": out / "module_map.json",
            "similarity.png": out / "similarity.png",
        },
    )
    crash_point("after_run")
    version = _register(registry, request, run, atc.atc, result, adapter_info)
    crash_point("after_register")
    return TransferDone(
        request.job_id,
        version.ref,
        run.run_id,
        version.tags.get(Tag.FORMAT, "lora"),
        migrated.layout.value,
        migrated.adapter.rank,
        reused=False,
    )


def _single_file(path: Path) -> Path | None:
    files = list(path.glob("*.safetensors")) if path.is_dir() else [path]
    return files[0] if len(files) == 1 and not (path / "adapter_config.json").exists() else None


def _register(
    registry: Registry,
    request: TransferRequest,
    run: RunInfo,
    atc: float,
    result: TransferResult,
    adapter_info: ModelVersionInfo,
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
        Tag.ATC: f"{atc:.4f}",
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
        atc=atc,
        atc_left=result.atc.atc_left if result.atc else atc,
        atc_right=result.atc.atc_right if result.atc else atc,
        mode=result.mode.value,
        energy_retained=result.energy_retained,
        modules_transferred=result.modules_transferred,
        modules_rematched=result.modules_rematched,
        modules_skipped=result.modules_skipped,
        approved_by=request.approved_by,
        is_lorax=result.is_lorax,
        notes=tuple(result.notes),
    )
    return registry.create_version(
        name=request.adapter.name,
        run=run,
        artifact_path="adapter",
        tags=tags,
        description=version_description(summary),
    )
