"""Factorization fanned out on Ray: how a base is cut into tasks, what the tasks ask of the
cluster, and that the factors they leave in the shared cache are the ones the daemon uses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from core.errors import NonFiniteError
from core.factorize import FactorStore, factorize
from migrator.bases import OpenedBase, open_base
from migrator.executors.factor_plan import FactorGroup, factor_groups
from migrator.executors.ray_executor import RayExecutor
from migrator.executors.ray_runtime import factorize_on_ray, factorize_options
from migrator.executors.ray_tasks import LeaseGate
from migrator.executors.shipping import worker_settings
from migrator.registry.mlflow_registry import MlflowRegistry
from migrator.settings import Device, Settings, load_settings
from migrator.wiring import build_context
from tests.migrator.scenario import base_weights, write_weights
from tests.ray.conftest import make_fleet

ENCODER = [r"encoder\.layer\.\d+\."]  # attention (64 x 64) and intermediate (256 x 64)


def _settings(tmp_path: Path, **overrides: Any) -> Settings:
    return load_settings(
        data_dir=tmp_path / "data", tracking_uri="sqlite:///unused.db", **overrides
    )


def _base(tmp_path: Path, **overrides: Any) -> OpenedBase:
    folder = write_weights(tmp_path / "base", base_weights(0, layers=3))
    return open_base(folder, _settings(tmp_path, module_patterns=ENCODER, **overrides))


# --- without Ray ------------------------------------------------------------------------------


@pytest.mark.parametrize("parallelism", [1, 2, 8])
def test_groups_cover_every_module_once_by_shape_largest_first(
    tmp_path: Path, parallelism: int
) -> None:
    base = _base(tmp_path)
    groups = factor_groups(base, parallelism=parallelism)
    names = [name for g in groups for name in g.names]
    assert sorted(names) == sorted(base.selected) and len(set(names)) == len(names)
    assert {base.store.shape(n) for n in base.selected} == {(64, 64), (256, 64)}
    for group in groups:
        assert {base.store.shape(n) for n in group.names} == {group.shape}
        assert group.path == str(base.source.path) and group.label == base.label
    assert [g.cost for g in groups] == sorted((g.cost for g in groups), reverse=True)
    # More workers, more (smaller) tasks; one worker still gets two tasks per shape at most.
    assert len(groups) >= min(len(base.selected), parallelism)


def test_groups_respect_the_byte_budget_and_skip_cached_modules(tmp_path: Path) -> None:
    base = _base(tmp_path)
    one_each = factor_groups(base, parallelism=1, max_bytes=4 * 64 * 64)
    assert all(len(g.names) == 1 for g in one_each) and len(one_each) == len(base.selected)

    done = [n for n in base.selected if base.store.shape(n) == (256, 64)]
    FactorStore(base.source, done, cache=base.store.cache).prefetch()
    rest = [n for g in factor_groups(base, parallelism=2) for n in g.names]
    assert rest and not set(rest) & set(done)
    assert sorted(rest + done) == sorted(base.selected)


def test_factorization_asks_a_gpu_per_task_only_where_the_device_is_cuda(tmp_path: Path) -> None:
    cuda = factorize_options(_settings(tmp_path, device="cuda"), cpus_per_task=2)
    assert cuda == {"num_cpus": 2, "num_gpus": 1, "max_retries": 3, "retry_exceptions": False}
    for device in ("cpu", "auto"):
        assert factorize_options(_settings(tmp_path, device=device))["num_gpus"] == 0
    # auto on a cluster with GPUs: the executor asks one (the daemon may stay CPU-only)
    assert factorize_options(_settings(tmp_path, device="auto"), gpu=True)["num_gpus"] == 1


def test_workers_get_absolute_paths_and_no_database_or_webhook_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    settings = load_settings(
        data_dir=Path("rel"), tracking_uri="sqlite:///rel/mlflow.db", webhook_secret="s3cret"
    )
    shipped = worker_settings(settings, device=settings.device)
    assert shipped.database_url.get_secret_value() == "" and shipped.webhook_secret is None
    assert shipped.cache_dir == (tmp_path / "rel" / "factor-cache")
    assert shipped.tracking_uri == f"sqlite:///{tmp_path / 'rel' / 'mlflow.db'}"
    assert (
        settings.database_url.get_secret_value().startswith("sqlite:///")
        and settings.webhook_secret is not None
    )


def test_the_lease_gate_opens_for_a_while_and_closes() -> None:
    gate = LeaseGate()
    assert not gate.may_publish(1)
    gate.hold(1, 60.0)
    assert gate.may_publish(1) and not gate.may_publish(2)
    gate.release(1)
    assert not gate.may_publish(1)
    gate.hold(2, 0.0)  # renewals stopped long enough: closed by itself
    assert not gate.may_publish(2)


# --- on Ray -----------------------------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.slow
def test_prefetch_factorizes_each_base_once_on_ray_into_the_shared_cache(
    ray_runtime: Any, new_store: Any, tmp_path: Path
) -> None:
    store = new_store("mlflow")
    registry = MlflowRegistry(store.uri, artifact_root=store.artifact_root, retries=0)
    refs = make_fleet(tmp_path / "fleet", 0).register(registry)
    settings = load_settings(
        data_dir=tmp_path / "data",
        tracking_uri=store.uri,
        artifact_root=store.artifact_root,
        executor="ray",
        module_patterns=ENCODER,
    )
    ctx = build_context(settings, registry)
    infos = [registry.get_version(refs["v1"]), registry.get_version(refs["v2"])]
    bases = [ctx.workspace.base(info) for info in infos]
    executor = RayExecutor.shared(settings)
    assert factor_groups(bases[0], parallelism=2)  # nothing cached yet
    assert not executor.uses_gpus(settings)  # auto, and this Ray has no GPU
    assert executor.uses_gpus(settings.model_copy(update={"device": Device.CUDA}))
    assert executor.parallelism(settings) == 2

    executor.prefetch(ctx, infos)

    for base in bases:
        assert factor_groups(base, parallelism=2) == []  # every module is in the cache
        fresh = open_base(Path(base.source.path), settings)  # a new store on the same cache
        leading = fresh.factors_at(fresh.assessment_rank)
        assert fresh.store.computed == 0  # the daemon's assessment computes nothing itself
        for name, factors in leading.items():
            want = factorize(base.source.matrix(name))  # exact, here
            k = factors.S.numel()
            assert k == min(fresh.assessment_rank, *base.source.matrix(name).shape)
            torch.testing.assert_close(factors.S, want.S[:k], rtol=1e-3, atol=1e-4)
            # the same leading subspace: every cosine of the principal angles near 1
            cosines = torch.linalg.svdvals(factors.U.T @ want.U[:, :k])
            assert float(cosines[: k // 2].min()) > 0.99, name


@pytest.mark.ray
@pytest.mark.slow
def test_factorization_tasks_report_small_results_and_bad_weights_fail_clearly(
    ray_runtime: Any, tmp_path: Path
) -> None:
    base = _base(tmp_path)
    settings = _settings(tmp_path, module_patterns=ENCODER)
    groups = factor_groups(base, parallelism=2)
    reports = factorize_on_ray(settings, groups)
    assert [(r.shape, r.modules) for r in reports] == [(g.shape, len(g.names)) for g in groups]
    assert sum(r.computed for r in reports) == len(base.selected)
    assert {r.device for r in reports} == {"cpu"} and {r.threads for r in reports} == {1}

    weights = base_weights(1)
    weights["encoder.layer.0.attention.self.query.weight"][3, 5] = float("nan")
    bad = write_weights(tmp_path / "bad", weights)
    group = FactorGroup(
        "bad/1", str(bad), None, (64, 64), ("encoder.layer.0.attention.self.query",)
    )
    with pytest.raises(NonFiniteError, match="NaN"):
        factorize_on_ray(settings, [group], max_retries=0)
