"""Talking to Ray from the daemon: the remote wrappers of the worker tasks, connecting (a local
Ray binds 127.0.0.1), unwrapping task errors, and running factorization tasks."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Sequence
from typing import Any

from migrator.executors.factor_plan import FactorGroup
from migrator.executors.ray_tasks import GroupReport, LeaseGate, factorize_task, transfer_task
from migrator.executors.shipping import worker_settings
from migrator.settings import Device, Settings

__all__ = [
    "RemoteTaskLostError",
    "factorize_on_ray",
    "factorize_options",
    "import_ray",
    "remote",
    "task_cause",
]


class RemoteTaskLostError(RuntimeError):
    """A task's worker or node was lost more often than Ray retries it (``max_retries``)."""


@functools.cache
def remote() -> tuple[Any, Any, Any]:
    """The Ray wrappers of the tasks and of the gate (built once, after Ray is imported)."""
    import ray

    return ray.remote(transfer_task), ray.remote(factorize_task), ray.remote(LeaseGate)


def task_cause(exc: BaseException) -> BaseException:
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

    _, factorize, _ = remote()
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
        raise task_cause(exc) from None


def import_ray(local: bool) -> Any:
    """Import Ray; for a Ray started here, first make it bind its servers to 127.0.0.1."""
    if local and "ray" not in sys.modules:
        # Ray binds its servers to the node's address, found from the network; in its
        # single-machine mode it takes the loopback address instead (read at import).
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    return ray
