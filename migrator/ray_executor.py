"""Run the heavy work on a Ray cluster (``MIGRATOR_EXECUTOR=ray``); the job database stays here.

This module is the daemon's side; what runs on the workers is :mod:`migrator.ray_tasks`.

- **The daemon** (this process, the Ray driver) claims jobs, keeps their leases alive while they
  run remotely (one heartbeat thread for the batch), and records how each ended
  (:func:`~migrator.pipeline.execution.record_success` / ``record_failure``). The settings it
  ships carry no database URL and no webhook secret: workers never touch the job database.
- **A transfer task** per claimed job runs
  :func:`~migrator.pipeline.transfer_job.perform_transfer` on a worker, with a registry client
  and a workspace built there from the settings, and returns the small
  :class:`~migrator.pipeline.transfer_job.TransferDone`.
- **Factorization tasks** (:func:`factorize_on_ray`) split a base by shape group (one GPU each
  where ``device=cuda``, or ``auto`` on a cluster with GPUs), write the factors into the
  factorization cache, which every worker and the daemon reach at the same path (a shared
  volume: the cache is content-addressed and written atomically), and return a
  :class:`~migrator.ray_tasks.GroupReport`, never tensors. The planner calls
  :meth:`RayExecutor.prefetch` before it assesses a base pair, so each base is factorized once
  cluster-wide and the assessment, then every transfer, reads the factors from the cache.

Retries: a task whose worker or node dies is retried by Ray (``max_retries``); an exception the
task raises comes back at once (``retry_exceptions=False``) and is the job's failure, retried by
the job's own policy (backoff, ``max_attempts``), or not at all for bad input. Registration is
idempotent by the job's tag, so a retried task finds a version its killed predecessor
registered instead of registering a second one.

Publishing under a lease: before it writes to the registry, a task asks a small actor owned by
the daemon (:class:`~migrator.ray_tasks.LeaseGate`) whether the daemon still holds the job's
lease. The daemon opens the gate for ``lease_s / 2`` after each successful renewal and closes it
when the lease is lost, so work whose job was reclaimed by another replica is not published (the
local executor renews the lease at that point instead).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from core.errors import InputError
from db import LeaseLostError
from migrator.executor import release_jobs
from migrator.pipeline.context import CRASH_ENV
from migrator.pipeline.execution import (
    JobOutcome,
    LeaseKeeper,
    load_request,
    record_failure,
    record_success,
)
from migrator.pipeline.transfer_job import TransferDone, TransferRequest
from migrator.ray_tasks import (
    GATE_TIMEOUT_S,
    FactorGroup,
    GroupReport,
    LeaseGate,
    factorize_task,
    transfer_task,
)
from migrator.registry import ModelVersionInfo
from migrator.settings import Device, Settings

if TYPE_CHECKING:
    from migrator.migration import BaseModel
    from migrator.pipeline.context import Context

__all__ = [
    "RayExecutor",
    "RemoteTaskLostError",
    "factor_groups",
    "factorize_on_ray",
    "factorize_options",
    "split_modules",
    "worker_settings",
]

log = logging.getLogger(__name__)

#: Test hooks forwarded to tasks (see :func:`migrator.pipeline.context.crash_point`).
_FORWARDED_ENV = (CRASH_ENV, "MIGRATOR_CRASH_MARKER")
_NAMESPACE = "lorax-migrator"
_BATCH_BYTES = 256 << 20  # float32 input of one factorization task at most (FactorStore's batch)


class RemoteTaskLostError(RuntimeError):
    """A task's worker or node was lost more often than Ray retries it (``max_retries``)."""


def _absolute_sqlite(uri: str) -> str:
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/") and ":memory:" not in uri:
        return prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri


def worker_settings(settings: Settings, *, device: Device | None = None) -> Settings:
    """The settings shipped to workers: absolute paths, no database URL, no webhook secret.

    Args:
        device: overrides ``settings.device`` (transfer tasks that hold no GPU run on the CPU).
    """
    return settings.model_copy(
        update={
            "data_dir": settings.data_dir.resolve(),
            "cache_dir": settings.factor_cache_dir.resolve(),
            "scratch_dir": settings.scratch.resolve(),
            "tracking_uri": _absolute_sqlite(settings.tracking),
            "registry_uri": _absolute_sqlite(settings.registry),
            "database_url": None,
            "webhook_secret": None,
            "device": settings.device if device is None else device,
        }
    )


