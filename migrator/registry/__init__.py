"""Model registries behind one Protocol: MLflow for real, in-memory for unit tests."""

from migrator.registry.base import (
    ROLE_ADAPTER,
    ROLE_BASE,
    TRANSFER_IDENTITY,
    ModelVersionInfo,
    Registry,
    RegistryError,
    RegistryUnavailableError,
    RunInfo,
    Tag,
    VersionNotFoundError,
    VersionRef,
    VersionStamp,
)

__all__ = [
    "ROLE_ADAPTER",
    "ROLE_BASE",
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
