"""The settings a remote worker runs with: what the daemon ships, and what a node changes.

The daemon ships its settings with absolute paths and URIs, without the job database URL and
without the webhook secret (workers never touch either); a node whose mounts differ sets
``MIGRATOR_WORKER_CACHE_DIR`` / ``MIGRATOR_WORKER_SCRATCH_DIR`` in its own environment.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import SecretStr

from migrator.pipeline.context import CRASH_ENV
from migrator.settings import Device, Settings

__all__ = [
    "FORWARDED_ENV",
    "WORKER_CACHE_ENV",
    "WORKER_SCRATCH_ENV",
    "absolute_sqlite",
    "node_settings",
    "worker_settings",
]

#: On a worker, where the shared factorization cache is mounted when not at the daemon's path.
WORKER_CACHE_ENV = "MIGRATOR_WORKER_CACHE_DIR"
#: On a worker, its local scratch folder when not at the daemon's path.
WORKER_SCRATCH_ENV = "MIGRATOR_WORKER_SCRATCH_DIR"
#: Test hooks forwarded to tasks (see :func:`migrator.pipeline.context.crash_point`).
FORWARDED_ENV = (CRASH_ENV, "MIGRATOR_CRASH_MARKER")


def absolute_sqlite(uri: str) -> str:
    """A relative ``sqlite:///`` URI made absolute (workers may start elsewhere)."""
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
            "cache_dir": settings.cache_dir.resolve(),
            "scratch_dir": settings.scratch_dir.resolve(),
            "tracking_uri": absolute_sqlite(settings.tracking_uri),
            "registry_uri": absolute_sqlite(settings.registry_uri),
            "database_url": SecretStr(""),
            "webhook_secret": None,
            "device": settings.device if device is None else device,
        }
    )


def node_settings(settings: Settings) -> Settings:
    """On a worker: the shipped settings with this node's own mount points, where it sets them."""
    updates: dict[str, Path] = {}
    cache = os.environ.get(WORKER_CACHE_ENV) or settings.worker_cache_dir
    scratch = os.environ.get(WORKER_SCRATCH_ENV) or settings.worker_scratch_dir
    if cache:
        updates["cache_dir"] = Path(cache)
    if scratch:
        updates["scratch_dir"] = Path(scratch)
    return settings.model_copy(update=updates) if updates else settings
