"""The job database's tables as typed SQLAlchemy 2.x models.

Registry objects are referred to by ``name`` and ``version`` strings exactly as the MLflow
registry spells them; ``ref`` gives the ``name/version`` form used in ``lorax.*`` tags. Every
timestamp is an aware UTC datetime (:class:`~db.timestamps.UTCDateTime`).
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from db.base import Base
from db.enums import (
    AdapterFormat,
    AdapterLayout,
    AdapterOrigin,
    AuditAction,
    BaseStatus,
    RegistryAction,
)
from db.status import JobStatus
from db.timestamps import UTCDateTime, utcnow

__all__ = [
    "AdapterVersion",
    "Assessment",
    "AssessmentFigure",
    "AuditEvent",
    "BaseModelVersion",
    "Lineage",
    "ModulePair",
    "RegistryCursor",
    "RegistryEvent",
    "RegistryMark",
    "TransferJob",
    "WebhookDelivery",
]

_NAME = 255  # registered model names
_VERSION = 64  # registry version strings
_REF = _NAME + 1 + _VERSION  # "name/version"


def _enum_column_type(enum_cls: type[StrEnum], name: str) -> Enum:
    """A portable enum column: VARCHAR plus a named CHECK constraint, storing the values."""
    return Enum(
        enum_cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=32,
        values_callable=lambda members: [member.value for member in members],
        validate_strings=True,
    )


class BaseModelVersion(Base):
    """A base model version seen in the registry."""

    __tablename__ = "base_model_versions"
    __table_args__ = (UniqueConstraint("name", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(_NAME))
    version: Mapped[str] = mapped_column(String(_VERSION))
    weights_digest: Mapped[str | None] = mapped_column(String(128))
    status: Mapped[BaseStatus] = mapped_column(
        _enum_column_type(BaseStatus, "status"), default=BaseStatus.ACTIVE
    )
    superseded_by: Mapped[str | None] = mapped_column(String(_REF))  # "name/version"
    # Why its weights cannot be used (None: usable, or not opened yet); kept so that a pass
    # need not download it again to know, until the registry changes it or a full reconcile.
    problem: Mapped[str | None] = mapped_column(Text)
    discovered_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    @property
    def ref(self) -> str:
        """``name/version``."""
        return f"{self.name}/{self.version}"

    def __repr__(self) -> str:
        return f"BaseModelVersion(id={self.id}, {self.ref}, {self.status})"


class AdapterVersion(Base):
    """An adapter version: registered by someone, or produced by a transfer job."""

    __tablename__ = "adapter_versions"
    __table_args__ = (UniqueConstraint("name", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(_NAME))
    version: Mapped[str] = mapped_column(String(_VERSION))
    base_id: Mapped[int] = mapped_column(ForeignKey("base_model_versions.id"), index=True)
    format: Mapped[AdapterFormat] = mapped_column(_enum_column_type(AdapterFormat, "format"))
    # None until the adapter's files are read (the registry's tags do not say).
    layout: Mapped[AdapterLayout | None] = mapped_column(_enum_column_type(AdapterLayout, "layout"))
    rank: Mapped[int | None] = mapped_column(Integer)
    digest: Mapped[str | None] = mapped_column(String(128))
    origin: Mapped[AdapterOrigin] = mapped_column(
        _enum_column_type(AdapterOrigin, "origin"), default=AdapterOrigin.REGISTERED
    )
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    base: Mapped[BaseModelVersion] = relationship()

    @property
    def ref(self) -> str:
        """``name/version``."""
        return f"{self.name}/{self.version}"

    def __repr__(self) -> str:
        return f"AdapterVersion(id={self.id}, {self.ref}, base_id={self.base_id})"


class Assessment(Base):
    """The ATC of one (source base, target base, parameters), stored once and reused."""

    __tablename__ = "assessments"
    __table_args__ = (UniqueConstraint("source_base_id", "target_base_id", "params_hash"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    source_base_id: Mapped[int] = mapped_column(ForeignKey("base_model_versions.id"))
    target_base_id: Mapped[int] = mapped_column(ForeignKey("base_model_versions.id"), index=True)
    # similarity_rank, weighted, role rule, combine, module_min_similarity, ...
    parameters: Mapped[dict[str, Any]] = mapped_column(JSON)
    params_hash: Mapped[str] = mapped_column(String(64))  # db.assessments.params_hash
    atc_left: Mapped[float] = mapped_column(Float)
    atc_right: Mapped[float] = mapped_column(Float)
    atc: Mapped[float] = mapped_column(Float)  # the combination the policy uses
    timings: Mapped[dict[str, float]] = mapped_column(JSON, default=dict)  # step -> seconds
    # The pair's other signals: weights-only drift, the functional check (or why it cannot run).
    signals: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    source_base: Mapped[BaseModelVersion] = relationship(foreign_keys=[source_base_id])
    target_base: Mapped[BaseModelVersion] = relationship(foreign_keys=[target_base_id])
    module_pairs: Mapped[list[ModulePair]] = relationship(
        back_populates="assessment",
        cascade="all, delete-orphan",
        order_by="ModulePair.id",
    )
    figures: Mapped[list[AssessmentFigure]] = relationship(
        back_populates="assessment",
        cascade="all, delete-orphan",
        order_by="AssessmentFigure.id",
    )


class ModulePair(Base):
    """One target module's match in an assessment: similarity, transport mass and decision."""

    __tablename__ = "module_pairs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    assessment_id: Mapped[int] = mapped_column(
        ForeignKey("assessments.id", ondelete="CASCADE"), index=True
    )
    source_module: Mapped[str | None] = mapped_column(String(512))  # None: no valid source
    target_module: Mapped[str] = mapped_column(String(512))
    phi_left: Mapped[float | None] = mapped_column(Float)
    phi_right: Mapped[float | None] = mapped_column(Float)
    transport_mass: Mapped[float | None] = mapped_column(Float)
    decision: Mapped[str] = mapped_column(String(32))  # core.decisions.Decision value
    reason: Mapped[str | None] = mapped_column(Text)
    # [[source module, weight], ...] for a target fed by several source modules; None: one.
    contributions: Mapped[list[list[Any]] | None] = mapped_column(JSON)

    assessment: Mapped[Assessment] = relationship(back_populates="module_pairs")


