"""Rows the db tests start from: two bases, adapters on the first, jobs between them."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.orm import Session

from db import (
    AdapterFormat,
    AdapterLayout,
    AdapterVersion,
    BaseModelVersion,
    JobStatus,
    TransferJob,
    apply_policy_decision,
    get_or_create_adapter_version,
    get_or_create_base_version,
    get_or_create_job,
)


@dataclass(frozen=True)
class Bases:
    old: BaseModelVersion
    new: BaseModelVersion


def seed_bases(session: Session) -> Bases:
    old = get_or_create_base_version("sd-base", "1", weights_digest="aa", session=session)
    new = get_or_create_base_version("sd-base", "2", weights_digest="bb", session=session)
    return Bases(old=old, new=new)


def seed_adapter(
    session: Session, base: BaseModelVersion, name: str, version: str = "1"
) -> AdapterVersion:
    return get_or_create_adapter_version(
        name,
        version,
        base=base,
        format=AdapterFormat.LORAX,
        layout=AdapterLayout.PEFT,
        rank=64,
        session=session,
    )


def seed_job(
    session: Session,
    bases: Bases,
    name: str,
    *,
    decision: JobStatus | None = JobStatus.APPROVED,
    max_attempts: int = 3,
) -> TransferJob:
    """A job for a new adapter ``name`` on the old base, to the new base, moved to ``decision``
    by the policy (None: left planned)."""
    adapter = seed_adapter(session, bases.old, name)
    job, created = get_or_create_job(
        adapter.id,
        bases.new.id,
        source_base_id=bases.old.id,
        max_attempts=max_attempts,
        session=session,
    )
    assert created
    if decision is not None:
        apply_policy_decision(job.id, decision, reason="test policy", atc=0.1, session=session)
    return job


def seed_runnable_jobs(session: Session, count: int) -> list[int]:
    """``count`` approved jobs; returns their ids."""
    bases = seed_bases(session)
    return [seed_job(session, bases, f"adapter-{i:04d}").id for i in range(count)]
