"""The :class:`~migrator.registry.pages.RegistryPages` calls on MLflow, mixed into
:class:`~migrator.registry.mlflow_registry.MlflowRegistry` (its ``client``, ``_call`` and
``_experiment_id``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, TypeVar

from migrator.registry.base import VersionRef
from migrator.registry.mlflow_watch import model_info
from migrator.registry.pages import RegisteredModelInfo

__all__ = ["EXPERIMENT_KIND", "MlflowPages"]

T = TypeVar("T")

#: The experiment tag the MLflow UI reads to choose its layout; without it, an experiment
#: without traces opens on the GenAI overview.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


class MlflowPages:
    """Descriptions, model tags and aliases through ``MlflowClient``."""

    client: Any
    _call: Callable[..., Any]
    _experiment_id: Callable[[str], str]

    def list_models(self) -> list[RegisteredModelInfo]:
        out: list[RegisteredModelInfo] = []
        token: str | None = None
        while True:
            page = self._call(
                "search registered models",
                partial(self.client.search_registered_models, max_results=1000, page_token=token),
            )
            out.extend(model_info(m) for m in page)
            token = page.token
            if not token:
                return out

    def set_version_description(self, ref: VersionRef, description: str) -> None:
        self._call(
            f"describe {ref}",
            partial(
                self.client.update_model_version, ref.name, ref.version, description=description
            ),
        )

    def set_model_description(self, name: str, description: str) -> None:
        self._call(
            f"describe model {name}",
            partial(self.client.update_registered_model, name, description=description),
        )

    def set_model_tags(self, name: str, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            self._call(
                f"set tag {key} on model {name}",
                partial(self.client.set_registered_model_tag, name, key, value),
            )

    def set_alias(self, name: str, alias: str, version: str) -> None:
        self._call(
            f"set alias @{alias} of {name}",
            partial(self.client.set_registered_model_alias, name, alias, version),
        )

    def delete_alias(self, name: str, alias: str) -> None:
        self._call(
            f"delete alias @{alias} of {name}",
            partial(self.client.delete_registered_model_alias, name, alias),
        )

    def prepare_experiment(self, name: str) -> None:
        exp_id = self._experiment_id(name)
        exp = self._call(f"get experiment {name}", partial(self.client.get_experiment, exp_id))
        key, value = EXPERIMENT_KIND
        if (exp.tags or {}).get(key) is None:
            self._call(
                f"tag experiment {name}",
                partial(self.client.set_experiment_tag, exp_id, key, value),
            )
