"""What the watcher asks of MLflow beyond a full listing, mixed into
:class:`~migrator.registry.mlflow_registry.MlflowRegistry` (its ``client``, ``_call``,
``_search`` and ``_probe``): the versions of named registered models, the versions changed
since a time, and the registered models named.

MLflow's search (3.17, ``SearchModelVersionUtils`` and the SQL store) filters versions on
``name`` (``=``, ``LIKE``, ``IN``), ``version_number``, ``run_id``, ``source_path`` and tags
joined by ``AND``; it cannot filter on update times but orders by them
(``last_updated_timestamp DESC``), so "changed since" is read newest first until an older one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from functools import partial
from typing import Any, TypeVar

from migrator.registry.base import ModelVersionInfo, RegistryError, Tag, VersionStamp
from migrator.registry.mlflow_errors import first_line
from migrator.registry.pages import RegisteredModelInfo

__all__ = ["MlflowWatch", "in_chunks", "name_list", "quote_value", "tag_clauses"]

T = TypeVar("T")
log = logging.getLogger(__name__)

#: Names per ``name IN (...)`` filter: each is a bound parameter of the store's query.
CHUNK = 100


def quote_value(value: str) -> str:
    """``value`` as a quoted filter value.

    Raises:
        RegistryError: it holds a quote, which MLflow's filter syntax cannot escape.
    """
    if "'" in value:
        raise RegistryError(f"registry filter values may not contain a quote: {value!r}")
    return f"'{value}'"


def tag_clauses(tags: Mapping[str, str]) -> list[str]:
    """One ``tags.`k` = 'v'`` clause per tag."""
    return [f"tags.`{k}` = {quote_value(v)}" for k, v in tags.items()]


def name_list(names: Sequence[str]) -> str:
    """``('a', 'b')`` for a ``name IN`` filter."""
    return "(" + ", ".join(quote_value(n) for n in names) + ")"


def in_chunks(names: Sequence[str], size: int = CHUNK) -> Iterator[Sequence[str]]:
    for i in range(0, len(names), size):
        yield names[i : i + size]


class MlflowWatch:
    """Incremental reads through ``MlflowClient`` (and the probe, which needs no MLflow)."""

    client: Any
    _call: Callable[..., Any]
    _search: Callable[[str | None], list[ModelVersionInfo]]
    _probe: Callable[[int], list[VersionStamp]] | None

    def list_model_versions(
        self, names: Collection[str], *, role: str | None = None
    ) -> list[ModelVersionInfo]:
        tags = tag_clauses({Tag.ROLE: role} if role is not None else {})
        out: list[ModelVersionInfo] = []
        for chunk in in_chunks(sorted(set(names))):
            out += self._search(" AND ".join([f"name IN {name_list(chunk)}", *tags]))
        return out

    def changed_since(self, since_ms: int) -> list[VersionStamp]:
        if self._probe is not None:
            try:
                return self._probe(since_ms)
            except Exception as exc:  # the probe is a shortcut: the client answers the same
                log.warning("registry probe failed (%s); asking MLflow", first_line(exc))
        return list(self._call("list changed versions", partial(self._changed_pages, since_ms)))

    def _changed_pages(self, since_ms: int) -> list[VersionStamp]:
        """Versions by update time, newest first, until one older than ``since_ms``."""
        out: list[VersionStamp] = []
        token: str | None = None
        while True:
            page = self.client.search_model_versions(
                max_results=1000, order_by=["last_updated_timestamp DESC"], page_token=token
            )
            for mv in page:
                stamp = VersionStamp(mv.name, str(mv.version), int(mv.last_updated_timestamp or 0))
                if stamp.updated_ms < since_ms:
                    return out
                out.append(stamp)
            token = page.token
            if not token:
                return out

    def find_models(self, names: Collection[str]) -> list[RegisteredModelInfo]:
        out: list[RegisteredModelInfo] = []
        for chunk in in_chunks(sorted(set(names))):
            page = self._call(
                "search registered models by name",
                partial(
                    self.client.search_registered_models,
                    filter_string=f"name IN {name_list(chunk)}",
                    max_results=len(chunk),
                ),
            )
            out += [model_info(m) for m in page]
        return out


def model_info(model: Any) -> RegisteredModelInfo:
    """What the service reads of an MLflow ``RegisteredModel``."""
    return RegisteredModelInfo(
        name=model.name,
        description=model.description or "",
        tags=dict(model.tags or {}),
        aliases={str(k): str(v) for k, v in (model.aliases or {}).items()},
    )