class AssessmentFigure(Base):
    """A figure rendered once per assessment (the similarity heatmap), logged with every
    transfer run planned from it, so that runs need not recompute the similarities."""

    __tablename__ = "assessment_figures"
    __table_args__ = (UniqueConstraint("assessment_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    assessment_id: Mapped[int] = mapped_column(
        ForeignKey("assessments.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(128))  # artifact file name, e.g. similarity.png
    content: Mapped[bytes] = mapped_column(LargeBinary)

    assessment: Mapped[Assessment] = relationship(back_populates="figures")


class TransferJob(Base):
    """One transfer of one adapter version to one target base version (unique together).

    The status only changes through :func:`db.status.transition`. A running job holds a lease
    (``lease_owner`` until ``lease_expires_at``, renewed by heartbeats); an expired lease is
    reclaimed by the next claim.
    """

    __tablename__ = "transfer_jobs"
    __table_args__ = (
        UniqueConstraint("adapter_version_id", "target_base_id"),
        # The claim query: approved jobs that are due, and running jobs whose lease expired.
        Index("ix_transfer_jobs_status_next_attempt_at", "status", "next_attempt_at"),
        Index("ix_transfer_jobs_status_lease_expires_at", "status", "lease_expires_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    adapter_version_id: Mapped[int] = mapped_column(ForeignKey("adapter_versions.id"))
    target_base_id: Mapped[int] = mapped_column(ForeignKey("base_model_versions.id"), index=True)
    source_base_id: Mapped[int] = mapped_column(ForeignKey("base_model_versions.id"))
    assessment_id: Mapped[int | None] = mapped_column(
        ForeignKey("assessments.id", ondelete="SET NULL"), index=True
    )
    status: Mapped[JobStatus] = mapped_column(
        _enum_column_type(JobStatus, "status"), default=JobStatus.PLANNED
    )
    # What the ATC policy decided (approved, pending_approval or skipped) and why; kept as the
    # status moves on.
    policy_decision: Mapped[JobStatus | None] = mapped_column(
        _enum_column_type(JobStatus, "policy_decision")
    )
    policy_reason: Mapped[str | None] = mapped_column(Text)
    # Every signal of the decisions on this job (planning, then the transfer): name, value,
    # threshold, verdict, detail (migrator.policy.Signal).
    signals: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)
    atc: Mapped[float | None] = mapped_column(Float)
    mode: Mapped[str] = mapped_column(String(32), default="project")  # core TransferMode value

    # Attempts started so far: counted when an executor begins the job's work (db.leases.start),
    # not when it is claimed, so a claim lost before the work began costs nothing.
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime())  # None: at once
    last_error: Mapped[str | None] = mapped_column(Text)

    lease_owner: Mapped[str | None] = mapped_column(String(255))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # When the work of the current lease began (None: claimed, not started yet).
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    result_adapter_version_id: Mapped[int | None] = mapped_column(
        ForeignKey("adapter_versions.id", ondelete="SET NULL")
    )
    result_ref: Mapped[str | None] = mapped_column(String(_REF))  # registry "name/version"
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64))

    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)

    adapter_version: Mapped[AdapterVersion] = relationship(foreign_keys=[adapter_version_id])
    target_base: Mapped[BaseModelVersion] = relationship(foreign_keys=[target_base_id])
    source_base: Mapped[BaseModelVersion] = relationship(foreign_keys=[source_base_id])
    assessment: Mapped[Assessment | None] = relationship()
    result_adapter_version: Mapped[AdapterVersion | None] = relationship(
        foreign_keys=[result_adapter_version_id]
    )
    audit_events: Mapped[list[AuditEvent]] = relationship(
        back_populates="job", cascade="all, delete-orphan", order_by="AuditEvent.id"
    )

    def __repr__(self) -> str:
        return (
            f"TransferJob(id={self.id}, adapter_version_id={self.adapter_version_id}, "
            f"target_base_id={self.target_base_id}, status={self.status})"
        )


