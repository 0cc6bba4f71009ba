"""Settings of the migrator: one object, built at the entry point and passed down.

Sources, highest priority first: keyword arguments, environment variables (prefix ``MIGRATOR_``),
a TOML file (``--config FILE`` or ``MIGRATOR_CONFIG``; top-level keys are the field names), then
the defaults below. The defaults need nothing: MLflow on a local SQLite file, the job database on a
separate SQLite file, everything under ``data_dir``, CPU or whatever ``device=auto`` finds.
"""

from __future__ import annotations

import contextvars
import os
import socket
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from core.vocabulary import Combine, MatchStrategy, MergeWeights, TransferMode

__all__ = ["ConfigFileError", "Device", "ExecutorKind", "Settings", "load_settings"]

_CONFIG_FILE: contextvars.ContextVar[Path | None] = contextvars.ContextVar(
    "migrator_config_file", default=None
)


class ConfigFileError(ValueError):
    """The configuration file named by ``--config`` or ``MIGRATOR_CONFIG`` cannot be used."""


class Device(StrEnum):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


class ExecutorKind(StrEnum):
    LOCAL = "local"
    RAY = "ray"


def _default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Settings(BaseSettings):
    """Everything a user may tune. Field ``x`` is the environment variable ``MIGRATOR_X``."""

    model_config = SettingsConfigDict(
        env_prefix="MIGRATOR_",
        extra="forbid",
        validate_default=True,
    )

    # --- where things live -------------------------------------------------------------
    data_dir: Path = Field(
        Path(".migrator"),
        description="Folder for the embedded defaults: SQLite files, artifacts, cache, scratch.",
    )
    # The fields whose defaults derive from data_dir (and the environment) are filled in by
    # _derive_defaults before validation, so they always hold a value.
    tracking_uri: str = Field(
        description="MLflow tracking URI. Falls back to MLFLOW_TRACKING_URI, then to "
        "sqlite:///<data_dir>/mlflow.db.",
    )
    registry_uri: str = Field(description="MLflow registry URI. Defaults to the tracking URI.")
    database_url: SecretStr = Field(
        description="SQLAlchemy URL of the job database. Defaults to "
        "sqlite:///<data_dir>/migrator.db; PostgreSQL (postgresql+psycopg://...) in production. "
        "Empty on Ray workers, which never touch the job database.",
    )
    artifact_root: str | None = Field(
        None,
        description="Artifact location of the migration experiment when the migrator creates it "
        "(defaults to <data_dir>/mlartifacts for a local store; the server's default otherwise).",
    )
    experiment_name: str = Field(
        "lorax-migrations", description="MLflow experiment that holds the migration runs."
    )
    cache_dir: Path = Field(
        description="Factorization cache, keyed by tensor content digest (default "
        "<data_dir>/factor-cache). Share it between replicas and workers when you can.",
    )
    scratch_dir: Path = Field(
        description="Scratch space for downloads (default <data_dir>/scratch)."
    )

    # --- the method --------------------------------------------------------------------
    similarity_rank: int = Field(
        32, ge=1, description="k of the subspace similarity Psi_k (eq. 4); must truncate."
    )
    weighted_similarity: bool = Field(
        False, description="Use the singular-value-weighted similarity of eq. 5 instead of eq. 4."
    )
    atc_combine: Combine = Field(
        Combine.MEAN, description="How ATC left and right combine into the ATC that decides."
    )
    module_min_similarity: float = Field(
        0.5, ge=0.0, le=1.0, description="Per-module similarity threshold (filter blocks)."
    )
    match_strategy: MatchStrategy = Field(
        MatchStrategy.ONE_TO_ONE,
        description="one_to_one: a target module receives one source module's update; merge: "
        "the mass-weighted combination of every source module of its role the transport sends "
        "it (carries what a depth-pruned successor drops).",
    )
    merge_weights: MergeWeights = Field(
        MergeWeights.SOURCE,
        description="In merge matching: source (each source update carried in full over its "
        "targets) or target (a convex combination per target).",
    )
    order_preserving_layers: bool = Field(
        False,
        description="Match layers by an order-preserving (monotone) alignment over the "
        "similarities instead of unconstrained transport, for successors of another depth.",
    )
    module_patterns: list[str] | None = Field(
        None,
        description="Regexes selecting adapter locations in base weights; default: attention "
        "projections of diffusers UNets, Llama-style decoders and BERT encoders.",
    )
    role_substitutions: list[tuple[str, str]] = Field(
        default_factory=list,
        description="Extra (regex, replacement) pairs applied to module names, after numeric "
        "segments are wildcarded, to form a module's role.",
    )
    transfer_mode: TransferMode = Field(
        TransferMode.PROJECT,
        description="project (paper Algorithm 1), subspace (k = r), or copy (ablation).",
    )
    transfer_rank: int | None = Field(
        None, ge=1, description="k of the projection in project mode (default: full thin rank)."
    )
    device: Device = Field(Device.AUTO, description="auto, cpu or cuda.")
    allow_pickle: bool = Field(
        False, description="Allow pickle checkpoints (.bin/.pt/.ckpt). Only for trusted registries."
    )

    # --- approval policy ---------------------------------------------------------------
    auto_approve_atc: float = Field(
        0.3, ge=0.0, le=1.0, description="ATC at or below which a transfer is approved by itself."
    )
    max_atc: float = Field(
        0.6,
        ge=0.0,
        le=1.0,
        description="ATC at or below which a transfer waits for approval; above it is skipped.",
    )
    max_weight_drift: float = Field(
        0.01,
        ge=0.0,
        description="Weights-only drift (relative Frobenius change over every same-named tensor "
        "of the two bases) at or below which a transfer may be approved by itself; a source "
        "tensor missing in the target also holds it for an admin.",
    )
    min_functional_agreement: float = Field(
        0.8,
        ge=-1.0,
        le=1.0,
        description="Functional agreement (the worst debiased CKA of the bases, and the worst "
        "adapter-effect correlation of each transfer, over probe kinds) at or above which a "
        "transfer may be approved by itself.",
    )
    require_functional_check: bool = Field(
        False,
        description="Hold for an admin the transfers whose bases cannot run the functional "
        "check (no runnable config, too large, another architecture).",
    )
    max_dropped_share: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Share of an adapter's energy that may reach no target module before its "
        "transfer waits for an admin instead of being registered.",
    )
    functional_check: bool = Field(
        True,
        description="Run the data-free functional check where the bases can run (seeded probes "
        "on the CPU or the configured device).",
    )
    functional_probe_count: int = Field(
        64, ge=4, description="Probes per kind in the functional check (bounds its time)."
    )
    functional_probe_length: int = Field(
        32, ge=4, description="Tokens (or words) per probe of the functional check."
    )
    functional_probe_kinds: list[str] = Field(
        default_factory=lambda: ["token_ids", "words", "text"],
        description="Text probe kinds: token_ids (random ids), words (random whole words), "
        "text (generic licence text).",
    )
    functional_batch_size: int = Field(
        32, ge=1, description="Probes per forward pass of the functional check (bounds memory)."
    )
    functional_max_parameters: int = Field(
        3_000_000_000,
        ge=1,
        description="Bases with more parameters per component are not built for the check.",
    )

    # --- the daemon --------------------------------------------------------------------
    poll_interval_s: float = Field(60.0, gt=0, description="Seconds between registry polls.")
    full_reconcile_every: int = Field(
        30,
        ge=1,
        description="Every Nth pass reads the whole registry (the others read what changed): "
        "it catches tags set without a webhook delivery and deleted versions. 1: every pass.",
    )
    worker_id: str = Field(
        default_factory=_default_worker_id, description="Lease owner name of this process."
    )
    claim_batch: int = Field(4, ge=1, description="Jobs claimed at a time.")
    lease_s: float = Field(300.0, gt=0, description="Lease of a running job, renewed by heartbeat.")
    heartbeat_s: float = Field(30.0, gt=0, description="Seconds between lease renewals.")
    max_attempts: int = Field(3, ge=1, description="Automatic attempts of a job before an admin.")
    retry_backoff_s: float = Field(30.0, ge=0, description="First retry delay; doubles each time.")
    retry_backoff_max_s: float = Field(3600.0, ge=0, description="Cap of the retry delay.")
    registry_retries: int = Field(
        5, ge=0, description="Retries of a registry call on a transient error."
    )
    registry_backoff_s: float = Field(1.0, ge=0, description="First registry retry delay.")
    log_format: Literal["text", "json"] = Field("text", description="Log line format.")
    log_level: str = Field("INFO", description="Log level.")

    # --- webhook -----------------------------------------------------------------------
    webhook_enabled: bool = Field(
        False, description="Run the MLflow webhook receiver (it only triggers an early poll)."
    )
    webhook_host: str = Field("127.0.0.1", description="Address the webhook receiver binds.")
    webhook_port: int = Field(8765, ge=0, le=65535, description="Port of the webhook receiver.")
    webhook_secret: SecretStr | None = Field(
        None, description="Shared secret of the MLflow webhook (HMAC-SHA256 signatures)."
    )
    webhook_max_body_bytes: int = Field(
        1 << 20, ge=1, description="Largest delivery body; a larger one is refused unread (413)."
    )
    webhook_max_header_bytes: int = Field(
        16384, ge=1024, description="Largest request line and headers of a delivery, together."
    )
    webhook_idle_timeout_s: float = Field(
        5.0,
        gt=0,
        description="Seconds a connection may wait for a request's headers (new or "
        "kept alive) before it is closed.",
    )
    webhook_request_timeout_s: float = Field(
        10.0, gt=0, description="Seconds a request may take from its headers to its reply."
    )
    webhook_max_connections: int = Field(
        64, ge=1, description="Connections served at once; requests past it are refused (503)."
    )
    webhook_timestamp_window_s: float = Field(
        300.0,
        gt=0,
        description="How far a delivery's timestamp may be from now; its id is "
        "remembered that long, so a replay is refused (409).",
    )

    # --- execution ---------------------------------------------------------------------
    executor: ExecutorKind = Field(
        ExecutorKind.LOCAL, description="local (in-process) or ray (a Ray cluster)."
    )
    ray_address: str | None = Field(
        None, description="Ray address: auto, ray://host:port, or empty for a local Ray."
    )
    ray_max_retries: int = Field(
        3, ge=0, description="Ray's retries of a task whose worker or node died."
    )
    ray_cpus_per_task: int = Field(
        1, ge=1, description="CPUs (and torch threads) per Ray factorization task."
    )
    worker_cache_dir: Path | None = Field(
        None,
        description="On a Ray node (set in that node's environment): where the shared "
        "factorization cache is mounted there, when not at cache_dir.",
    )
    worker_scratch_dir: Path | None = Field(
        None,
        description="On a Ray node (set in that node's environment): its scratch folder, when "
        "not at scratch_dir.",
    )

    # --- factorization and its cache ----------------------------------------------------
    assessment_factors: Literal["randomized", "exact"] = Field(
        "randomized",
        description="Factors of assessments: randomized top-k (block Krylov; on trained weights "
        "every similarity within 1e-3 of exact, several times faster) or exact (a full SVD, "
        "keeping only the top triplets).",
    )
    cache_max_gb: float = Field(
        40.0,
        ge=0,
        description="Size cap of the factorization cache in GB (10^9 bytes): the least "
        "recently used entries are evicted beyond it; 0: no cap.",
    )

    @model_validator(mode="before")
    @classmethod
    def _derive_defaults(cls, data: Any) -> Any:
        """Fill the settings whose defaults derive from ``data_dir`` and the environment."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        folder = Path(data.get("data_dir") or cls.model_fields["data_dir"].default)
        if not data.get("tracking_uri"):
            env = os.environ.get("MLFLOW_TRACKING_URI")
            data["tracking_uri"] = env or f"sqlite:///{(folder / 'mlflow.db').as_posix()}"
        if not data.get("registry_uri"):
            data["registry_uri"] = data["tracking_uri"]
        if data.get("database_url") in (None, ""):
            data["database_url"] = f"sqlite:///{(folder / 'migrator.db').as_posix()}"
        data["cache_dir"] = data.get("cache_dir") or folder / "factor-cache"
        data["scratch_dir"] = data.get("scratch_dir") or folder / "scratch"
        local = str(data["tracking_uri"]).startswith(("sqlite:", "file:", "/"))
        if data.get("artifact_root") is None and local:
            data["artifact_root"] = (folder / "mlartifacts").resolve().as_uri()
        return data

    @field_validator("database_url", mode="before")
    @classmethod
    def _check_database_url(cls, value: Any) -> Any:
        raw = value.get_secret_value() if isinstance(value, SecretStr) else value
        if raw not in ("", None) and "://" not in str(raw):
            raise ValueError(f"not a SQLAlchemy URL: {raw!r} (expected e.g. sqlite:///path.db)")
        return value

    @model_validator(mode="after")
    def _check_policy(self) -> Settings:
        if self.auto_approve_atc > self.max_atc:
            raise ValueError(
                f"auto_approve_atc ({self.auto_approve_atc}) must not exceed max_atc "
                f"({self.max_atc})"
            )
        return self

    @property
    def cache_max_bytes(self) -> int | None:
        """The factor cache's size cap in bytes (None: no cap), for ``FactorCache(max_bytes=)``."""
        return None if self.cache_max_gb == 0 else int(self.cache_max_gb * 1e9)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = _CONFIG_FILE.get()
        if path is None and os.environ.get("MIGRATOR_CONFIG"):
            path = Path(os.environ["MIGRATOR_CONFIG"])
        if path is not None:
            if not path.is_file():
                raise ConfigFileError(f"configuration file not found: {path}")
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)


def load_settings(config_file: Path | str | None = None, **overrides: Any) -> Settings:
    """Build the settings from keyword overrides, the environment, a TOML file and defaults.

    Args:
        config_file: TOML file; when None, ``MIGRATOR_CONFIG`` is used if set.
        **overrides: field values that win over every other source.

    Raises:
        ConfigFileError: the configuration file is missing or not valid TOML.
        pydantic.ValidationError: a value is invalid (the message names the setting).
    """
    token = _CONFIG_FILE.set(Path(config_file) if config_file is not None else None)
    try:
        return Settings(**overrides)
    except ConfigFileError:
        raise
    except ValueError as exc:
        if "TOML" in type(exc).__name__ or "toml" in str(type(exc)).lower():
            raise ConfigFileError(f"{config_file}: not valid TOML: {exc}") from exc
        raise
    finally:
        _CONFIG_FILE.reset(token)
