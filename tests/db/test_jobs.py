"""Jobs: one per (adapter version, target base); policy and admin commands with audit rows."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

import db.idempotent
from db import (
    AuditAction,
    AuditEvent,
    IllegalTransitionError,
    JobNotFoundError,
    JobStatus,
    ReasonRequiredError,
    TransferJob,
    apply_policy_decision,
    approve,
    audit_trail,
    count_by_status,
    force,
    get_job,
    get_or_create_job,
    list_jobs,
    pending_approvals,
    reject,
    retry,
    session_scope,
)
from db.errors import STATE_PHRASES
from tests.db.seed import Bases, seed_adapter, seed_bases, seed_job

S = JobStatus


def _job_count(session: Session) -> int:
    return session.scalar(select(func.count()).select_from(TransferJob)) or 0


def test_second_job_for_the_same_pair_returns_the_first(factory: sessionmaker[Session]) -> None:
    with session_scope(factory) as session:
        bases = seed_bases(session)
        adapter = seed_adapter(session, bases.old, "style")
        first, created = get_or_create_job(
            adapter.id, bases.new.id, source_base_id=bases.old.id, atc=0.1, session=session
        )
        assert created
        ids = (adapter.id, bases.new.id, bases.old.id)
    with session_scope(factory) as session:
        adapter_id, new_id, old_id = ids
        again, created = get_or_create_job(
            adapter_id, new_id, source_base_id=old_id, atc=0.9, mode="copy", session=session
        )
        assert not created
        assert again.id == first.id
        assert (again.atc, again.mode) == (0.1, "project")  # the first, unchanged
        assert _job_count(session) == 1
        # A different target is a different job.
        other_base = seed_bases(session).old
        third, created = get_or_create_job(
            adapter_id, other_base.id, source_base_id=old_id, session=session
        )
        assert created and third.id != first.id


def test_concurrent_insert_race_returns_the_committed_job(
    factory: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    with session_scope(factory) as session:
        bases = seed_bases(session)
        adapter = seed_adapter(session, bases.old, "style")
        first, _ = get_or_create_job(
            adapter.id, bases.new.id, source_base_id=bases.old.id, session=session
        )
        ids = (adapter.id, bases.new.id, bases.old.id)

    # Another transaction committed between our lookup and our insert: the lookup saw nothing.
    real_find: Callable[..., object] = db.idempotent.find_by_key
    misses = [True]

    def stale_find(*args: object, **kwargs: object) -> object:
        if misses and args[0] is TransferJob:
            misses.pop()
            return None
        return real_find(*args, **kwargs)

    monkeypatch.setattr(db.idempotent, "find_by_key", stale_find)
    with session_scope(factory) as session:
        seed_bases(session)  # work done earlier in the same transaction must survive
        job, created = get_or_create_job(ids[0], ids[1], source_base_id=ids[2], session=session)
        assert not misses  # the stale lookup was used
        assert not created and job.id == first.id
        assert _job_count(session) == 1


def _planned(session: Session, name: str = "a") -> int:
    return seed_job(session, seed_bases(session), name, decision=None).id


def test_policy_decisions_are_audited(factory: sessionmaker[Session]) -> None:
    with session_scope(factory) as session:
        bases: Bases = seed_bases(session)
        auto = seed_job(session, bases, "auto", decision=None).id
        borderline = seed_job(session, bases, "borderline", decision=None).id
        far = seed_job(session, bases, "far", decision=None).id
        apply_policy_decision(auto, S.APPROVED, reason="atc 0.05 <= 0.2", atc=0.05, session=session)
        apply_policy_decision(borderline, S.PENDING_APPROVAL, reason="atc 0.3", session=session)
        apply_policy_decision(far, S.SKIPPED, reason="atc 0.8 > 0.5", atc=0.8, session=session)
        with pytest.raises(ValueError, match="policy decides"):
            apply_policy_decision(far, S.SUCCEEDED, reason="no", session=session)
        with pytest.raises(IllegalTransitionError):  # already decided
            apply_policy_decision(auto, S.SKIPPED, reason="again", session=session)
    with session_scope(factory) as session:
        job = get_job(auto, session=session)
        assert (job.status, job.policy_decision, job.atc) == (S.APPROVED, S.APPROVED, 0.05)
        trail = {
            job_id: [
                (e.action, e.actor, e.from_status, e.to_status)
                for e in audit_trail(job_id, session=session)
            ]
            for job_id in (auto, borderline, far)
        }
        assert trail == {
            auto: [(AuditAction.APPROVE, "policy", S.PLANNED, S.APPROVED)],
            borderline: [(AuditAction.POLICY, "policy", S.PLANNED, S.PENDING_APPROVAL)],
            far: [(AuditAction.POLICY, "policy", S.PLANNED, S.SKIPPED)],
        }
        assert [j.id for j in pending_approvals(session=session)] == [borderline]
        counts = count_by_status(session=session)
        assert counts[S.APPROVED] == counts[S.PENDING_APPROVAL] == counts[S.SKIPPED] == 1
        assert sum(counts.values()) == 3


def test_admin_commands_write_audit_rows(factory: sessionmaker[Session]) -> None:
    with session_scope(factory) as session:
        bases = seed_bases(session)
        to_approve = seed_job(session, bases, "p1", decision=S.PENDING_APPROVAL).id
        to_reject = seed_job(session, bases, "p2", decision=S.PENDING_APPROVAL).id
        skipped = seed_job(session, bases, "s1", decision=S.SKIPPED).id
    with session_scope(factory) as session:
        approve(to_approve, "alice", "looks fine", session=session)
        reject(to_reject, "bob", "style drifts on the new base", session=session)
        force(skipped, "carol", "customer needs it", session=session)
    with session_scope(factory) as session:
        force(to_reject, "dave", "overruled bob", session=session)
        job = get_job(to_approve, session=session)
        # a failed job, retried by an admin (the worker side is in test_leases)
        job.status = S.FAILED
        job.attempts = 3
        session.flush()
        retry(to_approve, "erin", "fixed the cache", session=session)
    with session_scope(factory) as session:
        rows = session.scalars(
            select(AuditEvent).where(AuditEvent.actor != "policy").order_by(AuditEvent.id)
        ).all()
        assert [
            (e.job_id, e.action, e.actor, e.reason, e.from_status, e.to_status) for e in rows
        ] == [
            (
                to_approve,
                AuditAction.APPROVE,
                "alice",
                "looks fine",
                S.PENDING_APPROVAL,
                S.APPROVED,
            ),
            (
                to_reject,
                AuditAction.REJECT,
                "bob",
                "style drifts on the new base",
                S.PENDING_APPROVAL,
                S.REJECTED,
            ),
            (skipped, AuditAction.FORCE, "carol", "customer needs it", S.SKIPPED, S.APPROVED),
            (to_reject, AuditAction.FORCE, "dave", "overruled bob", S.REJECTED, S.APPROVED),
            (to_approve, AuditAction.RETRY, "erin", "fixed the cache", S.FAILED, S.APPROVED),
        ]
        assert all(e.at.tzinfo is not None for e in rows)
        retried = get_job(to_approve, session=session)
        assert (retried.status, retried.attempts, retried.next_attempt_at) == (S.APPROVED, 0, None)
        assert {j.status for j in list_jobs(session=session)} == {S.APPROVED}


@pytest.mark.parametrize(
    ("command", "start"),
    [
        (approve, S.SKIPPED),  # force, not approve
        (approve, S.PLANNED),
        (approve, S.FAILED),
        (reject, S.APPROVED),
        (reject, S.SKIPPED),
        (force, S.PENDING_APPROVAL),
        (force, S.FAILED),
        (force, S.SUCCEEDED),
        (retry, S.SUCCEEDED),
        (retry, S.RUNNING),
        (retry, S.SKIPPED),
    ],
    ids=lambda value: getattr(value, "__name__", str(value)),
)
def test_commands_refuse_other_states_and_change_nothing(
    factory: sessionmaker[Session], command: Callable[..., TransferJob], start: JobStatus
) -> None:
    with session_scope(factory) as session:
        job = seed_job(session, seed_bases(session), "a", decision=None)
        job.status = start  # set directly: the state under test, not how it got there
        job_id = job.id
    verb = command.__name__
    said = STATE_PHRASES[start.value]
    refused = pytest.raises(IllegalTransitionError, match=f"cannot {verb} job {job_id}: it {said}")
    with refused, session_scope(factory) as session:
        command(job_id, "mallory", "because", session=session)
    with session_scope(factory) as session:
        assert get_job(job_id, session=session).status is start
        assert audit_trail(job_id, session=session) == []


def test_reject_and_force_need_a_reason(factory: sessionmaker[Session]) -> None:
    with session_scope(factory) as session:
        bases = seed_bases(session)
        pending = seed_job(session, bases, "p", decision=S.PENDING_APPROVAL).id
        skipped = seed_job(session, bases, "s", decision=S.SKIPPED).id
    with session_scope(factory) as session:
        with pytest.raises(ReasonRequiredError, match=f"reject of job {pending} needs a reason"):
            reject(pending, "bob", "  ", session=session)
        with pytest.raises(ReasonRequiredError):
            force(skipped, "bob", "", session=session)
        assert get_job(pending, session=session).status is S.PENDING_APPROVAL
        assert get_job(skipped, session=session).status is S.SKIPPED


def test_unknown_job(factory: sessionmaker[Session]) -> None:
    with (
        session_scope(factory) as session,
        pytest.raises(JobNotFoundError, match="no transfer job with id 4242"),
    ):
        approve(4242, "alice", session=session)


def test_session_scope_rolls_back_on_error(factory: sessionmaker[Session]) -> None:
    with pytest.raises(RuntimeError), session_scope(factory) as session:
        _planned(session)
        assert _job_count(session) == 1
        raise RuntimeError("boom")
    with session_scope(factory) as session:
        assert _job_count(session) == 0


@pytest.mark.parametrize("start", [S.APPROVED, S.RUNNING, S.SUCCEEDED])
def test_approving_an_approved_job_changes_nothing(
    factory: sessionmaker[Session], start: JobStatus
) -> None:
    with session_scope(factory) as session:
        job_id = seed_job(session, seed_bases(session), "a", decision=S.PENDING_APPROVAL).id
        approve(job_id, "alice", "first look", session=session)
        get_job(job_id, session=session).status = start
    with session_scope(factory) as session:
        trail = [(e.actor, e.reason) for e in audit_trail(job_id, session=session)]
        assert ("alice", "first look") in trail
        again = approve(job_id, "bob", "second look", session=session)
        assert again.status is start
    with session_scope(factory) as session:
        assert [(e.actor, e.reason) for e in audit_trail(job_id, session=session)] == trail


def test_retrying_a_succeeded_job_says_so(factory: sessionmaker[Session]) -> None:
    with session_scope(factory) as session:
        job = seed_job(session, seed_bases(session), "a", decision=None)
        job.status = S.SUCCEEDED
        job_id = job.id
    with session_scope(factory) as session, pytest.raises(IllegalTransitionError) as refused:
        retry(job_id, "erin", session=session)
    assert str(refused.value) == (
        f"cannot retry job {job_id}: it has succeeded (retry applies to failed jobs)"
    )
