"""``run_once`` against the in-memory registry and, in the same scenarios, a real MLflow store."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.formats import read_adapter
from db import JobStatus, list_jobs, migrations, session_scope
from migrator.database import ensure_sqlite_parent
from migrator.pipeline import Context, run_once
from migrator.registry import Registry, Tag, VersionRef
from migrator.registry.memory import MemoryRegistry
from migrator.settings import Settings, load_settings
from migrator.wiring import build_context
from tests.migrator.scenario import Story, register, successor, write_weights


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings(
        data_dir=tmp_path / "data",
        tracking_uri="sqlite:///unused.db",
        similarity_rank=8,
        heartbeat_s=5,
    )


@pytest.fixture
def ctx(settings: Settings, registry: Registry) -> Context:
    ensure_sqlite_parent(settings.database_url.get_secret_value())
    migrations.upgrade(settings.database_url.get_secret_value())
    return build_context(settings, registry)


def _jobs(ctx: Context) -> dict[tuple[str, str], object]:
    with session_scope(ctx.sessions) as session:
        return {
            (job.adapter_version.name, f"{job.target_base.name}/{job.target_base.version}"): (
                job.status,
                job.atc,
                job.result_ref,
            )
            for job in list_jobs(session=session)
        }


def test_successor_release_moves_every_adapter(
    ctx: Context, registry: Registry, tmp_path: Path
) -> None:
    story = Story(tmp_path / "story", registry)
    story.register_v1_with_adapters()
    first = run_once(ctx)
    assert first.planned == [] and first.outcomes == []  # nothing supersedes v1 yet

    story.register_successors()
    report = run_once(ctx)
    assert report.problems == []
    assert ("enc/1", "enc/2,enc-other/1") in report.deprecated
    v1 = registry.get_version(story.refs["v1"])
    assert v1.tags[Tag.DEPRECATED] == "true"
    assert v1.tags[Tag.SUPERSEDED_BY] == "enc/2,enc-other/1"  # every successor

    jobs = _jobs(ctx)
    assert len(jobs) == 6  # three lineages x two targets
    for lineage in ("enc-styleA", "enc-plainB", "enc-kohyaC"):
        status, atc, result = jobs[(lineage, "enc/2")]
        assert status is JobStatus.SUCCEEDED, (lineage, status)
        assert atc is not None and atc < ctx.settings.auto_approve_atc
        other_status, other_atc, _ = jobs[(lineage, "enc-other/1")]
        assert other_status is JobStatus.SKIPPED
        assert other_atc is not None and other_atc > ctx.settings.max_atc

        new = registry.get_version(VersionRef.parse(result))
        assert new.tags[Tag.BASE] == "enc/2"
        assert new.tags[Tag.TRANSFERRED_FROM] == str(story.refs[lineage.removeprefix("enc-")])
        assert new.tags[Tag.ROLE] == "adapter"
        assert float(new.tags[Tag.ATC]) == pytest.approx(atc, abs=1e-3)
        assert new.tags[Tag.APPROVED_BY] == "policy"
        assert "#/models/" in new.description  # walkable lineage in the UI

    # The transferred files read back in their input layout, with the source's keys.
    result = registry.get_version(VersionRef.parse(jobs[("enc-kohyaC", "enc/2")][2]))
    local = registry.download(result.ref, tmp_path / "check")
    files = list(local.rglob("*.safetensors"))
    assert [f.name for f in files] == ["adapter.safetensors"]
    adapter = read_adapter(files[0])
    assert adapter.layout.value == "kohya"
    assert len(adapter.modules) == 8

    # A second pass changes nothing: no new job, no new version.
    versions_before = len(registry.list_versions(role="adapter"))
    again = run_once(ctx)
    assert again.planned == [] and again.outcomes == []
    assert len(registry.list_versions(role="adapter")) == versions_before


def test_transferred_adapter_is_the_projection_onto_the_new_base(
    ctx: Context, registry: Registry, tmp_path: Path
) -> None:
    story = Story(tmp_path / "story", registry)
    story.register_v1_with_adapters()
    story.register_successors()
    run_once(ctx)
    job = _jobs(ctx)[("enc-styleA", "enc/2")]
    assert job[0] is JobStatus.SUCCEEDED
    local = registry.download(VersionRef.parse(job[2]), tmp_path / "out")
    folder = next(p.parent for p in local.rglob("adapter_config.json"))
    out = read_adapter(folder)
    source = read_adapter(story.root / "adapters" / "styleA")
    name = "encoder.layer.0.attention.self.query"
    key = next(k for k in out.modules if k.endswith(name))
    w2 = story.v2[f"{name}.weight"].double()
    u, _, vh = torch.linalg.svd(w2, full_matrices=False)
    ds = source.modules[next(k for k in source.modules if k.endswith(name))].delta().double()
    expected = u @ (u.T @ ds @ vh.T) @ vh  # eq. 3 at full rank
    got = out.modules[key].delta().double()
    assert (got - ds).norm() / ds.norm() < 1e-4  # square, full rank: projection keeps it
    assert (got - expected).norm() / expected.norm() < 1e-4


def test_pending_transfer_waits_for_an_admin(
    ctx: Context, registry: Registry, tmp_path: Path
) -> None:
    ctx.settings.auto_approve_atc = 0.0  # every transfer needs a person
    story = Story(tmp_path / "story", registry)
    story.register_v1_with_adapters()
    story.register_successors()
    report = run_once(ctx)
    assert {p.decision for p in report.planned if p.target_base == "enc/2"} == {"pending_approval"}
    assert report.outcomes == []
    from db import approve

    with session_scope(ctx.sessions) as session:
        pending = [j for j in list_jobs(session=session, statuses=[JobStatus.PENDING_APPROVAL])]
        approve(pending[0].id, "alice", "checked the heatmap", session=session)
    after = run_once(ctx)
    assert [o.status for o in after.outcomes] == ["succeeded"]
    version = registry.get_version(VersionRef.parse(after.outcomes[0].result_ref or ""))
    assert version.tags[Tag.APPROVED_BY] == "alice"


def test_dry_run_writes_nothing(ctx: Context, registry: Registry, tmp_path: Path) -> None:
    story = Story(tmp_path / "story", registry)
    story.register_v1_with_adapters()
    story.register_successors()
    report = run_once(ctx, dry_run=True)
    assert len(report.planned) == 6
    assert {p.decision for p in report.planned if p.target_base == "enc/2"} == {"approved"}
    assert all(p.job_id is None for p in report.planned)
    assert _jobs(ctx) == {}
    assert Tag.DEPRECATED not in registry.get_version(story.refs["v1"]).tags


def test_the_worker_publishes_the_decisions_the_admin_approved(tmp_path: Path) -> None:
    """A setting that changes the module decisions between approval and run: the approved job
    publishes the approved module map; a job still waiting is re-planned, with an audit row."""
    import json

    from db import approve, audit_trail, get_job
    from migrator.bases import compare_bases
    from migrator.documents import decision_from_row

    registry = MemoryRegistry(tmp_path / "registry")
    planned_with = load_settings(
        data_dir=tmp_path / "data", tracking_uri="sqlite:///unused.db", similarity_rank=8
    )
    planned_with.auto_approve_atc = 0.0  # every transfer needs a person
    ensure_sqlite_parent(planned_with.database_url.get_secret_value())
    migrations.upgrade(planned_with.database_url.get_secret_value())
    story = Story(tmp_path / "story", registry)
    story.register_v1_with_adapters()
    far = write_weights(tmp_path / "v2", successor(story.v1, eps=0.5))  # module Phi 0.93-0.95
    story.refs["v2"] = register(registry, "enc", far, {Tag.ROLE: "base"})
    run_once(build_context(planned_with, registry))
    ctx = build_context(planned_with.model_copy(update={"module_min_similarity": 0.99}), registry)
    with session_scope(ctx.sessions) as session:
        pending = list_jobs(session=session, statuses=[JobStatus.PENDING_APPROVAL])
        chosen = next(j for j in pending if j.adapter_version.name == "enc-styleA")
        others = [j.id for j in pending if j.id != chosen.id]
        approve(chosen.id, "alice", "checked the module map", session=session)
        approved = [
            {"target": p.target_module, "source": p.source_module, "decision": p.decision}
            for p in chosen.assessment.module_pairs
        ]
        combine = chosen.assessment.parameters["combine"]
        approved_decisions = [decision_from_row(p, combine) for p in chosen.assessment.module_pairs]
    # The new setting would decide otherwise: the test is not trivially equal.
    src = ctx.workspace.base(registry.get_version(story.refs["v1"]))
    tgt = ctx.workspace.base(registry.get_version(story.refs["v2"]))
    now = compare_bases(src, tgt, ctx.settings).decisions
    assert [d.decision for d in now] != [d.decision for d in approved_decisions]

    report = run_once(ctx)
    done = [o for o in report.outcomes if o.job_id == chosen.id]
    assert [o.status for o in done] == ["succeeded"]
    run = next(r for r in registry.runs.values() if r["job"] == str(chosen.id))
    published = json.loads((Path(str(run["dir"])) / "module_map.json").read_text())
    assert [{k: r[k] for k in ("target", "source", "decision")} for r in published] == approved
    assert (Path(str(run["dir"])) / "similarity.png").read_bytes()[:4] == b"\x89PNG"
    assert run["params"]["module_min_similarity"] == "0.5"  # the approved assessment's

    assert sorted(job_id for job_id, _ in report.replanned) == sorted(others)
    with session_scope(ctx.sessions) as session:
        for job_id in others:
            job = get_job(job_id, session=session)
            assert job.status is JobStatus.PENDING_APPROVAL
            assert job.assessment.parameters["module_min_similarity"] == 0.99
            last = audit_trail(job_id, session=session)[-1]
            assert last.actor == "policy" and "re-planned" in (last.reason or "")
    again = run_once(ctx)
    assert again.replanned == []  # planned under the current parameters now
