"""Where claimed jobs run, chosen by name (``MIGRATOR_EXECUTOR``): each executor implements the
pipeline's :class:`~migrator.pipeline.executor.Executor` protocol.

| name | module | runs jobs |
|---|---|---|
| ``local`` | :mod:`migrator.executors.local` | one after the other in this process |
| ``ray`` | :mod:`migrator.executors.ray_executor` | as Ray tasks; factorizations fanned out |
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType

from migrator.pipeline.executor import Executor
from migrator.settings import ExecutorKind, Settings

__all__ = ["EXECUTORS", "executor_for"]


def _local(settings: Settings) -> Executor:
    from migrator.executors.local import LocalExecutor

    return LocalExecutor()


def _ray(settings: Settings) -> Executor:
    from migrator.executors.ray_executor import RayExecutor  # Ray is imported on first use

    return RayExecutor.shared(settings)


#: Executor name -> how to build it from the settings.
EXECUTORS: Mapping[ExecutorKind, Callable[[Settings], Executor]] = MappingProxyType(
    {ExecutorKind.LOCAL: _local, ExecutorKind.RAY: _ray}
)


def executor_for(settings: Settings) -> Executor:
    """The executor ``settings.executor`` names."""
    return EXECUTORS[settings.executor](settings)
