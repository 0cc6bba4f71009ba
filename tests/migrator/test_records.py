"""What the service records reads right: every successor of a base, one vocabulary for module
decisions, the current state of a job beside what the policy said, published file modes."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from db import JobStatus, approve, find_base_version, get_job, list_jobs, migrations, session_scope
from migrator.database import ensure_sqlite_parent
from migrator.pipeline import Context, run_once
from migrator.registry import Registry, Tag, VersionRef
from migrator.registry.memory import MemoryRegistry
from migrator.registry.mlflow_registry import MlflowRegistry
from migrator.settings import load_settings
from migrator.wiring import build_context
from tests.fixtures.mlflow import MlflowStore
from tests.migrator.scenario import Story, base_weights, register, successor, write_weights


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


def _shifted(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A depth-pruned successor: layer 1 of ``weights`` kept as its only layer (layer 0)."""
    return {
        k.replace("encoder.layer.1.", "encoder.layer.0."): v
        for k, v in weights.items()
        if not k.startswith("encoder.layer.0.")
    }


def test_a_base_superseded_by_several_versions_names_every_one(tmp_path: Path) -> None:
    registry = MemoryRegistry(tmp_path / "registry")
    ctx = _context(tmp_path, registry)
    story = Story(tmp_path / "story", registry)
    story.register_v1_with_adapters()
    v1 = story.refs["v1"]
    register(
        registry, "enc", write_weights(tmp_path / "v2", successor(story.v1)), {Tag.ROLE: "base"}
    )
    for name, seed in (("enc-zeta", 7), ("enc-alpha", 8)):
        files = write_weights(tmp_path / name, base_weights(seed))
        register(registry, name, files, {Tag.ROLE: "base", Tag.SUPERSEDES: str(v1)})
    run_once(ctx)
    expected = "enc/2,enc-alpha/1,enc-zeta/1"  # every successor, by name then version
    assert registry.get_version(v1).tags[Tag.SUPERSEDED_BY] == expected
    with session_scope(ctx.sessions) as session:
        row = find_base_version(v1.name, v1.version, session=session)
        assert row is not None and row.superseded_by == expected

    # A successor registered later is added; the earlier ones stay.
    files = write_weights(tmp_path / "late", base_weights(9))
    register(registry, "enc-late", files, {Tag.ROLE: "base", Tag.SUPERSEDES: str(v1)})
    run_once(ctx)
    later = "enc/2,enc-alpha/1,enc-late/1,enc-zeta/1"
    assert registry.get_version(v1).tags[Tag.SUPERSEDED_BY] == later
    with session_scope(ctx.sessions) as session:
        row = find_base_version(v1.name, v1.version, session=session)
        assert row is not None and row.superseded_by == later


def test_the_description_counts_modules_as_atc_does(tmp_path: Path) -> None:
    """Target modules same name / rematched / skipped, as the assessment decided them; adapter
    modules left out, separately (the pruned base takes half the adapter)."""
    from migrator.documents import ModuleCounts

    registry = MemoryRegistry(tmp_path / "registry")
    ctx = _context(tmp_path, registry, auto_approve_atc=0.7, max_atc=0.9)
    story = Story(tmp_path / "story", registry)
    story.register_v1_with_adapters()
    pruned = write_weights(tmp_path / "half", _shifted(story.v1))
    register(
        registry, "enc-half", pruned, {Tag.ROLE: "base", Tag.SUPERSEDES: str(story.refs["v1"])}
    )
    report = run_once(ctx)
    # The policy holds a base that lost layers (weight drift); an admin approves them.
    with session_scope(ctx.sessions) as session:
        for job in list_jobs(session=session, statuses=[JobStatus.PENDING_APPROVAL]):
            approve(job.id, "alice", "a pruned successor, expected", session=session)
    report = run_once(ctx)
    styled = next(o for o in report.outcomes if "styleA" in (o.result_ref or ""))
    version = registry.get_version(VersionRef.parse(styled.result_ref or ""))
    with session_scope(ctx.sessions) as session:
        job = get_job(styled.job_id, session=session)
        assert job.assessment is not None
        decisions = [p.decision for p in job.assessment.module_pairs]
    assessed = {d: decisions.count(d) for d in ("same_name", "rematched", "skipped")}
    assert assessed == {"same_name": 0, "rematched": 4, "skipped": 0}, assessed
    counts = ModuleCounts(same_name=0, rematched=4, skipped=0, left_out=4, adapter_modules=8)
    for label, value in counts.rows():
        assert f"| {label} | {value} |" in version.description, version.description
    run = next(r for r in registry.runs.values() if r["job"] == str(styled.job_id))
    metrics = run["metrics"]
    assert isinstance(metrics, dict)
    assert metrics["target_modules_same_name"] == 0
    assert metrics["target_modules_rematched"] == 4
    assert metrics["target_modules_skipped"] == 0
    assert metrics["adapter_modules_left_out"] == 4


def test_an_approved_job_shows_its_state_and_what_the_policy_said(tmp_path: Path) -> None:
    from migrator.cli.service import job_row
    from migrator.documents import job_document

    registry = MemoryRegistry(tmp_path / "registry")
    ctx = _context(tmp_path, registry, auto_approve_atc=0.0)
    story = Story(tmp_path / "story", registry)
    story.register_v1_with_adapters()
    story.register_successors()
    run_once(ctx, execute=False)
    with session_scope(ctx.sessions) as session:
        pending = list_jobs(session=session, statuses=[JobStatus.PENDING_APPROVAL])[0]
        approve(pending.id, "alice", "checked the heatmap", session=session)
    with session_scope(ctx.sessions) as session:
        job = get_job(pending.id, session=session)
        row, doc = job_row(job), job_document(job)
    assert row["status"] == doc["status"] == "approved"
    assert row["decision"] == doc["decision"] == "approved"
    assert row["decided_by"] == doc["decided_by"] == "alice"
    assert row["policy_decision"] == doc["policy_decision"] == "pending_approval"


def test_registered_adapter_files_are_world_readable(
    tmp_path: Path, mlflow_store: MlflowStore
) -> None:
    previous = os.umask(0o022)
    try:
        registry = MlflowRegistry(mlflow_store.uri, artifact_root=mlflow_store.artifact_root)
        ctx = _context(tmp_path, registry)
        story = Story(tmp_path / "story", registry)
        story.register_v1_with_adapters()
        story.register_successors()
        report = run_once(ctx)
    finally:
        os.umask(previous)
    assert any(o.result_ref for o in report.outcomes)
    published = [
        p
        for p in (mlflow_store.root / "artifacts").rglob("*.safetensors")
        if "adapter" in p.parts  # the migration runs' adapter folders
    ]
    assert published, "no adapter file in the artifact store"
    assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in published} == {"0o644"}


@pytest.fixture(autouse=True)
def _quiet_mlflow(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
