"""Run the heavy work on a Ray cluster (``MIGRATOR_EXECUTOR=ray``); the job database stays here.

This module is the daemon's side, a thin adapter: what runs on the workers is
:mod:`migrator.executors.ray_tasks`, the shipped settings :mod:`migrator.executors.shipping`, the
cutting of factorizations into tasks :mod:`migrator.executors.factor_plan`, and leases are kept
by the pipeline's :class:`~migrator.pipeline.lease_keeper.LeaseKeeper`, as for local jobs.

- **The daemon** (this process, the Ray driver) claims jobs, keeps their leases alive while they
  run remotely (one heartbeat thread for the batch), and records how each ended
  (:func:`~migrator.pipeline.execution.settle`). The settings it
  ships carry no database URL and no webhook secret: workers never touch the job database.
- **A transfer task** per claimed job runs
  :func:`~migrator.pipeline.transfer_job.perform_transfer` on a worker, with a registry client
  and a workspace built there from the settings, and returns the small
  :class:`~migrator.pipeline.transfer_job.TransferDone`.
- **Factorization tasks** (:func:`factorize_on_ray`) split a base by shape group (one GPU each
  where ``device=cuda``, or ``auto`` on a cluster with GPUs), write the factors into the
  factorization cache, which every worker and the daemon reach at the same path (a shared
  volume: the cache is content-addressed and written atomically), and return a
  :class:`~migrator.executors.ray_tasks.GroupReport`, never tensors. The planner calls
  :meth:`RayExecutor.prefetch` before it assesses a base pair, so each base is factorized once
  cluster-wide and the assessment, then every transfer, reads the factors from the cache.

Retries: a task whose worker or node dies is retried by Ray (``max_retries``); an exception the
task raises comes back at once (``retry_exceptions=False``) and is the job's failure, retried by
the job's own policy (backoff, ``max_attempts``), or not at all for bad input. Registration is
idempotent by the job's tag, so a retried task finds a version its killed predecessor
registered instead of registering a second one.

Publishing under a lease: before it writes to the registry, a task asks a small actor owned by
the daemon (:class:`~migrator.executors.ray_tasks.LeaseGate`) whether the daemon still holds the job's
lease. The daemon opens the gate for ``lease_s / 2`` after each successful renewal and closes it
when the lease is lost, so work whose job was reclaimed by another replica is not published (the
local executor renews the lease at that point instead).
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from core.errors import InputError
from db import LeaseLostError
from migrator.executors.factor_plan import factor_groups
from migrator.executors.ray_runtime import (
    RemoteTaskLostError,
    factorize_on_ray,
    import_ray,
    remote,
    task_cause,
)
from migrator.executors.ray_tasks import GATE_TIMEOUT_S
from migrator.executors.shipping import FORWARDED_ENV, worker_settings
from migrator.pipeline.execution import load_request, settle
from migrator.pipeline.executor import JobOutcome, OutcomeStatus, release_jobs
from migrator.pipeline.lease_keeper import LeaseKeeper
from migrator.pipeline.transfer_job import TransferDone, TransferRequest
from migrator.registry import ModelVersionInfo
from migrator.settings import Device, Settings

if TYPE_CHECKING:
    from migrator.pipeline.context import Context

__all__ = ["RayExecutor", "RemoteTaskLostError"]

log = logging.getLogger(__name__)

_NAMESPACE = "lorax-migrator"


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
        ray = import_ray(local=self.address is None)
        with self._lock:
            if not ray.is_initialized():
                if self.address is None:
                    ray.init(include_dashboard=False, namespace=_NAMESPACE)
                    self._started_ray = True
                else:
                    ray.init(address=self.address, namespace=_NAMESPACE)
                log.info("connected to Ray: %s", ray.cluster_resources())
            if self._gate is None:
                _, _, gate = remote()
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
        transfer, options = remote()[0], self._transfer_options()
        # Without a GPU of its own a task must not touch one (the factorization tasks hold them).
        shipped = worker_settings(ctx.settings, device=None if self.transfer_gpus else Device.CPU)
        requests = {job_id: load_request(ctx, job_id) for job_id in job_ids}
        outcomes: list[JobOutcome] = []
        pending: dict[Any, int] = {}
        started: dict[int, float] = {}
        gate, valid_for_s = self._gate, ctx.settings.lease_s / 2
        with LeaseKeeper(
            ctx,
            on_renewed=lambda job_id: gate.hold.remote(job_id, valid_for_s),
            on_closed=lambda job_id: gate.release.remote(job_id),
        ) as leases:
            try:
                for job_id, request in requests.items():
                    if not leases.hold([job_id]):
                        lost = leases.lost[job_id]
                        outcomes.append(JobOutcome(job_id, OutcomeStatus.LEASE_LOST, lost))
                        continue
                    # the gate is open before the task can ask it
                    ray.get(gate.hold.remote(job_id, valid_for_s), timeout=GATE_TIMEOUT_S)
                    ref = transfer.options(name=f"transfer job {job_id}", **options).remote(
                        shipped, request, gate
                    )
                    pending[ref] = job_id
                    started[job_id] = time.perf_counter()
                outcomes += _wait_for(ctx, requests, pending, started, leases)
            finally:
                for ref in pending:  # only on an error here: the leases expire, jobs return
                    ray.cancel(ref)
        return outcomes

    def _transfer_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {
            "num_cpus": 1,
            "num_gpus": self.transfer_gpus,
            "max_retries": self.max_retries,
            "retry_exceptions": False,
        }
        env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
        if env:
            options["runtime_env"] = {"env_vars": env}
        return options


def _wait_for(
    ctx: Context,
    requests: dict[int, TransferRequest],
    pending: dict[Any, int],
    started: dict[int, float],
    leases: LeaseKeeper,
) -> list[JobOutcome]:
    """Collect submitted tasks as they end (``pending`` empties); a task whose job's lease was
    lost meanwhile is cancelled."""
    import ray

    outcomes: list[JobOutcome] = []
    cancelled: set[int] = set()
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
        for ref in ready:
            job_id = pending.pop(ref)
            leases.drop(job_id)
            work = functools.partial(_collect, requests[job_id], ref)
            outcome = settle(ctx, requests[job_id], work, started=started[job_id], where=" on Ray")
            outcomes.append(outcome)
        for ref, job_id in pending.items():
            if job_id in leases.lost and job_id not in cancelled:
                ray.cancel(ref, force=True)  # reclaimed: stop the work
                cancelled.add(job_id)
    return outcomes


def _check_registry(ctx: Context) -> None:
    """Workers build their registry from the settings: it must be the daemon's."""
    s = ctx.settings
    if ctx.registry.address() != (s.tracking_uri, s.registry_uri):
        raise RuntimeError(
            "the Ray executor needs the registry named by the settings (tracking_uri / "
            f"registry_uri), which workers connect to; this daemon uses {ctx.registry!r}"
        )


def _collect(request: TransferRequest, ref: Any) -> TransferDone:
    """The result of a transfer task: the task's own exception, or LeaseLostError when the task
    was cancelled because the job's lease was lost."""
    import ray
    from ray.exceptions import TaskCancelledError

    try:
        done: TransferDone = ray.get(ref)
    except TaskCancelledError:
        raise LeaseLostError(request.job_id, "ray", "cancelled", None) from None
    except Exception as exc:
        raise task_cause(exc) from None
    return done
