"""What the MLflow UI shows, kept in step with the job database at every pass.

- Approval aliases both ways (:mod:`migrator.registry.pages`): an admin's
  ``lorax-approved-<job>`` set in the UI approves the job (:func:`approve_by_alias`, before the
  pass claims work, with an audit row naming the alias); then every job's alias is put where
  its state says (:func:`publish_pages`): pending on the source version, approved on the source
  until the transfer is registered, then on the transferred version.
- Lineage sections on base and adapter version pages, one-line descriptions and a
  ``lorax.role`` tag on registered models, and the migration experiment's kind.

Only registries offering :class:`~migrator.registry.pages.RegistryPages` are written to, and
only the pages a change can reach (:mod:`migrator.pipeline.page_scope`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

from db import JobStatus, approve, get_job, pending_approvals, session_scope
from migrator.pages import (
    Carry,
    adapter_section,
    base_section,
    is_generated_model_description,
    merge_section,
    model_description,
)
from migrator.pipeline.context import Context
from migrator.pipeline.page_scope import PageScope, page_scope
from migrator.pipeline.snapshot import AdapterEntry, Snapshot, adapter_entry, parse_refs
from migrator.pipeline.watch import Watch, changed_job_ids, save_job_changes
from migrator.registry import (
    ROLE_ADAPTER,
    ROLE_BASE,
    Registry,
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


def approve_by_alias(ctx: Context) -> list[tuple[int, str]]:
    """Approve every pending job whose ``lorax-approved-<job>`` alias an admin set on its
    adapter's registered model. Returns (job id, alias) of each."""
    registry = ctx.registry
    if not isinstance(registry, RegistryPages):
        return []
    with session_scope(ctx.sessions) as session:  # only a waiting job's alias can approve it
        waiting = {job.adapter_version.name for job in pending_approvals(session=session)}
    if not waiting:
        return []
    wanted: dict[int, tuple[str, str]] = {}
    for model in registry.find_models(waiting):
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


def _adapters_on(registry: RegistryPages, scope: PageScope, ref: VersionRef) -> list[AdapterEntry]:
    """The adapter versions on base ``ref`` (the snapshot's when it holds every lineage)."""
    if scope.snapshot.complete:
        return [e for e in scope.snapshot.adapters.values() if e.base == ref]
    assert isinstance(registry, Registry)
    on_base = Snapshot({ref: scope.snapshot.bases[ref]}, {})
    found = registry.list_versions(role=ROLE_ADAPTER, tags={Tag.BASE: str(ref)})
    on_base.adapters = {e.ref: e for e in (adapter_entry(v) for v in found) if e is not None}
    on_base.drop_marked_duplicates()
    return [e for e in on_base.adapters.values() if e.base == ref]


def _base_pages(registry: RegistryPages, scope: PageScope, link: Link) -> None:
    snapshot, carries = scope.snapshot, scope.carries
    successors = {
        ref: sorted(parse_refs(info.tags.get(Tag.SUPERSEDED_BY, ""))[0], key=_order)
        for ref, info in snapshot.bases.items()
        if info.tags.get(Tag.DEPRECATED) == "true"
    }
    for ref, info in sorted(snapshot.bases.items(), key=lambda item: _order(item[0])):
        if scope.bases is not None and ref not in scope.bases:
            continue
        predecessors = sorted((p for p, s in successors.items() if ref in s), key=_order)
        carried = [c for c in carries if c.source_base == ref]
        arrived = [c for c in carries if c.target == ref and c.result is not None]
        if not (successors.get(ref) or predecessors or carried or arrived):
            continue
        sources = {c.adapter for c in carried}
        arrivals = {c.result for c in arrived}
        adapters = sorted(
            (
                e.ref
                for e in _adapters_on(registry, scope, ref)
                if e.ref not in arrivals or e.ref in sources
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


def _adapter_pages(registry: RegistryPages, scope: PageScope, link: Link) -> None:
    snapshot, carries = scope.snapshot, scope.carries
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


def publish_pages(
    ctx: Context,
    watch: Watch,
    snapshot: Snapshot | None,
    deprecated: Sequence[tuple[str, str]] = (),
) -> list[str]:
    """Aliases, version and model descriptions, model tags and the experiment kind, from the
    registry as it is now and the job database, for the pages a change of this pass or of a
    job can reach (every page after a full read).

    Args:
        watch: what the pass read of the registry.
        snapshot: what it read (None when nothing).
        deprecated: (base, successors) it deprecated.

    Returns:
        The problems met (a refused write is reported, not fatal, and tried again by the next
        pass; an unreachable registry ends the pass as any registry call does).
    """
    registry = ctx.registry
    if not isinstance(registry, RegistryPages):
        return []
    changes = changed_job_ids(ctx, watch.key)
    try:
        scope = page_scope(ctx, registry, watch, snapshot, changes, deprecated)
        if scope is not None:
            _sync_aliases(registry, scope.models, scope.carries)
            link = ctx.registry.version_link
            _base_pages(registry, scope, link)
            _adapter_pages(registry, scope, link)
            _model_pages(registry, scope.snapshot, scope.models)
            if scope.carries:
                registry.prepare_experiment(ctx.settings.experiment_name)
    except RegistryUnavailableError:
        raise
    except RegistryError as exc:
        log.warning("registry pages not updated: %s", exc)
        return [f"registry pages not updated: {exc}"]
    save_job_changes(ctx, changes)
    return []
