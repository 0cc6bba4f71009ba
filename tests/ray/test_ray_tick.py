"""``migrator tick`` with ``MIGRATOR_EXECUTOR=ray`` registers what the local executor registers,
each job exactly once (real MLflow stores, a local Ray with 2 CPUs)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from core.formats import read_adapter
from db import JobStatus, list_jobs, session_scope
from migrator.cli import app
from migrator.registry import Tag, VersionRef
from migrator.registry.mlflow_registry import MlflowRegistry
from migrator.settings import load_settings
from migrator.wiring import build_context
from tests.fixtures.mlflow import MlflowStore
from tests.ray.conftest import Fleet, make_fleet

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ADAPTERS = 10


def _env(store: MlflowStore, data: Path, executor: str) -> dict[str, str]:
    return {
        "MIGRATOR_DATA_DIR": str(data),
        "MIGRATOR_TRACKING_URI": store.uri,
        "MIGRATOR_ARTIFACT_ROOT": store.artifact_root,
        "MIGRATOR_SIMILARITY_RANK": "8",
        "MIGRATOR_EXECUTOR": executor,
        "MIGRATOR_RAY_ADDRESS": "",  # the Ray this process runs (the fixture's)
        "MIGRATOR_HEARTBEAT_S": "1",
        "MIGRATOR_CLAIM_BATCH": "6",  # two batches
    }


def _tick(store: MlflowStore, data: Path, executor: str) -> dict[str, Any]:
    result = CliRunner().invoke(app, ["tick", "--json"], env=_env(store, data, executor))
    assert result.exit_code == 0, result.output
    document: dict[str, Any] = json.loads(result.stdout)
    return document


def _registered(store: MlflowStore, data: Path, fleet: Fleet, tmp: Path) -> dict[str, Any]:
    """Per lineage: the job (status, attempts) and the transferred version's tensors and tags."""
    registry = MlflowRegistry(store.uri, artifact_root=store.artifact_root, retries=0)
    settings = load_settings(data_dir=data, tracking_uri=store.uri)
    ctx = build_context(settings, registry)
    with session_scope(ctx.sessions) as session:
        jobs = {
            job.adapter_version.name: (job.id, job.status, job.attempts, job.result_ref)
            for job in list_jobs(session=session)
            if job.target_base.ref == "enc/2"
        }
    out: dict[str, Any] = {}
    for name, _, _ in fleet.adapters:
        job_id, status, attempts, result = jobs[name]
        transferred = [
            v
            for v in registry.list_versions(role="adapter")
            if v.name == name and Tag.JOB in v.tags
        ]
        assert [v.tags[Tag.JOB] for v in transferred] == [str(job_id)], name  # exactly once
        assert str(transferred[0].ref) == result
        local = registry.download(VersionRef.parse(result), tmp / name)
        files = sorted(local.rglob("*.safetensors"))
        adapter = read_adapter(files[0].parent if len(files) == 1 else local)
        out[name] = {
            "status": status,
            "attempts": attempts,
            "tags": {k: v for k, v in transferred[0].tags.items() if k != Tag.JOB},
            "deltas": {k: m.delta() for k, m in adapter.modules.items()},
        }
    return out


def test_ray_tick_registers_what_the_local_executor_does(
    ray_runtime: Any, new_store: Any, tmp_path: Path
) -> None:
    fleet = make_fleet(tmp_path / "fleet", ADAPTERS)
    stores = {kind: new_store(f"mlflow-{kind}") for kind in ("local", "ray")}
    for store in stores.values():
        fleet.register(MlflowRegistry(store.uri, artifact_root=store.artifact_root, retries=0))

    reports = {
        kind: _tick(store, tmp_path / f"data-{kind}", kind) for kind, store in stores.items()
    }
    for report in reports.values():
        assert report["problems"] == []
        done = [j for j in report["jobs"] if j["target_base"] == "enc/2"]
        assert len(done) == ADAPTERS and {j["status"] for j in done} == {"succeeded"}

    got = {
        kind: _registered(store, tmp_path / f"data-{kind}", fleet, tmp_path / f"check-{kind}")
        for kind, store in stores.items()
    }
    # The factorization fanned out on Ray filled the Ray run's own cache.
    assert any((tmp_path / "data-ray" / "factor-cache").rglob("*.safetensors"))
    for name, _, _ in fleet.adapters:
        local, remote = got["local"][name], got["ray"][name]
        assert local["status"] is remote["status"] is JobStatus.SUCCEEDED
        assert local["attempts"] == remote["attempts"] == 1
        assert local["tags"] == remote["tags"]
        assert local["deltas"].keys() == remote["deltas"].keys() and local["deltas"]
        for key, want in local["deltas"].items():
            have = remote["deltas"][key]
            assert want.norm() > 0
            torch.testing.assert_close(have, want, rtol=0, atol=1e-6)

    # A second pass with the Ray executor finds nothing left to do.
    again = _tick(stores["ray"], tmp_path / "data-ray", "ray")
    assert [
        j for j in again["jobs"] if j["status"] != "succeeded" and j["target_base"] == "enc/2"
    ] == []
