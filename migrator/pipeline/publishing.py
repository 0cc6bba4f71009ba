"""What the MLflow UI shows, kept in step with the job database at every pass.

- Approval aliases both ways (:mod:`migrator.registry.pages`): an admin's
  ``lorax-approved-<job>`` set in the UI approves the job (:func:`approve_by_alias`, before the
  pass claims work, with an audit row naming the alias); then every job's alias is put where
  its state says (:func:`publish_pages`): pending on the source version, approved on the source
  until the transfer is registered, then on the transferred version.
- Lineage sections on base and adapter version pages, one-line descriptions and a
  ``lorax.role`` tag on registered models, and the migration experiment's kind.

Only registries offering :class:`~migrator.registry.pages.RegistryPages` are written to.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

from db import JobStatus, approve, get_job, list_jobs, session_scope
from migrator.pages import (
    Carry,
    adapter_section,
    base_section,
    is_generated_model_description,
    merge_section,
    model_description,
)
from migrator.pipeline.context import Context
from migrator.pipeline.snapshot import Snapshot, parse_refs, read_registry
from migrator.registry import (
    ROLE_ADAPTER,
    ROLE_BASE,
    RegistryError,
    RegistryUnavailableError,
    Tag,
    VersionRef,
)
from migrator.registry.pages import Alias, RegisteredModelInfo, RegistryPages

__all__ = ["UI_ACTOR", "approve_by_alias", "publish_pages"]

log = logging.getLogger(__name__)

#: The actor of an approval given by setting an alias in the MLflow UI.
UI_ACTOR = "mlflow-ui"

Link = Callable[[VersionRef], str]

_ON_SOURCE = frozenset({JobStatus.APPROVED, JobStatus.RUNNING, JobStatus.FAILED})


def _order(ref: VersionRef) -> tuple[str, int]:
    return (ref.name, int(ref.version) if ref.version.isdigit() else 0)


def _carries(ctx: Context) -> list[Carry]:
    with session_scope(ctx.sessions) as session:
        return [
            Carry(
                job_id=job.id,
                adapter=VersionRef(job.adapter_version.name, job.adapter_version.version),
                source_base=VersionRef(job.source_base.name, job.source_base.version),
                target=VersionRef(job.target_base.name, job.target_base.version),
                status=job.status.value,
                result=VersionRef.parse(job.result_ref) if job.result_ref else None,
                atc=job.atc,
            )
            for job in list_jobs(session=session)
        ]


def approve_by_alias(ctx: Context) -> list[tuple[int, str]]:
    """Approve every pending job whose ``lorax-approved-<job>`` alias an admin set on its
    adapter's registered model. Returns (job id, alias) of each."""
    registry = ctx.registry
    if not isinstance(registry, RegistryPages):
        return []
    wanted: dict[int, tuple[str, str]] = {}
    for model in registry.list_models():
        for alias in model.aliases:
            parsed = Alias.parse(alias)
            if parsed is not None and parsed[0] == "approved":
                wanted[parsed[1]] = (model.name, alias)
    done: list[tuple[int, str]] = []
    for job_id, (model_name, alias) in sorted(wanted.items()):
        with session_scope(ctx.sessions) as session:
            try:
                job = get_job(job_id, session=session)
            except LookupError:
                continue  # a job of another job database sharing this registry
            if job.adapter_version.name != model_name:
                continue
            if job.status is not JobStatus.PENDING_APPROVAL:
                continue
            reason = f"alias @{alias} set on {model_name} in the MLflow UI"
            approve(job_id, UI_ACTOR, reason, session=session)
        ctx.say(f"job {job_id} approved: {reason}")
        done.append((job_id, alias))
    return done


def _wanted_aliases(carries: Sequence[Carry]) -> dict[tuple[str, str], str]:
    """(model, alias) -> version, for every job of this database."""
    wanted: dict[tuple[str, str], str] = {}
    for c in carries:
        if c.status == JobStatus.PENDING_APPROVAL.value:
            wanted[(c.adapter.name, Alias.pending(c.job_id))] = c.adapter.version
        elif JobStatus(c.status) in _ON_SOURCE:
            wanted[(c.adapter.name, Alias.approved(c.job_id))] = c.adapter.version
        elif c.status == JobStatus.SUCCEEDED.value and c.result is not None:
            wanted[(c.result.name, Alias.approved(c.job_id))] = c.result.version
    return wanted


