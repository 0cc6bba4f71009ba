"""Bad registry content ends as a failed or skipped job with a clear reason; nothing else is
affected (real MLflow store)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from db import JobStatus, list_jobs, migrations, session_scope
from migrator.database import ensure_sqlite_parent
from migrator.pipeline import Context, run_once
from migrator.registry import Tag
from migrator.registry.mlflow_registry import MlflowRegistry
from migrator.settings import load_settings
from migrator.wiring import build_context
from tests.fixtures.mlflow import MlflowStore
from tests.migrator.scenario import Story, lorax_adapter, register, write


@pytest.fixture
def ctx(tmp_path: Path, mlflow_store: MlflowStore) -> Context:
    settings = load_settings(data_dir=tmp_path / "data", similarity_rank=8)
    ensure_sqlite_parent(settings.database_url.get_secret_value())
    migrations.upgrade(settings.database_url.get_secret_value())
    registry = MlflowRegistry(mlflow_store.uri, artifact_root=mlflow_store.artifact_root, retries=0)
    return build_context(settings, registry)


def _jobs(ctx: Context) -> dict[str, tuple[JobStatus, str | None, str | None]]:
    with session_scope(ctx.sessions) as session:
        return {
            f"{j.adapter_version.ref}->{j.target_base.ref}": (
                j.status,
                j.policy_reason,
                j.last_error,
            )
            for j in list_jobs(session=session)
        }


def test_bad_content_fails_alone(ctx: Context, tmp_path: Path) -> None:
    registry = ctx.registry
    story = Story(tmp_path / "story", registry)
    story.register_v1_with_adapters()
    v1 = story.v1
    root = tmp_path / "bad"

    # An adapter whose file is truncated.
    good = write(lorax_adapter(v1, seed=7), root / "corrupt")
    weights = good / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    register(
        registry, "corrupt", good, {Tag.ROLE: "adapter", Tag.BASE: "enc/1", Tag.FORMAT: "lorax"}
    )

    # An adapter shipped as a pickle.
    pickled = root / "pickled"
    pickled.mkdir(parents=True)
    (pickled / "adapter_config.json").write_text('{"r": 4, "lora_alpha": 4, "peft_type": "LORA"}')
    torch.save(
        {"base_model.model.encoder.layer.0.attention.self.query.lora_A.weight": torch.zeros(4, 64)},
        pickled / "adapter_model.bin",
    )
    register(
        registry, "pickled", pickled, {Tag.ROLE: "adapter", Tag.BASE: "enc/1", Tag.FORMAT: "lora"}
    )

    # An adapter naming a base the registry does not hold.
    orphan = write(lorax_adapter(v1, seed=8), root / "orphan")
    register(
        registry, "orphan", orphan, {Tag.ROLE: "adapter", Tag.BASE: "enc/9", Tag.FORMAT: "lorax"}
    )

    story.register_successors()
    # A base version without weights, and one whose only checkpoint is a pickle.
    register(registry, "hollow", None, {Tag.ROLE: "base", Tag.SUPERSEDES: "enc/1"})
    pickle_base = root / "pickle-base"
    pickle_base.mkdir()
    torch.save({k: v for k, v in story.v2.items()}, pickle_base / "pytorch_model.bin")
    register(registry, "pickly", pickle_base, {Tag.ROLE: "base", Tag.SUPERSEDES: "enc/1"})

    report = run_once(ctx)
    jobs = _jobs(ctx)

    # The good adapters arrived on the related successor.
    for name in ("enc-styleA/1", "enc-plainB/1", "enc-kohyaC/1"):
        assert jobs[f"{name}->enc/2"][0] is JobStatus.SUCCEEDED

    status, _, error = jobs["corrupt/1->enc/2"]
    assert status is JobStatus.FAILED
    assert error is not None and "adapter_model.safetensors" in error
    status, _, error = jobs["pickled/1->enc/2"]
    assert status is JobStatus.FAILED
    assert error is not None and "pickle" in error.lower()

    for broken in ("hollow/1", "pickly/1"):
        status, reason, _ = jobs[f"enc-styleA/1->{broken}"]
        assert status is JobStatus.SKIPPED
        assert reason is not None and broken in reason and "no usable weights" in reason
    assert "pickle" in (jobs["enc-styleA/1->pickly/1"][1] or "").lower()

    status, reason, _ = jobs["orphan/1->enc/2"]
    assert status is JobStatus.SKIPPED
    assert reason == "base enc/9 is not in the registry"
    assert any("enc/9" in p for p in report.problems)

    # Broken bases deprecate nothing: enc/1 is superseded by a usable base.
    assert registry.get_version(story.refs["v1"]).tags[Tag.SUPERSEDED_BY] == "enc/2,enc-other/1"
    # A second pass neither retries bad input nor duplicates anything.
    again = run_once(ctx)
    assert again.outcomes == [] and again.planned == []
