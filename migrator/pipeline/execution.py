"""Execute one claimed job: download, transfer, register, record, under a kept-alive lease.

Order matters for crash safety. The migration run and the model version are found again by the
job's tags if they exist (a crash after registering and before recording), so a reclaimed job
registers nothing twice; the database is written last, and only while the lease is ours.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from core.errors import InputError
from core.transfer import TransferResult
from db import (
    AdapterOrigin,
    BackoffPolicy,
    LeaseLostError,
    complete,
    fail,
    find_base_version,
    get_job,
    get_or_create_adapter_version,
    heartbeat,
    session_scope,
)
from db.enums import AdapterFormat
from db.enums import AdapterLayout as DbLayout
from migrator.migration import assess, load_adapter, migrate, module_map, write_migrated
from migrator.pipeline.context import Context, crash_point
from migrator.registry import ModelVersionInfo, RunInfo, Tag, VersionRef
from migrator.reports import TransferSummary, plot_similarity, version_description

__all__ = ["JobOutcome", "LeaseKeeper", "execute_job"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobOutcome:
    """How one job ended in this process."""

    job_id: int
    status: str  # succeeded | failed | retrying | lease_lost | released
    detail: str
    result_ref: str | None = None


class LeaseKeeper:
    """Renews a job's lease every ``heartbeat_s`` in a background thread until stopped."""

    def __init__(self, ctx: Context, job_id: int) -> None:
        self.ctx = ctx
        self.job_id = job_id
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{job_id}", daemon=True)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def renew(self) -> None:
        """Renew now. Raises LeaseLostError when the job is no longer ours."""
        s = self.ctx.settings
        with session_scope(self.ctx.sessions) as session:
            heartbeat(self.job_id, s.worker_id, session=session, lease_seconds=s.lease_s)

    def _run(self) -> None:
        while not self._stop.wait(self.ctx.settings.heartbeat_s):
            try:
                self.renew()
            except LeaseLostError as exc:
                self.lost = str(exc)
                return
            except Exception as exc:  # database briefly away: try again next beat
                log.warning("heartbeat of job %d failed: %s", self.job_id, exc)

    def check(self) -> None:
        if self.lost is None:
            try:
                self.renew()
            except LeaseLostError as exc:
                self.lost = str(exc)
        if self.lost is not None:
            raise LeaseLostError(self.job_id, self.ctx.settings.worker_id, "unknown", None)


@dataclass(frozen=True)
class _JobRefs:
    job_id: int
    adapter: VersionRef
    source: VersionRef
    target: VersionRef
    mode: str
    atc: float | None
    approved_by: str


def _refs(ctx: Context, job_id: int) -> _JobRefs:
    with session_scope(ctx.sessions) as session:
        job = get_job(job_id, session=session)
        approvers = [e.actor for e in job.audit_events if e.to_status.value == "approved"]
        return _JobRefs(
            job_id=job.id,
            adapter=VersionRef(job.adapter_version.name, job.adapter_version.version),
            source=VersionRef(job.source_base.name, job.source_base.version),
            target=VersionRef(job.target_base.name, job.target_base.version),
            mode=job.mode,
            atc=job.atc,
            approved_by=approvers[-1] if approvers else "policy",
        )


def execute_job(ctx: Context, job_id: int) -> JobOutcome:
    """Run a job this worker has claimed, and record how it ended.

    Bad input (unreadable adapter, missing module, unusable base) fails the job for good with
    the message as its reason; anything else fails it for an automatic retry with backoff.
    """
    s = ctx.settings
    refs = _refs(ctx, job_id)
    started = time.perf_counter()
    with LeaseKeeper(ctx, job_id) as lease:
        try:
            result = _transfer_and_register(ctx, refs, lease)
        except LeaseLostError as exc:
            log.warning("job %d: lease lost, leaving it to its new owner (%s)", job_id, exc)
            return JobOutcome(job_id, "lease_lost", str(exc))
        except Exception as exc:  # the job fails, the pass goes on
            retryable = not isinstance(exc, InputError) and not _is_permanent(exc)
            message = f"{type(exc).__name__}: {exc}"
            with session_scope(ctx.sessions) as session:
                job = fail(
                    job_id,
                    s.worker_id,
                    message,
                    retryable=retryable,
                    backoff=BackoffPolicy(s.retry_backoff_s, s.retry_backoff_max_s),
                    session=session,
                )
                status = job.status.value
            level = logging.WARNING if status == "approved" else logging.ERROR
            log.log(
                level, "job %d (%s -> %s) failed: %s", job_id, refs.adapter, refs.target, message
            )
            return JobOutcome(job_id, "retrying" if status == "approved" else "failed", message)
    ctx.say(
        f"job {job_id}: {refs.adapter} -> {result.ref} on {refs.target} "
        f"in {time.perf_counter() - started:.1f}s"
    )
    return JobOutcome(job_id, "succeeded", "registered", str(result.ref))


def _is_permanent(exc: Exception) -> bool:
    # A ValueError from the math is a bad request of the adapter, not a passing fault.
    return isinstance(exc, ValueError)