def split_modules(
    modules: Sequence[tuple[str, tuple[int, int]]],
    *,
    label: str,
    path: str,
    parallelism: int,
    version: ModelVersionInfo | None = None,
    tasks_per_worker: int = 2,
    max_bytes: int = _BATCH_BYTES,
) -> list[FactorGroup]:
    """Cut (name, (m, n)) modules into factorization tasks, largest first (pure: no I/O).

    Modules are grouped by shape (same-shape matrices are factorized in one batched SVD); a
    group is cut into even tasks of about ``1 / (parallelism * tasks_per_worker)`` of the total
    cost (m n min(m, n) per module) and at most ``max_bytes`` of float32 input, never below one
    module, so that ``parallelism`` workers end close together.
    """
    by_shape: dict[tuple[int, int], list[str]] = {}
    for name, shape in modules:
        by_shape.setdefault(shape, []).append(name)

    def unit(shape: tuple[int, int]) -> float:
        return float(shape[0]) * shape[1] * min(shape)

    total = sum(unit(shape) * len(names) for shape, names in by_shape.items())
    target = total / max(1, parallelism * tasks_per_worker)
    groups = []
    for shape, names in by_shape.items():
        per_task = max(1, min(int(target // unit(shape)), max_bytes // (4 * shape[0] * shape[1])))
        size = math.ceil(len(names) / math.ceil(len(names) / per_task))  # even chunks
        for start in range(0, len(names), size):
            groups.append(
                FactorGroup(label, path, version, shape, tuple(names[start : start + size]))
            )
    return sorted(groups, key=lambda g: g.cost, reverse=True)


def factor_groups(
    base: BaseModel,
    *,
    parallelism: int,
    version: ModelVersionInfo | None = None,
    tasks_per_worker: int = 2,
    max_bytes: int = _BATCH_BYTES,
    skip_cached: bool = True,
) -> list[FactorGroup]:
    """The factorization tasks of a base opened in the daemon (see :func:`split_modules`).

    Args:
        base: the base (headers and content digests only are read here).
        parallelism: workers expected to take the tasks (GPUs, or CPU slots).
        version: the base's registry version, for workers that cannot reach ``base``'s path.
        skip_cached: leave out modules whose complete factors are in the cache already.
    """
    store = base.store
    modules = []
    for name in store.names:
        if skip_cached and store.cache is not None:
            entry = store.cache.entry_path(base.source.digest(name), "exact", None)
            if entry.is_file():
                continue
        modules.append((name, store.shape(name)))
    return split_modules(
        modules,
        label=base.label,
        path=str(base.source.path),
        parallelism=parallelism,
        version=version,
        tasks_per_worker=tasks_per_worker,
        max_bytes=max_bytes,
    )


@functools.cache
def _remote() -> tuple[Any, Any, Any]:
    """The Ray wrappers of the tasks and of the gate (built once, after Ray is imported)."""
    import ray

    return ray.remote(transfer_task), ray.remote(factorize_task), ray.remote(LeaseGate)


def _cause(exc: BaseException) -> BaseException:
    """The exception a task raised (unwrapped from Ray's), or a one-line lost-worker error."""
    from ray.exceptions import RayTaskError

    if isinstance(exc, RayTaskError):
        cause = getattr(exc, "cause", None)
        return cause if isinstance(cause, BaseException) else exc
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return RemoteTaskLostError(f"{type(exc).__name__}: {first}")


def factorize_options(
    settings: Settings, *, gpu: bool | None = None, cpus_per_task: int = 1, max_retries: int = 3
) -> dict[str, Any]:
    """Ray options of a factorization task: ``cpus_per_task`` CPUs, Ray's retries for lost
    workers only, and one GPU when ``gpu`` (default: where ``settings.device`` is ``cuda``)."""
    if gpu is None:
        gpu = settings.device is Device.CUDA
    return {
        "num_cpus": cpus_per_task,
        "num_gpus": 1 if gpu else 0,
        "max_retries": max_retries,
        "retry_exceptions": False,
    }


def factorize_on_ray(
    settings: Settings,
    groups: Sequence[FactorGroup],
    *,
    gpu: bool | None = None,
    max_retries: int = 3,
    cpus_per_task: int = 1,
) -> list[GroupReport]:
    """Run one factorization task per group on the connected Ray cluster; wait for all.

    Args:
        gpu: one GPU per task (default: where ``settings.device`` is ``cuda``).

    Raises:
        The first failure: the task's own exception (InputError for bad weights), or
        :class:`RemoteTaskLostError` when a worker was lost more than ``max_retries`` times.
        The other tasks are cancelled.
    """
    import ray

    _, factorize, _ = _remote()
    shipped = worker_settings(settings)
    options = factorize_options(
        settings, gpu=gpu, cpus_per_task=cpus_per_task, max_retries=max_retries
    )
    refs = [
        factorize.options(
            name=f"factorize {g.label} {g.shape[0]}x{g.shape[1]} ({len(g.names)})", **options
        ).remote(shipped, g)
        for g in groups
    ]
    try:
        return list(ray.get(refs))
    except Exception as exc:
        for ref in refs:
            ray.cancel(ref)
        raise _cause(exc) from None


class _RemoteLeases:
    """Keeps the leases of remotely running jobs alive from the daemon (one heartbeat thread)
    and keeps the gate open for ``lease_s / 2`` past each renewal."""

    def __init__(self, ctx: Context, gate: Any) -> None:
        self.ctx = ctx
        self.gate = gate
        self.valid_for_s = ctx.settings.lease_s / 2
        self.lost: dict[int, str] = {}
        self._held: dict[int, LeaseKeeper] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ray-leases", daemon=True)

    def __enter__(self) -> _RemoteLeases:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        with self._lock:
            held, self._held = list(self._held), {}
        for job_id in held:
            self.gate.release.remote(job_id)

    def hold(self, job_id: int) -> bool:
        """Renew the job's lease now and open its gate; False when the lease is gone."""
        import ray

        keeper = LeaseKeeper(self.ctx, job_id)
        try:
            keeper.renew()
        except LeaseLostError as exc:
            self.lost[job_id] = str(exc)
            return False
        ray.get(self.gate.hold.remote(job_id, self.valid_for_s), timeout=GATE_TIMEOUT_S)
        with self._lock:
            self._held[job_id] = keeper
        return True

    def drop(self, job_id: int) -> None:
        """Stop renewing a job whose task has ended; close its gate."""
        with self._lock:
            self._held.pop(job_id, None)
        self.gate.release.remote(job_id)

    def _run(self) -> None:
        while not self._stop.wait(self.ctx.settings.heartbeat_s):
            with self._lock:
                held = list(self._held.items())
            for job_id, keeper in held:
                try:
                    keeper.renew()
                except LeaseLostError as exc:
                    with self._lock:
                        self._held.pop(job_id, None)
                    self.lost[job_id] = str(exc)
                    self.gate.release.remote(job_id)
                    log.warning("job %d: lease lost while it runs remotely (%s)", job_id, exc)
                    continue
                except Exception as exc:  # database briefly away: the gate closes by itself
                    log.warning("heartbeat of job %d failed: %s", job_id, exc)
                    continue
                self.gate.hold.remote(job_id, self.valid_for_s)


def _import_ray(local: bool) -> Any:
    """Import Ray; for a Ray started here, first make it bind its servers to 127.0.0.1."""
    if local and "ray" not in sys.modules:
        # Ray binds its servers to the node's address, found from the network; in its
        # single-machine mode it takes the loopback address instead (read at import).
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    return ray


class RayExecutor:
    """Runs claimed jobs as Ray tasks and fans factorization out over the cluster.

    Args:
        address: ``auto`` (a cluster started with ``ray start`` on this host), ``ray://host:port``
            (Ray Client, e.g. a KubeRay head), or None/empty: a local Ray started here (all
            cores, no dashboard, servers on 127.0.0.1). A process already connected to Ray
            (``ray.init`` called before, as the tests do) keeps that connection.
        max_retries: Ray's retries of a task whose worker or node died.
        transfer_gpus: GPUs per transfer task (0: transfers run on the CPU; the GPUs go to
            factorization; their factors come from the cache).
        cpus_per_task: CPUs (and torch threads) per factorization task.
        tasks_per_worker: factorization tasks per worker slot (smaller tasks balance better).
    """

    _shared: ClassVar[dict[str, RayExecutor]] = {}
    _shared_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(
        self,
        address: str | None = None,
        *,
        max_retries: int = 3,
        transfer_gpus: float = 0.0,
        cpus_per_task: int = 1,
        tasks_per_worker: int = 2,
    ) -> None:
        self.address = address or None
        self.max_retries = max_retries
        self.transfer_gpus = transfer_gpus
        self.cpus_per_task = cpus_per_task
        self.tasks_per_worker = tasks_per_worker
        self._gate: Any = None
        self._started_ray = False
        self._lock = threading.Lock()

    @classmethod
    def shared(cls, settings: Settings) -> RayExecutor:
        """The process's executor for ``settings.ray_address`` (it connects on first use)."""
        key = settings.ray_address or ""
        with cls._shared_lock:
            if key not in cls._shared:
                cls._shared[key] = cls(
                    settings.ray_address,
                    max_retries=settings.ray_max_retries,
                    cpus_per_task=settings.ray_cpus_per_task,
                )
            return cls._shared[key]

    @classmethod
    def close_shared(cls) -> None:
        """Close every shared executor (tests; a daemon simply exits)."""
        with cls._shared_lock:
            executors, cls._shared = list(cls._shared.values()), {}
        for executor in executors:
            executor.close()

    def connect(self) -> Any:
        """Connect to (or start) Ray once; create the lease gate. Returns the ``ray`` module."""
        ray = _import_ray(local=self.address is None)
        with self._lock:
            if not ray.is_initialized():
                if self.address is None:
                    ray.init(include_dashboard=False, namespace=_NAMESPACE)
                    self._started_ray = True
                else:
                    ray.init(address=self.address, namespace=_NAMESPACE)
                log.info("connected to Ray: %s", ray.cluster_resources())
            if self._gate is None:
                _, _, gate = _remote()
                self._gate = gate.options(num_cpus=0, max_restarts=-1, max_task_retries=-1).remote()
        return ray

    def close(self) -> None:
        """Stop the lease gate; shut Ray down if this executor started it."""
        ray = sys.modules.get("ray")
        if ray is None or not ray.is_initialized():
            return
        if self._gate is not None:
            ray.kill(self._gate)
            self._gate = None
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False

    def uses_gpus(self, settings: Settings) -> bool:
        """Whether factorization tasks ask a GPU each: ``device=cuda``, or ``auto`` on a
        cluster that has GPUs (the daemon itself may then stay CPU-only with ``auto``)."""
        if settings.device is Device.CUDA:
            return True
        ray = self.connect()
        return settings.device is Device.AUTO and ray.cluster_resources().get("GPU", 0) > 0

    def parallelism(self, settings: Settings) -> int:
        """Factorization slots of the cluster: its GPUs when tasks ask one, else CPU slots."""
        ray = self.connect()
        resources = ray.cluster_resources()
        if self.uses_gpus(settings):
            return max(1, int(resources.get("GPU", 1)))
        return max(1, int(resources.get("CPU", 1) // self.cpus_per_task))

    # --- factorization ------------------------------------------------------------------
    def prefetch(self, ctx: Context, bases: Sequence[ModelVersionInfo]) -> None:
        """Factorize the bases' uncached modules on the cluster, into the shared cache.

        Bad weights raise the task's InputError (as the local factorization would); any other
        failure is logged and left to the assessment, which factorizes what is missing itself.
        """
        parallelism = self.parallelism(ctx.settings)
        groups = [
            group
            for info in bases
            for group in factor_groups(
                ctx.workspace.base(info),
                parallelism=parallelism,
                version=info,
                tasks_per_worker=self.tasks_per_worker,
            )
        ]
        if not groups:
            return
        started = time.perf_counter()
        try:
            reports = factorize_on_ray(
                ctx.settings,
                groups,
                gpu=self.uses_gpus(ctx.settings),
                max_retries=self.max_retries,
                cpus_per_task=self.cpus_per_task,
            )
        except InputError:
            raise
        except Exception as exc:
            log.warning("factorization on Ray failed, the assessment does the rest: %s", exc)
            return
        computed = sum(r.computed for r in reports)
        labels = ", ".join(sorted({g.label for g in groups}))
        ctx.say(
            f"factorized {computed} modules of {labels} on Ray in {len(groups)} tasks "
            f"({time.perf_counter() - started:.1f}s, {parallelism} slots)"
        )

    # --- transfers ----------------------------------------------------------------------
    def run(self, ctx: Context, job_ids: Sequence[int]) -> list[JobOutcome]:
        """Submit every claimed job as a Ray task, keep its lease, record how it ended.

        A stop requested before submission releases the jobs; once submitted, the batch is
        waited for (a killed daemon leaves its jobs to lease expiry: nothing is lost).
        """
        if ctx.stop.requested:
            return release_jobs(ctx, job_ids)
        _check_registry(ctx)
        ray = self.connect()
        transfer, _, _ = _remote()
        gpus = self.transfer_gpus
        # Without a GPU of its own a task must not touch one (the factorization tasks hold them).
        shipped = worker_settings(ctx.settings, device=None if gpus else Device.CPU)
        env = {k: os.environ[k] for k in _FORWARDED_ENV if os.environ.get(k)}
        options: dict[str, Any] = {
            "num_cpus": 1,
            "num_gpus": gpus,
            "max_retries": self.max_retries,
            "retry_exceptions": False,
        }
        if env:
            options["runtime_env"] = {"env_vars": env}
        requests = {job_id: load_request(ctx, job_id) for job_id in job_ids}
        outcomes: list[JobOutcome] = []
        pending: dict[Any, int] = {}
        started: dict[int, float] = {}
        cancelled: set[int] = set()
        with _RemoteLeases(ctx, self._gate) as leases:
            try:
                for job_id, request in requests.items():
                    if not leases.hold(job_id):
                        outcomes.append(JobOutcome(job_id, "lease_lost", leases.lost[job_id]))
                        continue
                    ref = transfer.options(name=f"transfer job {job_id}", **options).remote(
                        shipped, request, self._gate
                    )
                    pending[ref] = job_id
                    started[job_id] = time.perf_counter()
                while pending:
                    ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
                    for ref in ready:
                        job_id = pending.pop(ref)
                        leases.drop(job_id)
                        outcomes.append(_finish(ctx, requests[job_id], ref, started[job_id]))
                    for ref, job_id in pending.items():
                        if job_id in leases.lost and job_id not in cancelled:
                            ray.cancel(ref, force=True)  # reclaimed: stop the work
                            cancelled.add(job_id)
            finally:
                for ref in pending:  # only on an error here: the leases expire, jobs return
                    ray.cancel(ref)
        return outcomes


def _check_registry(ctx: Context) -> None:
    """Workers build their registry from the settings: it must be the daemon's."""
    from migrator.registry.mlflow_registry import MlflowRegistry

    s, registry = ctx.settings, ctx.registry
    if not (
        isinstance(registry, MlflowRegistry)
        and registry.tracking_uri == s.tracking
        and registry.registry_uri == s.registry
    ):
        raise RuntimeError(
            "the Ray executor needs the registry named by the settings (tracking_uri / "
            f"registry_uri), which workers connect to; this daemon uses {registry!r}"
        )


def _finish(ctx: Context, request: TransferRequest, ref: Any, started: float) -> JobOutcome:
    """Record how one transfer task ended (in the daemon, under the job's lease)."""
    import ray
    from ray.exceptions import TaskCancelledError

    job_id = request.job_id
    try:
        done: TransferDone = ray.get(ref)
    except TaskCancelledError:
        return JobOutcome(job_id, "lease_lost", "lease lost while running remotely: cancelled")
    except Exception as exc:
        try:
            return record_failure(ctx, request, _cause(exc))
        except LeaseLostError as lost:
            return JobOutcome(job_id, "lease_lost", str(lost))
    try:
        outcome = record_success(ctx, request, done)
    except LeaseLostError as exc:
        log.warning("job %d: lease lost, leaving it to its new owner (%s)", job_id, exc)
        return JobOutcome(job_id, "lease_lost", str(exc))
    ctx.say(
        f"job {job_id}: {request.adapter} -> {done.version} on {request.target} "
        f"in {time.perf_counter() - started:.1f}s on Ray"
        + (" (found registered)" if done.reused else "")
    )
    return outcome
