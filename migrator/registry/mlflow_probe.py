"""Which model versions changed since a time, asked of MLflow without loading MLflow.

``import mlflow`` and its SQL store take 2-4 s on a loaded 2-core machine, more than a pass
that finds nothing new needs in all. That pass asks one thing of the registry: which versions
were created or updated since the last pass. Two sources answer it in milliseconds:

- a database store (``sqlite:``, ``postgresql:``, ``mysql:``, ``mssql:`` URIs): MLflow's own
  ``model_versions`` table, read-only (``name``, ``version``, ``last_updated_time``; versions
  deleted, ``current_stage = 'Deleted_Internal'``, left out as MLflow's search leaves them);
- a tracking server (``http(s):``): the public REST endpoint
  ``GET /api/2.0/mlflow/model-versions/search`` ordered by ``last_updated_timestamp DESC``,
  read until a version older than the time (only when no credentials or TLS settings are
  configured: those stay MLflow's to apply).

Anything else (another scheme, credentials) has no probe and MLflow's client answers. A probe
is a shortcut with one fallback: when it fails, the caller asks MLflow's client, which says
the same (a test keeps the two equal on a real store).
"""

from __future__ import annotations

import json
import os
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from migrator.registry.base import VersionStamp

__all__ = ["DatabaseProbe", "RestProbe", "probe_for"]

Probe = Callable[[int], list[VersionStamp]]

_DATABASES = ("sqlite", "postgresql", "mysql", "mssql")  # MLflow's database stores
_DELETED = "Deleted_Internal"  # mlflow.entities.model_registry.model_version_stages
#: MLflow settings that change how it reaches a server: with any of them, MLflow's client.
_CLIENT_SETTINGS = (
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_AUTH",
    "MLFLOW_TRACKING_AWS_SIGV4",
    "MLFLOW_TRACKING_INSECURE_TLS",
    "MLFLOW_TRACKING_CLIENT_CERT_PATH",
    "MLFLOW_TRACKING_SERVER_CERT_PATH",
)


def probe_for(registry_uri: str) -> Probe | None:
    """The probe of a registry URI, or None when MLflow's client must answer."""
    scheme = urllib.parse.urlsplit(registry_uri).scheme.split("+")[0].lower()
    if scheme in _DATABASES:
        return DatabaseProbe(registry_uri)
    if scheme in ("http", "https") and not _credentials_configured():
        return RestProbe(registry_uri)
    return None


def _credentials_configured() -> bool:
    if any(os.environ.get(name) for name in _CLIENT_SETTINGS):
        return True
    return (Path.home() / ".mlflow" / "credentials").exists()


class DatabaseProbe:
    """Changed versions from the ``model_versions`` table of MLflow's database store."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._engine: Any = None

    def __call__(self, since_ms: int) -> list[VersionStamp]:
        from sqlalchemy import create_engine, text
        from sqlalchemy.pool import NullPool

        if self._engine is None:  # no pool: the probe holds no connection between passes
            self._engine = create_engine(self.uri, poolclass=NullPool)
        query = text(
            "SELECT name, version, last_updated_time FROM model_versions "
            "WHERE last_updated_time >= :since "
            "AND (current_stage IS NULL OR current_stage <> :deleted) "
            "ORDER BY last_updated_time DESC, name, version DESC"
        )
        with self._engine.connect() as connection:
            rows = connection.execute(query, {"since": since_ms, "deleted": _DELETED})
            return [VersionStamp(str(n), str(v), int(t)) for n, v, t in rows]


class RestProbe:
    """Changed versions from a tracking server's REST API (no credentials)."""

    def __init__(self, uri: str, *, page_size: int = 1000) -> None:
        self.endpoint = uri.rstrip("/") + "/api/2.0/mlflow/model-versions/search"
        self.page_size = page_size
        self.timeout_s = float(os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT") or 30)

    def _page(self, token: str | None) -> dict[str, Any]:
        params = {"max_results": str(self.page_size), "order_by": "last_updated_timestamp DESC"}
        if token:
            params["page_token"] = token
        url = f"{self.endpoint}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=self.timeout_s) as reply:
            document: dict[str, Any] = json.loads(reply.read())
            return document

    def __call__(self, since_ms: int) -> list[VersionStamp]:
        out: list[VersionStamp] = []
        token: str | None = None
        while True:
            page = self._page(token)
            for mv in page.get("model_versions", []):
                stamp = VersionStamp(
                    str(mv["name"]), str(mv["version"]), int(mv.get("last_updated_timestamp", 0))
                )
                if stamp.updated_ms < since_ms:
                    return out
                out.append(stamp)
            token = page.get("next_page_token")
            if not token:
                return out
