"""The job state machine: exactly the documented edges are legal, everything else is refused."""

from __future__ import annotations

import itertools

import pytest

from db import (
    ACTIVE,
    ALLOWED_TRANSITIONS,
    RUNNABLE,
    TERMINAL,
    IllegalTransitionError,
    JobStatus,
    TransferJob,
    can_transition,
    transition,
)
from db.errors import STATE_PHRASES

S = JobStatus
DOCUMENTED_EDGES = {
    (S.PLANNED, S.APPROVED),
    (S.PLANNED, S.PENDING_APPROVAL),
    (S.PLANNED, S.SKIPPED),
    (S.PENDING_APPROVAL, S.APPROVED),
    (S.PENDING_APPROVAL, S.REJECTED),
    (S.APPROVED, S.RUNNING),
    (S.RUNNING, S.SUCCEEDED),
    (S.RUNNING, S.FAILED),
    (S.RUNNING, S.APPROVED),  # lease expired (reclaim) or graceful release
    (S.RUNNING, S.PENDING_APPROVAL),  # held after the transfer: a signal on the result failed
    (S.FAILED, S.APPROVED),  # retry
    (S.SKIPPED, S.APPROVED),  # force
    (S.REJECTED, S.APPROVED),  # force
}
ALL_PAIRS = set(itertools.product(JobStatus, JobStatus))
ILLEGAL = sorted(ALL_PAIRS - DOCUMENTED_EDGES)


def test_the_table_is_exactly_the_documented_edges() -> None:
    table = {(a, b) for a, targets in ALLOWED_TRANSITIONS.items() for b in targets}
    assert set(ALLOWED_TRANSITIONS) == set(JobStatus)
    assert table == DOCUMENTED_EDGES


@pytest.mark.parametrize(("current", "requested"), sorted(DOCUMENTED_EDGES))
def test_documented_edges_are_taken(current: JobStatus, requested: JobStatus) -> None:
    job = TransferJob(id=7, status=current)
    previous = transition(job, requested)
    assert previous is current
    assert job.status is requested
    assert job.updated_at is not None and job.updated_at.tzinfo is not None


def test_every_other_pair_is_refused() -> None:
    assert len(ILLEGAL) == len(JobStatus) ** 2 - len(DOCUMENTED_EDGES) == 51
    for current, requested in ILLEGAL:
        job = TransferJob(id=7, status=current)
        assert not can_transition(current, requested)
        with pytest.raises(IllegalTransitionError) as raised:
            transition(job, requested)
        assert job.status is current, (current, requested)
        assert raised.value.current == current.value
        assert raised.value.requested == requested.value
        phrase = STATE_PHRASES.get(current.value, f"is {current.value}")  # "has failed", ...
        assert f"job 7 {phrase}" in str(raised.value)


def test_groups() -> None:
    assert ACTIVE.isdisjoint(TERMINAL)
    assert set(JobStatus) == ACTIVE | TERMINAL
    assert RUNNABLE <= ACTIVE
    # Only succeeded is final for good; the other terminal states have an admin edge out.
    assert [s for s in TERMINAL if not ALLOWED_TRANSITIONS[s]] == [S.SUCCEEDED]


def test_status_values_are_stable_strings() -> None:
    # Stored in the database and printed by the CLI: renaming one needs a migration.
    assert [s.value for s in JobStatus] == [
        "planned",
        "pending_approval",
        "approved",
        "running",
        "succeeded",
        "failed",
        "skipped",
        "rejected",
    ]
