"""What a person sees of the registry beyond tags: descriptions of versions and registered
models, model-level tags, and aliases. A registry that offers these (MLflow, the in-memory one)
gets the lineage written where the MLflow UI shows it; one that does not is left alone.

Approval aliases (one per job, on the adapter's registered model):

- ``lorax-pending-<job>`` on the source adapter version of a transfer waiting for approval;
- ``lorax-approved-<job>`` on the source version once the transfer is approved, moved to the
  transferred version when it is registered. An admin who sets it in the UI (on any version of
  that adapter) approves job ``<job>``: the next pass records it with an audit row naming the
  alias.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from migrator.registry.base import VersionRef

__all__ = ["Alias", "RegisteredModelInfo", "RegistryPages"]


class Alias:
    """The approval aliases (fixed names: the README documents them)."""

    PENDING = "lorax-pending-"
    APPROVED = "lorax-approved-"
    _JOB = re.compile(r"^lorax-(pending|approved)-(\d+)$")

    @staticmethod
    def pending(job_id: int) -> str:
        return f"{Alias.PENDING}{job_id}"

    @staticmethod
    def approved(job_id: int) -> str:
        return f"{Alias.APPROVED}{job_id}"

    @staticmethod
    def parse(alias: str) -> tuple[str, int] | None:
        """(``pending`` | ``approved``, job id) of an approval alias; None for any other."""
        found = Alias._JOB.match(alias)
        return None if found is None else (found.group(1), int(found.group(2)))


@dataclass(frozen=True)
class RegisteredModelInfo:
    """A registered model: its description, model-level tags and aliases (alias -> version)."""

    name: str
    description: str = ""
    tags: Mapping[str, str] = field(default_factory=dict)
    aliases: Mapping[str, str] = field(default_factory=dict)


@runtime_checkable
class RegistryPages(Protocol):
    """The registry calls that write what the UI shows."""

    def list_models(self) -> list[RegisteredModelInfo]:
        """Every registered model, with its description, tags and aliases."""
        ...

    def find_models(self, names: Collection[str]) -> list[RegisteredModelInfo]:
        """The registered models ``names`` that exist, with descriptions, tags and aliases."""
        ...

    def set_version_description(self, ref: VersionRef, description: str) -> None: ...

    def set_model_description(self, name: str, description: str) -> None: ...

    def set_model_tags(self, name: str, tags: Mapping[str, str]) -> None: ...

    def set_alias(self, name: str, alias: str, version: str) -> None:
        """Point ``alias`` of model ``name`` at ``version`` (moving it if it exists)."""
        ...

    def delete_alias(self, name: str, alias: str) -> None: ...

    def prepare_experiment(self, name: str) -> None:
        """Make the migration experiment open as a model-development one (not GenAI)."""
        ...
