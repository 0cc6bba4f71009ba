"""The registry seam: what the migrator needs from a model registry, as a small Protocol.

The MLflow implementation is :mod:`migrator.registry.mlflow_registry`; an in-memory one for unit
tests is :mod:`migrator.registry.memory`. Both follow the registry conventions: ``lorax.*`` tags
on model versions, weights and adapter files as the versions' artifacts.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

__all__ = [
    "TRANSFER_IDENTITY",
    "ModelVersionInfo",
    "Registry",
    "RegistryError",
    "RegistryUnavailableError",
    "RunInfo",
    "Tag",
    "VersionNotFoundError",
    "VersionRef",
    "VersionStamp",
]


class Tag:
    """The ``lorax.*`` tag keys (fixed names: checks outside the project read them)."""

    ROLE = "lorax.role"  # base | adapter
    BASE = "lorax.base"  # adapter: name/version of its base
    FORMAT = "lorax.format"  # adapter: lorax-compact | lorax | lora
    WEIGHTS_PATH = "lorax.weights_path"  # base: sub-folder of the artifacts holding the weights
    SUPERSEDES = "lorax.supersedes"  # base: name/version[,...] of other predecessors
    DEPRECATED = "lorax.deprecated"  # base: "true" once a successor is processed
    SUPERSEDED_BY = "lorax.superseded_by"  # base: name/version of the successor
    TRANSFERRED_FROM = "lorax.transferred_from"  # adapter: name/version it was transferred from
    JOB = "lorax.job"  # adapter/run: the job id; makes registration idempotent
    ATC = "lorax.atc"  # adapter: ATC of the transfer
    APPROVED_BY = "lorax.approved_by"  # adapter: who approved (or "policy")
    MODE = "lorax.mode"  # adapter: transfer mode
    ENERGY = "lorax.energy_retained"  # adapter: energy retained
    # adapter: set by the reconciler on a version that doubles another (same lineage, source
    # and target): name/version of the one kept; the service ignores the tagged version.
    DUPLICATE_OF = "lorax.duplicate_of"


#: The tags that identify a transferred version: a second version with the same values is a
#: duplicate (the registry may commit a create whose reply is lost, or two job databases may
#: share the registry).
TRANSFER_IDENTITY = (Tag.TRANSFERRED_FROM, Tag.BASE)


ROLE_BASE = "base"
ROLE_ADAPTER = "adapter"


@dataclass(frozen=True, order=True)
class VersionRef:
    """A registered model version, written ``name/version``."""

    name: str
    version: str

    def __str__(self) -> str:
        return f"{self.name}/{self.version}"

    @classmethod
    def parse(cls, text: str) -> VersionRef:
        """Parse ``name/version`` (the name may itself contain ``/``; the version is last).

        Raises:
            ValueError: not of that form.
        """
        text = text.strip()
        if text.startswith("models:/"):
            text = text[len("models:/") :]
        name, sep, version = text.rpartition("/")
        if not sep or not name or not version.isdigit():
            raise ValueError(f"not a model version reference (name/version): {text!r}")
        return cls(name, version)


@dataclass(frozen=True)
class ModelVersionInfo:
    """What the migrator reads of a model version."""

    name: str
    version: str
    tags: Mapping[str, str] = field(default_factory=dict)
    description: str = ""
    run_id: str | None = None
    source: str = ""
    created_ms: int = 0
    updated_ms: int = 0  # the registry's last update of the version (0: unknown)

    @property
    def ref(self) -> VersionRef:
        return VersionRef(self.name, self.version)

    @property
    def role(self) -> str | None:
        return self.tags.get(Tag.ROLE)


@dataclass(frozen=True)
class VersionStamp:
    """A model version and when the registry last created or updated it (its clock, ms)."""

    name: str
    version: str
    updated_ms: int

    @property
    def ref(self) -> VersionRef:
        return VersionRef(self.name, self.version)


@dataclass(frozen=True)
class RunInfo:
    """A migration run in the tracking store."""

    run_id: str
    experiment_id: str


class RegistryError(Exception):
    """A registry call failed for a reason retrying will not fix."""


class RegistryUnavailableError(RegistryError):
    """The registry could not be reached after the configured retries (transient)."""


class VersionNotFoundError(RegistryError):
    """A model version that the registry does not hold."""


@runtime_checkable
class Registry(Protocol):
    """What the migrator needs of a model registry."""

    def list_versions(
        self, *, role: str | None = None, tags: Mapping[str, str] | None = None
    ) -> list[ModelVersionInfo]:
        """Every version carrying ``lorax.role = role`` (all versions when None) and all of
        ``tags``, any order."""
        ...

    def list_model_versions(
        self, names: Collection[str], *, role: str | None = None
    ) -> list[ModelVersionInfo]:
        """Every version of the registered models ``names`` (those carrying ``lorax.role =
        role`` when given), any order; names the registry does not hold are skipped."""
        ...

    def changed_since(self, since_ms: int) -> list[VersionStamp]:
        """Every version created or updated at or after ``since_ms`` (the registry's clock),
        newest first, whatever its tags. MLflow moves a version's update time when it is
        created, described or deleted (then it is no longer listed), not when a tag or an alias
        is set: those changes reach a pass through webhook marks or a full reconcile."""
        ...

    def get_version(self, ref: VersionRef) -> ModelVersionInfo:
        """One version. Raises VersionNotFoundError."""
        ...

    def set_tags(self, ref: VersionRef, tags: Mapping[str, str]) -> None:
        """Set (overwrite) tags on a version."""
        ...

    def download(self, ref: VersionRef, dst: Path) -> Path:
        """Download the version's artifacts into ``dst`` (created); returns the local root."""
        ...

    def find_version_by_tag(self, name: str, key: str, value: str) -> ModelVersionInfo | None:
        """The version of registered model ``name`` with tag ``key = value``, if any."""
        ...

    def find_versions(self, name: str, tags: Mapping[str, str]) -> list[ModelVersionInfo]:
        """Every version of registered model ``name`` carrying all of ``tags``, oldest first."""
        ...

    def log_run(
        self,
        *,
        experiment: str,
        run_name: str,
        job_key: str,
        params: Mapping[str, str],
        metrics: Mapping[str, float],
        tags: Mapping[str, str],
        artifacts: Mapping[str, Path],
    ) -> RunInfo:
        """Create (or reuse, by ``lorax.job = job_key`` and the same ``tags``: job ids repeat
        across job databases sharing a registry) a finished run holding the given params,
        metrics, tags and artifacts (artifact path -> local file or folder)."""
        ...

    def create_version(
        self,
        *,
        name: str,
        run: RunInfo,
        artifact_path: str,
        tags: Mapping[str, str],
        description: str,
    ) -> ModelVersionInfo:
        """Register ``runs:/<run>/<artifact_path>`` as a new version of ``name``.

        Idempotent by the transfer's identity (``lorax.job`` with ``TRANSFER_IDENTITY``): a
        version already carrying the same values is returned instead, also when an earlier try
        of this call was committed by the registry but its reply was lost.
        """
        ...

    def version_link(self, ref: VersionRef) -> str:
        """A link to the version page, relative to the UI (``#/models/NAME/versions/N``)."""
        ...

    def address(self) -> tuple[str, str] | None:
        """(tracking URI, registry URI) another process reaches this registry at; None for a
        registry that lives in this process only (remote workers cannot use it)."""
        ...

    def run_link(self, run: RunInfo) -> str:
        """A link to the run page, relative to the UI."""
        ...
