"""Fixtures of the end-to-end tests: daemon processes cleaned up whatever happens, unique model
names on the shared ``mlflow server``, and a synthetic base pair with adapters built once."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from core.adapter import AdapterLayout
from migrator.registry.mlflow_registry import MlflowRegistry
from tests.e2e.harness import DaemonProcess
from tests.fixtures.mlflow import MlflowServer
from tests.migrator.scenario import (
    base_weights,
    lorax_adapter,
    plain_lora_adapter,
    successor,
    write,
    write_weights,
)

StartDaemon = Callable[..., DaemonProcess]


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[StartDaemon]:
    """``start_daemon(env, name, args=("run",))``: a migrator process logging to
    ``<tmp>/logs/<name>.log``; every process still running at the end is killed (group)."""
    started: list[DaemonProcess] = []

    def start(env: Mapping[str, str], name: str, args: Sequence[str] = ("run",)) -> DaemonProcess:
        daemon = DaemonProcess(env, tmp_path / "logs" / f"{name}.log", args=args)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.kill()


@pytest.fixture
def unique(mlflow_server: MlflowServer) -> Iterator[str]:
    """A short prefix that makes this test's registered-model names on the session
    ``mlflow server`` its own; they are deleted afterwards.

    A daemon works on everything the registry holds, so a later test's daemon would otherwise
    plan (and run) transfers of this test's leftovers. Request it before ``start_daemon``: its
    cleanup must come after the daemons are stopped.
    """
    prefix = f"e2e{uuid.uuid4().hex[:8]}"
    yield prefix
    client = MlflowClient(tracking_uri=mlflow_server.url)
    for model in client.search_registered_models(
        filter_string=f"name LIKE '{prefix}%'", max_results=1000
    ):
        client.delete_registered_model(model.name)


@pytest.fixture
def server_registry(mlflow_server: MlflowServer) -> MlflowRegistry:
    """The session ``mlflow server`` as the test's own client sees it (over HTTP)."""
    return MlflowRegistry(mlflow_server.url, retries=2, backoff_s=0.5)


@dataclass(frozen=True)
class SyntheticFiles:
    """A BERT-shaped base v1, a related successor v2 (2% moved) and adapters on v1."""

    v1: Path
    v2: Path
    v1_weights: dict[str, torch.Tensor]
    v2_weights: dict[str, torch.Tensor]
    adapters: dict[str, tuple[Path, str]]  # name -> (files, lorax.format)
    lorax_many: list[Path]  # 20 LoRA-X adapters (PEFT) for the replica test


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> SyntheticFiles:
    root = tmp_path_factory.mktemp("e2e-synthetic")
    v1 = base_weights(0)
    v2 = successor(v1)
    adapters = {
        "styleA": (write(lorax_adapter(v1, seed=1), root / "adapters" / "styleA"), "lorax"),
        "plainB": (write(plain_lora_adapter(v1, seed=2), root / "adapters" / "plainB"), "lora"),
        "kohyaC": (
            write(
                lorax_adapter(v1, seed=3, layout=AdapterLayout.KOHYA),
                root / "adapters" / "kohyaC",
            ),
            "lorax",
        ),
    }
    many = [
        write(lorax_adapter(v1, rank=8, seed=100 + i), root / "many" / f"a{i:02d}")
        for i in range(20)
    ]
    return SyntheticFiles(
        v1=write_weights(root / "v1", v1),
        v2=write_weights(root / "v2", v2),
        v1_weights=v1,
        v2_weights=v2,
        adapters=adapters,
        lorax_many=many,
    )