def _sync_aliases(
    registry: RegistryPages, models: Mapping[str, RegisteredModelInfo], carries: Sequence[Carry]
) -> None:
    """Put each job's approval alias where its state says; remove the others of its jobs."""
    wanted = _wanted_aliases(carries)
    ours = {(c.adapter.name, c.job_id) for c in carries}
    for model in models.values():
        for alias in model.aliases:
            parsed = Alias.parse(alias)
            if parsed and (model.name, parsed[1]) in ours and (model.name, alias) not in wanted:
                registry.delete_alias(model.name, alias)
    for (name, alias), version in sorted(wanted.items()):
        current = models.get(name)
        if current is None or current.aliases.get(alias) != version:
            registry.set_alias(name, alias, version)


def _base_pages(
    registry: RegistryPages, snapshot: Snapshot, carries: Sequence[Carry], link: Link
) -> None:
    successors = {
        ref: sorted(parse_refs(info.tags.get(Tag.SUPERSEDED_BY, ""))[0], key=_order)
        for ref, info in snapshot.bases.items()
        if info.tags.get(Tag.DEPRECATED) == "true"
    }
    for ref, info in sorted(snapshot.bases.items(), key=lambda item: _order(item[0])):
        predecessors = sorted((p for p, s in successors.items() if ref in s), key=_order)
        carried = [c for c in carries if c.source_base == ref]
        arrived = [c for c in carries if c.target == ref and c.result is not None]
        if not (successors.get(ref) or predecessors or carried or arrived):
            continue
        sources = {c.adapter for c in carried}
        arrivals = {c.result for c in arrived}
        adapters = sorted(
            (
                a
                for a, e in snapshot.adapters.items()
                if e.base == ref and (a not in arrivals or a in sources)
            ),
            key=_order,
        )
        section = base_section(
            ref,
            successors=successors.get(ref, []),
            predecessors=predecessors,
            adapters=adapters,
            carried=carried,
            arrived=arrived,
            link=link,
        )
        text = merge_section(info.description, section)
        if text != info.description:
            registry.set_version_description(ref, text)


def _adapter_pages(
    registry: RegistryPages, snapshot: Snapshot, carries: Sequence[Carry], link: Link
) -> None:
    for ref, entry in sorted(snapshot.adapters.items(), key=lambda item: _order(item[0])):
        carried = [c for c in carries if c.adapter == ref]
        came_from = next((c for c in carries if c.result == ref), None)
        if entry.base is None or not (carried or came_from):
            continue
        base = snapshot.bases.get(entry.base)
        section = adapter_section(
            ref,
            base=entry.base,
            base_deprecated=base is not None and base.tags.get(Tag.DEPRECATED) == "true",
            carried=carried,
            came_from=came_from,
            link=link,
        )
        text = merge_section(entry.info.description, section)
        if text != entry.info.description:
            registry.set_version_description(ref, text)


def _model_pages(
    registry: RegistryPages, snapshot: Snapshot, models: Mapping[str, RegisteredModelInfo]
) -> None:
    roles = {r.name: ROLE_BASE for r in snapshot.bases}
    roles.update({r.name: ROLE_ADAPTER for r in snapshot.adapters})
    for name, role in sorted(roles.items()):
        model = models.get(name) or RegisteredModelInfo(name)
        if model.tags.get(Tag.ROLE) != role:
            registry.set_model_tags(name, {Tag.ROLE: role})
        wanted = model_description(role)
        if model.description != wanted and (
            not model.description.strip() or is_generated_model_description(model.description)
        ):
            registry.set_model_description(name, wanted)


def publish_pages(ctx: Context) -> list[str]:
    """Aliases, version and model descriptions, model tags and the experiment kind, from the
    registry as it is now and the job database. Returns the problems met (a refused write is
    reported, not fatal; an unreachable registry ends the pass as any registry call does)."""
    registry = ctx.registry
    if not isinstance(registry, RegistryPages):
        return []
    try:
        snapshot = read_registry(ctx.registry)
        models = {m.name: m for m in registry.list_models()}
        carries = _carries(ctx)
        _sync_aliases(registry, models, carries)
        link = ctx.registry.version_link
        _base_pages(registry, snapshot, carries, link)
        _adapter_pages(registry, snapshot, carries, link)
        _model_pages(registry, snapshot, models)
        if carries:
            registry.prepare_experiment(ctx.settings.experiment_name)
    except RegistryUnavailableError:
        raise
    except RegistryError as exc:
        log.warning("registry pages not updated: %s", exc)
        return [f"registry pages not updated: {exc}"]
    return []
