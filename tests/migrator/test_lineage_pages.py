"""The lineage a person walks in the MLflow UI, and approvals through aliases, against the
in-memory registry and a real MLflow store."""

from __future__ import annotations

import re
from pathlib import Path

from db import JobStatus, approve, audit_trail, list_jobs, migrations, session_scope
from migrator.database import ensure_sqlite_parent
from migrator.pages import MARKER
from migrator.pipeline import Context, run_once
from migrator.registry import Registry, Tag, VersionRef
from migrator.registry.pages import RegistryPages
from migrator.settings import load_settings
from migrator.wiring import build_context
from tests.migrator.scenario import Story


def _context(tmp_path: Path, registry: Registry, **settings: object) -> Context:
    s = load_settings(
        data_dir=tmp_path / "data",
        tracking_uri="sqlite:///unused.db",
        similarity_rank=8,
        **settings,
    )
    ensure_sqlite_parent(s.database_url.get_secret_value())
    migrations.upgrade(s.database_url.get_secret_value())
    return build_context(s, registry)


def _links(markdown: str) -> set[str]:
    return set(re.findall(r"\]\((#/[^)]+)\)", markdown))


def _page(ref: VersionRef) -> str:
    return f"#/models/{ref.name}/versions/{ref.version}"


def test_base_and_adapter_pages_link_the_lineage_both_ways(
    tmp_path: Path, registry: Registry
) -> None:
    assert isinstance(registry, RegistryPages)
    ctx = _context(tmp_path, registry)
    story = Story(tmp_path / "story", registry)
    story.register_v1_with_adapters()
    v1 = story.refs["v1"]
    registry.set_version_description(v1, "Registered by alice from the training cluster.")
    story.register_successors()
    run_once(ctx)
    with session_scope(ctx.sessions) as session:
        results = {
            job.adapter_version.name: VersionRef.parse(job.result_ref)
            for job in list_jobs(session=session)
            if job.result_ref
        }
    assert len(results) == 3
    v2, other = story.refs["v2"], story.refs["other"]

    old = registry.get_version(v1).description
    assert old.startswith("Registered by alice from the training cluster.")  # kept
    assert MARKER in old and "Deprecated" in old
    carried = {_page(story.refs[n]) for n in ("styleA", "plainB", "kohyaC")}
    assert {_page(v2), _page(other)} | carried | {_page(r) for r in results.values()} <= _links(
        old
    ), old

    new = registry.get_version(v2).description
    assert {_page(v1)} | {_page(r) for r in results.values()} | carried <= _links(new), new
    source = registry.get_version(story.refs["styleA"]).description
    assert {_page(v1), _page(v2), _page(other), _page(results["enc-styleA"])} <= _links(source)
    moved = registry.get_version(results["enc-styleA"]).description
    assert {_page(story.refs["styleA"]), _page(v1), _page(v2)} <= _links(moved), moved

    models = {m.name: m for m in registry.list_models()}
    assert models["enc"].tags[Tag.ROLE] == "base" and models["enc-other"].tags[Tag.ROLE] == "base"
    assert models["enc-styleA"].tags[Tag.ROLE] == "adapter"
    assert models["enc"].description.startswith("LoRA-X base model")
    assert models["enc-styleA"].description.startswith("LoRA-X adapter lineage")

    before = {r.ref: r.description for r in registry.list_versions()}
    run_once(ctx)  # a second pass rewrites nothing
    assert {r.ref: r.description for r in registry.list_versions()} == before


def test_an_alias_set_in_the_ui_approves_and_aliases_follow_the_jobs(
    tmp_path: Path, registry: Registry
) -> None:
    assert isinstance(registry, RegistryPages)
    ctx = _context(tmp_path, registry, auto_approve_atc=0.0)  # every transfer waits
    story = Story(tmp_path / "story", registry)
    story.register_v1_with_adapters()
    story.register_successors()
    run_once(ctx)
    with session_scope(ctx.sessions) as session:
        pending = {
            j.adapter_version.name: j.id
            for j in list_jobs(session=session, statuses=[JobStatus.PENDING_APPROVAL])
        }
    assert len(pending) == 3
    aliases = {m.name: dict(m.aliases) for m in registry.list_models()}
    for name, job_id in pending.items():
        assert aliases[name] == {f"lorax-pending-{job_id}": "1"}, aliases

    by_ui, by_cli = pending["enc-styleA"], pending["enc-plainB"]
    registry.set_alias("enc-styleA", f"lorax-approved-{by_ui}", "1")  # what an admin does
    with session_scope(ctx.sessions) as session:
        approve(by_cli, "alice", "checked the heatmap", session=session)
    report = run_once(ctx)
    assert report.alias_approvals == [(by_ui, f"lorax-approved-{by_ui}")]
    done = {o.job_id: o.result_ref for o in report.outcomes}
    assert set(done) == {by_ui, by_cli}
    with session_scope(ctx.sessions) as session:
        last = audit_trail(by_ui, session=session)[-1]
        assert last.actor == "mlflow-ui" and f"@lorax-approved-{by_ui}" in (last.reason or "")
    aliases = {m.name: dict(m.aliases) for m in registry.list_models()}
    for name, job_id in (("enc-styleA", by_ui), ("enc-plainB", by_cli)):
        result = VersionRef.parse(done[job_id] or "")
        assert aliases[name] == {f"lorax-approved-{job_id}": result.version}, aliases
        assert registry.get_version(result).tags[Tag.APPROVED_BY] in {"mlflow-ui", "alice"}
    assert aliases["enc-kohyaC"] == {f"lorax-pending-{pending['enc-kohyaC']}": "1"}


def test_alias_events_trigger_a_pass() -> None:
    from migrator.webhook import RELEVANT_EVENTS

    alias_events = {("model_version_alias", "created"), ("model_version_alias", "deleted")}
    assert alias_events <= set(RELEVANT_EVENTS)