class AuditEvent(Base):
    """Who did what to a job, when and why."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(
        ForeignKey("transfer_jobs.id", ondelete="CASCADE"), index=True
    )
    action: Mapped[AuditAction] = mapped_column(_enum_column_type(AuditAction, "action"))
    actor: Mapped[str] = mapped_column(String(255))
    reason: Mapped[str | None] = mapped_column(Text)
    from_status: Mapped[JobStatus] = mapped_column(_enum_column_type(JobStatus, "from_status"))
    to_status: Mapped[JobStatus] = mapped_column(_enum_column_type(JobStatus, "to_status"))
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    job: Mapped[TransferJob] = relationship(back_populates="audit_events")


class Lineage(Base):
    """An edge parent -> child between adapter versions, and the job that made the child."""

    __tablename__ = "lineage"
    __table_args__ = (UniqueConstraint("parent_id", "child_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    parent_id: Mapped[int] = mapped_column(ForeignKey("adapter_versions.id"))
    child_id: Mapped[int] = mapped_column(ForeignKey("adapter_versions.id"), index=True)
    job_id: Mapped[int | None] = mapped_column(
        ForeignKey("transfer_jobs.id", ondelete="SET NULL"), index=True
    )
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    parent: Mapped[AdapterVersion] = relationship(foreign_keys=[parent_id])
    child: Mapped[AdapterVersion] = relationship(foreign_keys=[child_id])


class RegistryEvent(Base):
    """What the service changed in the registry outside a job's own run, and why: the audit of
    the reconciler (a duplicate version marked, naming the version kept)."""

    __tablename__ = "registry_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    action: Mapped[RegistryAction] = mapped_column(_enum_column_type(RegistryAction, "action"))
    actor: Mapped[str] = mapped_column(String(255))  # the worker id of the pass
    name: Mapped[str] = mapped_column(String(_NAME))  # registered model
    version: Mapped[str] = mapped_column(String(_VERSION))  # the version acted on
    kept_version: Mapped[str | None] = mapped_column(String(_VERSION))
    job_tag: Mapped[str | None] = mapped_column(String(64))  # its lorax.job value
    # The job of this database whose result the action concerns, if any.
    job_id: Mapped[int | None] = mapped_column(
        ForeignKey("transfer_jobs.id", ondelete="SET NULL"), index=True
    )
    reason: Mapped[str | None] = mapped_column(Text)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class WebhookDelivery(Base):
    """A webhook delivery id accepted once: a replay of it inside the timestamp window is
    refused. Rows older than the window are pruned (a replay that old fails the timestamp
    check anyway)."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    delivery_id: Mapped[str] = mapped_column(String(255), unique=True)
    sent_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)  # X-MLflow-Timestamp
    received_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class RegistryCursor(Base):
    """How far the watcher has read one registry (one row per registry: ``registry_key`` is a
    digest of its URI), so that a pass lists only what is new.

    ``listed_ms`` is the registry's clock at the newest version creation or update a pass has
    planned from; ``listed_seen`` holds the versions inside the overlap window before it
    (``name/version`` -> their time), so that a late commit inside the window is still caught
    and nothing is planned twice. ``published_at`` and ``published_seen`` do the same for jobs
    whose registry pages are in step. ``bases_digest`` fingerprints the base versions and the
    tags that decide succession: when it moves, the pass reads every adapter.
    """

    __tablename__ = "registry_cursors"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    registry_key: Mapped[str] = mapped_column(String(64), unique=True)
    listed_ms: Mapped[int] = mapped_column(BigInteger, default=0)
    listed_seen: Mapped[dict[str, int]] = mapped_column(JSON, default=dict)
    bases_digest: Mapped[str | None] = mapped_column(String(64))
    passes_since_full: Mapped[int] = mapped_column(Integer, default=0)
    full_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    published_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    published_seen: Mapped[dict[str, int]] = mapped_column(JSON, default=dict)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)


class RegistryMark(Base):
    """A model version a webhook delivery said changed in a way the registry's search cannot
    show (MLflow does not move a version's update time when a tag is set): the next pass
    reads its registered model again, then deletes the mark."""

    __tablename__ = "registry_marks"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(_NAME))
    version: Mapped[str] = mapped_column(String(_VERSION))
    event: Mapped[str] = mapped_column(String(64))  # entity.action of the delivery
    marked_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