def _transfer_and_register(ctx: Context, refs: _JobRefs, lease: LeaseKeeper) -> ModelVersionInfo:
    s = ctx.settings
    snapshot_source = ctx.registry.get_version(refs.source)
    snapshot_target = ctx.registry.get_version(refs.target)
    adapter_info = ctx.registry.get_version(refs.adapter)
    source = ctx.workspace.base(snapshot_source)
    target = ctx.workspace.base(snapshot_target)
    adapter_path = ctx.workspace.adapter_files(refs.adapter)
    loaded = load_adapter(adapter_path, source, s)
    assessment = assess(source, target, s)  # cached factors: recomputing is cheap and exact
    crash_point("mid_transfer")
    migrated = migrate(loaded, source, target, assessment, s, mode=refs.mode)
    result = migrated.result
    out = s.scratch / "jobs" / str(refs.job_id)
    if out.exists():
        shutil.rmtree(out)
    adapter_dir = out / "adapter"
    write_migrated(migrated, adapter_dir, like=_single_file(adapter_path))
    rows = module_map(assessment, result)
    (out / "module_map.json").write_text(json.dumps(rows, indent=2))
    atc = assessment.atc
    matches = [
        (atc.source_index(d.source), atc.target_index(d.target))
        for d in assessment.decisions
        if d.source is not None and d.decision.value != "skipped"
    ]
    plot_similarity(
        atc.phi_left,
        atc.phi_right,
        atc.source_names,
        atc.target_names,
        out / "similarity.png",
        title=f"{refs.source} -> {refs.target}: ATC {atc.atc:.3f}",
        matches=matches,
    )
    lease.check()  # do not publish work whose lease has moved on
    job_key = str(refs.job_id)
    run = ctx.registry.log_run(
        experiment=s.experiment_name,
        run_name=f"{refs.adapter} -> {refs.target}",
        job_key=job_key,
        params={
            "adapter": str(refs.adapter),
            "source_base": str(refs.source),
            "target_base": str(refs.target),
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
        tags={Tag.TRANSFERRED_FROM: str(refs.adapter), Tag.BASE: str(refs.target)},
        artifacts={
            "adapter": adapter_dir,
            "module_map.json": out / "module_map.json",
            "similarity.png": out / "similarity.png",
        },
    )
    crash_point("after_run")
    version = _register(ctx, refs, run, atc.atc, result, adapter_info, migrated.layout.value)
    crash_point("after_register")
    lease.check()
    with session_scope(ctx.sessions) as session:
        target_row = find_base_version(refs.target.name, refs.target.version, session=session)
        assert target_row is not None
        row = get_or_create_adapter_version(
            version.name,
            version.version,
            base=target_row,
            format=AdapterFormat(version.tags.get(Tag.FORMAT, "lora")),
            layout=DbLayout(migrated.layout.value),
            rank=migrated.adapter.rank,
            origin=AdapterOrigin.TRANSFERRED,
            session=session,
        )
        complete(
            refs.job_id,
            s.worker_id,
            result_adapter_version_id=row.id,
            result_ref=str(version.ref),
            mlflow_run_id=run.run_id,
            session=session,
        )
    return version


def _single_file(path: Path) -> Path | None:
    files = list(path.glob("*.safetensors")) if path.is_dir() else [path]
    return files[0] if len(files) == 1 and not (path / "adapter_config.json").exists() else None


def _register(
    ctx: Context,
    refs: _JobRefs,
    run: RunInfo,
    atc: float,
    result: TransferResult,
    adapter_info: ModelVersionInfo,
    layout: str,
) -> ModelVersionInfo:
    registry = ctx.registry
    found = registry.find_version_by_tag(refs.adapter.name, Tag.JOB, str(refs.job_id))
    if (
        found is not None
        and found.tags.get(Tag.TRANSFERRED_FROM) == str(refs.adapter)
        and found.tags.get(Tag.BASE) == str(refs.target)
    ):
        return found  # registered before a crash: the same version, not a second one
    fmt = adapter_info.tags.get(Tag.FORMAT, "lorax" if result.is_lorax else "lora")
    tags = {
        Tag.ROLE: "adapter",
        Tag.BASE: str(refs.target),
        Tag.FORMAT: fmt,
        Tag.TRANSFERRED_FROM: str(refs.adapter),
        Tag.JOB: str(refs.job_id),
        Tag.ATC: f"{atc:.4f}",
        Tag.APPROVED_BY: refs.approved_by,
        Tag.MODE: result.mode.value,
        Tag.ENERGY: f"{result.energy_retained:.4f}",
    }
    summary = TransferSummary(
        adapter_name=refs.adapter.name,
        source_version=refs.adapter.version,
        source_link=registry.version_link(refs.adapter),
        old_base=str(refs.source),
        old_base_link=registry.version_link(refs.source),
        new_base=str(refs.target),
        new_base_link=registry.version_link(refs.target),
        run_link=registry.run_link(run),
        job_id=refs.job_id,
        atc=atc,
        atc_left=result.atc.atc_left if result.atc else atc,
        atc_right=result.atc.atc_right if result.atc else atc,
        mode=result.mode.value,
        energy_retained=result.energy_retained,
        modules_transferred=result.modules_transferred,
        modules_rematched=result.modules_rematched,
        modules_skipped=result.modules_skipped,
        approved_by=refs.approved_by,
        is_lorax=result.is_lorax,
        notes=tuple(result.notes),
    )
    return registry.create_version(
        name=refs.adapter.name,
        run=run,
        artifact_path="adapter",
        tags=tags,
        description=version_description(summary),
    )
