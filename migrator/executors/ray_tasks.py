"""What runs on the Ray workers (``MIGRATOR_EXECUTOR=ray``): the transfer and factorization
tasks, and the lease gate actor. The daemon's side is :mod:`migrator.executors.ray_executor`.

A task gets only the settings (from :func:`migrator.executors.shipping.worker_settings`: no
database URL) and a small request; it builds its registry client and workspace on the worker, once per
worker process, and returns a small result: :class:`~migrator.pipeline.transfer_job.TransferDone`
or :class:`GroupReport`, never tensors. Factors travel through the factorization cache, which
every worker reaches (a shared volume; :envvar:`MIGRATOR_WORKER_CACHE_DIR` where it is mounted
elsewhere than on the daemon).
"""

from __future__ import annotations

import fcntl
import math
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import InputError
from core.factor_cache import FactorCache
from core.factorize import FactorStore
from core.weights import WeightSource
from migrator.executors.factor_plan import FactorGroup
from migrator.executors.shipping import node_settings
from migrator.pipeline.context import Workspace
from migrator.pipeline.transfer_job import TransferDone, TransferRequest, perform_transfer
from migrator.registry import Registry, VersionRef
from migrator.registry.mlflow_registry import MlflowRegistry
from migrator.settings import Settings

__all__ = [
    "GATE_TIMEOUT_S",
    "GroupReport",
    "LeaseGate",
    "NodeWorkspace",
    "PublishRefusedError",
    "factorize_task",
    "transfer_task",
]

GATE_TIMEOUT_S = 60.0


class PublishRefusedError(RuntimeError):
    """A task did not publish: the daemon no longer holds the job's lease (or cannot say so)."""


class NodeWorkspace(Workspace):
    """A worker's workspace: each download is locked (``flock``), so the worker processes of a
    node share one copy in its scratch folder instead of racing to write it."""

    def _download(self, kind: str, ref: VersionRef) -> Path:
        lock = self.settings.scratch_dir / kind / ref.name / f".{ref.version}.lock"
        lock.parent.mkdir(parents=True, exist_ok=True)
        with lock.open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                return super()._download(kind, ref)
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


_WORKER_STATE: dict[str, tuple[Registry, NodeWorkspace]] = {}


def _workspace(settings: Settings) -> tuple[Registry, NodeWorkspace]:
    """This worker process's registry client and workspace for ``settings`` (made once)."""
    key = settings.model_dump_json()
    if key not in _WORKER_STATE:
        registry = MlflowRegistry.from_settings(settings)
        _WORKER_STATE.clear()  # one configuration at a time: opened bases hold memory
        _WORKER_STATE[key] = (registry, NodeWorkspace(settings, registry, keep_bases=2))
    return _WORKER_STATE[key]


def transfer_task(settings: Settings, request: TransferRequest, gate: Any) -> TransferDone:
    """Ray task: perform one transfer job on this worker and report the registered version.

    Args:
        settings: from :func:`migrator.executors.shipping.worker_settings` (no database URL).
        request: the claimed job.
        gate: the daemon's :class:`LeaseGate` actor, asked right before publishing.

    Raises:
        InputError: bad content (the job fails for good).
        PublishRefusedError, RegistryError, OSError, ...: the job fails and is retried later.
    """
    settings = node_settings(settings)
    registry, workspace = _workspace(settings)

    def before_publish() -> None:
        import ray

        try:
            held = ray.get(gate.may_publish.remote(request.job_id), timeout=GATE_TIMEOUT_S)
        except Exception as exc:  # the daemon is gone or unreachable: do not publish
            raise PublishRefusedError(
                f"job {request.job_id}: lease gate unreachable: {exc}"
            ) from exc
        if not held:
            raise PublishRefusedError(
                f"job {request.job_id}: the daemon no longer holds the job's lease; not publishing"
            )

    return perform_transfer(settings, registry, workspace, request, before_publish=before_publish)


@dataclass(frozen=True)
class GroupReport:
    """What a factorization task reports back (small: no tensors).

    Attributes:
        label, shape: the group's base and module shape.
        modules: modules in the group.
        computed: modules factorized by this task (the others were found in the cache).
        seconds: the task's wall time on the worker (opening, reading, SVD, cache writes).
        device: where the SVDs ran.
        host: the worker's host name.
        threads: torch threads the task used.
        cache_write_errors: factors that could not be written to the cache.
    """

    label: str
    shape: tuple[int, int]
    modules: int
    computed: int
    seconds: float
    device: str
    host: str
    threads: int
    cache_write_errors: int


def _group_source(settings: Settings, group: FactorGroup) -> WeightSource:
    """The group's weights: at the daemon's path where this worker sees it, else downloaded
    (once per node) from the registry."""
    if Path(group.path).exists():
        return WeightSource.open(group.path, allow_pickle=settings.allow_pickle)
    if group.version is None:
        raise InputError("base weights not reachable from this worker", path=group.path)
    _, workspace = _workspace(settings)
    return workspace.base(group.version).source


def factorize_task(settings: Settings, group: FactorGroup) -> GroupReport:
    """Ray task: factorize a group's modules into the factorization cache.

    Uses as many torch threads as the task was given CPUs, and ``settings.device``.

    Raises:
        InputError: unreadable or non-finite weights (named by file and key).
        FactorizationError: an SVD that failed.
    """
    import ray
    import torch

    settings = node_settings(settings)
    started = time.perf_counter()
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    threads = max(1, int(cpus))
    torch.set_num_threads(threads)
    store = FactorStore(
        _group_source(settings, group),
        group.names,
        cache=FactorCache(settings.cache_dir, max_bytes=settings.cache_max_bytes),
        device=settings.device.value,
    )
    k, exact = settings.similarity_rank, settings.assessment_factors == "exact"
    if exact:  # what the assessment reads: the leading k triplets of each module
        store.prefetch(rank=k, complete=False)
    else:
        store.prefetch(rank=k, exact=False)
    return GroupReport(
        label=group.label,
        shape=group.shape,
        modules=len(group.names),
        computed=store.computed,
        seconds=time.perf_counter() - started,
        device=str(store.device),
        host=socket.gethostname(),
        threads=threads,
        cache_write_errors=store.cache_write_errors,
    )


class LeaseGate:
    """Which jobs may publish now: a Ray actor owned by the daemon (plain class, testable).

    ``hold(job, valid_for_s)`` opens the gate for ``valid_for_s`` seconds of the actor's
    monotonic clock (no clock is compared across machines); ``release`` closes it.
    """

    def __init__(self) -> None:
        self._until: dict[int, float] = {}

    def hold(self, job_id: int, valid_for_s: float) -> None:
        self._until[job_id] = time.monotonic() + valid_for_s

    def release(self, job_id: int) -> None:
        self._until.pop(job_id, None)

    def may_publish(self, job_id: int) -> bool:
        return time.monotonic() < self._until.get(job_id, -math.inf)
