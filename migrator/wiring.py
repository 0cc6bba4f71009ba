"""Building a pass's context from the settings: the registry, the job database, the workspace
and the executor the settings name. The CLI, the daemon, the demo and the tests start here."""

from __future__ import annotations

from db import make_engine, make_session_factory
from migrator.database import ensure_sqlite_parent
from migrator.executors import executor_for
from migrator.pipeline.context import Context, Workspace
from migrator.pipeline.executor import Executor
from migrator.registry import Registry
from migrator.settings import Settings

__all__ = ["build_context"]


def build_context(
    settings: Settings, registry: Registry | None = None, *, executor: Executor | None = None
) -> Context:
    """A context for passes under ``settings`` (engine, registry client and executor made once).

    Args:
        registry: default: the MLflow registry the settings name.
        executor: default: the one ``settings.executor`` names.
    """
    if registry is None:
        from migrator.registry.mlflow_registry import MlflowRegistry

        registry = MlflowRegistry.from_settings(settings)
    url = settings.database_url.get_secret_value()
    ensure_sqlite_parent(url)
    engine = make_engine(url)
    return Context(
        settings=settings,
        registry=registry,
        engine=engine,
        sessions=make_session_factory(engine),
        workspace=Workspace(settings, registry),
        executor=executor if executor is not None else executor_for(settings),
    )
