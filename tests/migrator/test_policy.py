"""The approval policy on every signal: unit tests of the rules, and registry passes on real
all-MiniLM-L6-v2 successors (rohan-pristine is registered by policy; a successor whose
feed-forward weights are noise, ATC 0, waits for an admin)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.adapter import AdapterKind, AdapterLayout, LoraAdapter, LoraModule
from core.factorize import factorize
from core.formats import write_adapter
from core.weights import WeightSource
from db import JobStatus, list_jobs, migrations, session_scope
from migrator.database import ensure_sqlite_parent
from migrator.pipeline import OutcomeStatus, run_once
from migrator.policy import Verdict, plan_decision, transfer_signals
from migrator.registry import Tag
from migrator.registry.memory import MemoryRegistry
from migrator.settings import Settings, load_settings
from migrator.wiring import build_context


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings(data_dir=tmp_path / "data", tracking_uri="sqlite:///unused.db")


def _verdicts(decision) -> dict[str, Verdict]:
    return {s.name: s.verdict for s in decision.signals}


def test_auto_approval_needs_every_available_signal(settings: Settings) -> None:
    calm = {"drift": 0.002, "missing": 0, "missing_share": 0.0, "missing_examples": []}
    ok = plan_decision(0.01, settings, drift=calm, base_agreement=0.95, functional_unavailable=None)
    assert ok.decision is JobStatus.APPROVED and set(_verdicts(ok).values()) == {Verdict.PASS}
    moved = {**calm, "drift": 0.05}
    held = plan_decision(
        0.0, settings, drift=moved, base_agreement=0.95, functional_unavailable=None
    )
    assert held.decision is JobStatus.PENDING_APPROVAL
    assert _verdicts(held)["weight_drift"] is Verdict.HOLD and "weight_drift 0.050" in held.reason
    pruned = {**calm, "missing": 48, "missing_share": 0.49, "missing_examples": ["encoder.layer.5"]}
    assert plan_decision(0.0, settings, drift=pruned, base_agreement=0.95,
                         functional_unavailable=None).decision is JobStatus.PENDING_APPROVAL  # fmt: skip
    changed = plan_decision(
        0.0, settings, drift=calm, base_agreement=0.3, functional_unavailable=None
    )
    assert changed.decision is JobStatus.PENDING_APPROVAL
    assert _verdicts(changed)["base_agreement"] is Verdict.HOLD
    far = plan_decision(0.9, settings, drift=calm, base_agreement=0.95, functional_unavailable=None)
    assert far.decision is JobStatus.SKIPPED


def test_a_check_that_cannot_run_is_said_and_holds_only_when_required(settings: Settings) -> None:
    calm = {"drift": 0.0, "missing": 0}
    why = "the functional check cannot run: no config.json"
    open_ = plan_decision(0.0, settings, drift=calm, functional_unavailable=why)
    assert open_.decision is JobStatus.APPROVED and "base_agreement unavailable" in open_.reason
    assert next(s for s in open_.signals if s.name == "base_agreement").detail == why
    strict = settings.model_copy(update={"require_functional_check": True})
    held = plan_decision(0.0, strict, drift=calm, functional_unavailable=why)
    assert held.decision is JobStatus.PENDING_APPROVAL and "require_functional_check" in held.reason


def test_transfer_signals_hold_what_is_left_out_and_what_acts_otherwise(
    settings: Settings,
) -> None:
    fine = transfer_signals(0.0, 0.95, None, settings)
    assert [s.verdict for s in fine] == [Verdict.PASS, Verdict.PASS]
    dropped = transfer_signals(0.2, 0.95, None, settings)
    assert dropped[0].verdict is Verdict.HOLD
    loose = settings.model_copy(update={"max_dropped_share": 0.25})
    assert transfer_signals(0.2, 0.95, None, loose)[0].verdict is Verdict.PASS
    assert transfer_signals(0.0, 0.1, None, settings)[1].verdict is Verdict.HOLD
    assert transfer_signals(0.0, None, None, settings)[1].verdict is Verdict.HOLD  # undefined r


# --- real successors ----------------------------------------------------------------------


def _lorax_on(weights: Path, folder: Path, *, rank: int = 64, seed: int = 3) -> Path:
    """A LoRA-X (diagonal dS, rank 64) on the attention projections of a real base."""
    source = WeightSource.open(weights)
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for name in source.names:
        if ".attention." not in name:
            continue
        f = factorize(source.matrix(name))
        ds = torch.randn(rank, generator=g) * 0.3 * f.S[:rank]
        modules[name] = LoraModule(
            name, f.U[:, :rank].clone(), torch.diag(ds) @ f.V[:, :rank].T, scale=1.0, ds=ds
        )
    adapter = LoraAdapter(modules, AdapterKind.LORAX, AdapterLayout.PEFT, config={"r": rank})
    write_adapter(adapter, folder)
    return folder


def _pass_onto(tmp_path: Path, minilm: Path, successor: Path) -> tuple[JobStatus, str, dict]:
    registry = MemoryRegistry(tmp_path / "registry")
    settings = load_settings(
        data_dir=tmp_path / "data", tracking_uri="sqlite:///unused.db", similarity_rank=32
    )
    ensure_sqlite_parent(settings.database_url.get_secret_value())
    migrations.upgrade(settings.database_url.get_secret_value())
    v1 = registry.add_version("minilm", minilm.parent, {Tag.ROLE: "base"}).ref
    adapter = _lorax_on(minilm, tmp_path / "adapter")
    registry.add_version(
        "minilm-style", adapter, {Tag.ROLE: "adapter", Tag.BASE: str(v1), Tag.FORMAT: "lorax"}
    )
    registry.add_version("minilm", successor.parent, {Tag.ROLE: "base"})
    ctx = build_context(settings, registry)
    run_once(ctx)
    with session_scope(ctx.sessions) as session:
        (job,) = list_jobs(session=session)
        signals = {x["name"]: x for x in job.signals or []}
        return job.status, job.policy_reason or "", signals


@pytest.mark.slow
@pytest.mark.realmodels
def test_a_successor_whose_function_changed_waits_for_an_admin(
    tmp_path: Path, minilm_weights: Path, pristine_weights: Path, random_ffn_minilm: Path
) -> None:
    status, reason, signals = _pass_onto(tmp_path / "ffn", minilm_weights, random_ffn_minilm)
    assert status is JobStatus.PENDING_APPROVAL, reason
    assert signals["atc"]["value"] < 1e-3 and signals["atc"]["verdict"] == "pass"  # ATC is blind
    assert signals["weight_drift"]["verdict"] == "hold" and "weight_drift" in reason
    assert signals["base_agreement"]["verdict"] == "hold" and "base_agreement" in reason
    status, reason, signals = _pass_onto(tmp_path / "pristine", minilm_weights, pristine_weights)
    assert status is JobStatus.SUCCEEDED, reason
    assert {signals[n]["verdict"] for n in ("atc", "weight_drift", "base_agreement")} == {"pass"}
    assert signals["adapter_agreement"]["verdict"] == "pass"  # measured on the transfer
    assert signals["dropped_share"]["value"] == 0.0


def test_a_transfer_that_drops_part_of_the_adapter_is_held_until_an_admin_approves(
    tmp_path: Path,
) -> None:
    from db import approve, audit_trail, get_job
    from tests.migrator.scenario import Story, base_weights, register, successor, write_weights

    registry = MemoryRegistry(tmp_path / "registry")
    settings = load_settings(
        data_dir=tmp_path / "data",
        tracking_uri="sqlite:///unused.db",
        similarity_rank=8,
        max_weight_drift=1.0,  # this test is about the transfer's own signals
    )
    ensure_sqlite_parent(settings.database_url.get_secret_value())
    migrations.upgrade(settings.database_url.get_secret_value())
    story = Story(tmp_path / "story", registry)
    story.register_v1_with_adapters()
    v2 = successor(story.v1)
    replaced = "encoder.layer.1.attention.self.value.weight"
    v2[replaced] = base_weights(777)[replaced]  # this module's subspace moved: it is skipped
    register(registry, "enc", write_weights(tmp_path / "v2", v2), {Tag.ROLE: "base"})
    ctx = build_context(settings, registry)
    report = run_once(ctx)
    with session_scope(ctx.sessions) as session:
        jobs = {j.adapter_version.name: j for j in list_jobs(session=session)}
        job = jobs["enc-styleA"]
        assert job.policy_decision is JobStatus.PENDING_APPROVAL  # held after the transfer
        assert job.status is JobStatus.PENDING_APPROVAL and job.result_ref is None
        assert "held after the transfer" in (job.policy_reason or "")
        assert "encoder.layer.1.attention.self.value" in (job.policy_reason or "")
        planning = audit_trail(job.id, session=session)
        assert [e.to_status for e in planning] == [JobStatus.APPROVED, JobStatus.PENDING_APPROVAL]
        job_id = job.id
    assert {o.job_id: o.status for o in report.outcomes}[job_id] is OutcomeStatus.HELD
    assert not [v for v in registry.versions.values() if v.tags.get(Tag.JOB) == str(job_id)]
    with session_scope(ctx.sessions) as session:
        approve(job_id, "alice", "the value projection may go", session=session)
    run_once(ctx)
    with session_scope(ctx.sessions) as session:
        job = get_job(job_id, session=session)
        assert job.status is JobStatus.SUCCEEDED and job.result_ref is not None
        names = [x["name"] for x in job.signals or []]
        assert names.count("dropped_share") == 2  # measured on both runs
    version = next(v for v in registry.versions.values() if v.tags.get(Tag.JOB) == str(job_id))
    assert version.tags[Tag.APPROVED_BY] == "alice"
    assert "dropped_share" in version.description
