"""A local Ray runtime for the Ray executor tests (2 CPUs, no dashboard, loopback only), and a
fleet of adapters to migrate, registered in real MLflow stores.

Every test here is marked ``ray`` (deselect with ``-m "not ray"`` where Ray is not installed).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Before anything imports Ray: its servers bind to 127.0.0.1 only (single-machine mode).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import pytest

from core.adapter import AdapterLayout
from migrator.registry import Registry, Tag, VersionRef
from tests.fixtures.mlflow import MlflowStore, fresh_store
from tests.migrator.scenario import (
    base_weights,
    lorax_adapter,
    plain_lora_adapter,
    register,
    successor,
    write,
    write_weights,
)


@pytest.fixture(scope="session")
def ray_runtime() -> Iterator[Any]:
    """Ray started once for the session with 2 CPUs; shut down (with the executors) at the end."""
    import ray

    from migrator.executors.ray_executor import RayExecutor

    ray.init(num_cpus=2, include_dashboard=False, namespace="lorax-migrator-tests")
    try:
        yield ray
    finally:
        RayExecutor.close_shared()
        ray.shutdown()


@pytest.fixture
def new_store(tmp_path: Path, _mlflow_template: Path) -> Any:
    """A factory of fresh embedded MLflow stores (several per test)."""

    def make(name: str) -> MlflowStore:
        return fresh_store(tmp_path / name, _mlflow_template)

    return make


@dataclass(frozen=True)
class Fleet:
    """Files of a base, its successor and adapters on the base, ready to register anywhere.

    Attributes:
        adapters: (registered model name, files, lorax.format) per adapter.
        broken: adapter names whose files are not safetensors (bad content).
    """

    v1: Path
    v2: Path
    adapters: tuple[tuple[str, Path, str], ...]
    broken: tuple[str, ...] = ()

    def register(self, registry: Registry) -> dict[str, VersionRef]:
        """Register v1, the adapters on it, then v2 (which supersedes v1)."""
        refs = {"v1": register(registry, "enc", self.v1, {Tag.ROLE: "base"})}
        for name, files, fmt in self.adapters:
            tags = {Tag.ROLE: "adapter", Tag.BASE: str(refs["v1"]), Tag.FORMAT: fmt}
            refs[name] = register(registry, name, files, tags)
        refs["v2"] = register(registry, "enc", self.v2, {Tag.ROLE: "base"})
        return refs


def make_fleet(root: Path, count: int, *, broken: int = 0) -> Fleet:
    """``count`` adapters on a BERT-shaped base: LoRA-X in PEFT and kohya layouts, plain LoRA;
    plus ``broken`` adapters whose file is not safetensors."""
    v1 = base_weights(0)
    adapters = []
    for i in range(count):
        if i % 3 == 2:
            adapter, fmt = plain_lora_adapter(v1, seed=100 + i), "lora"
        else:
            layout = AdapterLayout.KOHYA if i % 3 == 1 else AdapterLayout.PEFT
            adapter, fmt = lorax_adapter(v1, seed=100 + i, layout=layout), "lorax"
        name = f"enc-a{i:02d}"
        adapters.append((name, write(adapter, root / "adapters" / name), fmt))
    names = []
    for i in range(broken):
        name = f"enc-broken{i}"
        folder = root / "adapters" / name
        folder.mkdir(parents=True)
        (folder / "adapter.safetensors").write_bytes(b"this is not a safetensors file")
        adapters.append((name, folder, "lorax"))
        names.append(name)
    return Fleet(
        v1=write_weights(root / "v1", v1),
        v2=write_weights(root / "v2", successor(v1)),
        adapters=tuple(adapters),
        broken=tuple(names),
    )
