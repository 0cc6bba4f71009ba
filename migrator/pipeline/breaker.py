"""The pass's circuit breaker: the first sign that the registry or the job database is
unreachable ends the pass, and nothing it was doing is counted against a job.

An outage is not a fault of the job in hand: its work is given back (:func:`db.leases.release`
refunds the attempt), the jobs queued behind it are released unstarted, no new batch is claimed,
and the pass ends with the reason (``migrator tick`` exits 1 and says so; the daemon logs it and
tries again on its next pass). Only faults of a job's own content spend its attempts.

A job that cannot be released because the database itself is away is remembered here and
released at the start of the next pass of this process (:meth:`Breaker.take_unreleased`).
"""

from __future__ import annotations

import threading

from sqlalchemy.exc import DBAPIError, OperationalError

from migrator.registry import RegistryUnavailableError

__all__ = ["Breaker", "outage_reason"]


def outage_reason(exc: BaseException) -> str | None:
    """``registry unreachable: ...`` or ``job database unreachable: ...`` when ``exc`` says a
    service is away (not the job's fault); None for anything else."""
    if isinstance(exc, RegistryUnavailableError):
        return f"registry unreachable: {_first_line(exc)}"
    if isinstance(exc, OperationalError) or (
        isinstance(exc, DBAPIError) and exc.connection_invalidated
    ):
        return f"job database unreachable: {_first_line(exc.orig or exc)}"
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


class Breaker:
    """Open (work goes on) until :meth:`trip`; :meth:`reset` at the start of each pass."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reason: str | None = None
        self._unreleased: set[int] = set()

    @property
    def reason(self) -> str | None:
        """Why the pass ends early (None: it does not)."""
        return self._reason

    @property
    def tripped(self) -> bool:
        return self._reason is not None

    def trip(self, reason: str) -> None:
        """End the pass; the first reason is kept."""
        with self._lock:
            if self._reason is None:
                self._reason = reason

    def reset(self) -> None:
        """A new pass: closed again (jobs still to release are kept)."""
        with self._lock:
            self._reason = None

    def keep_unreleased(self, job_id: int) -> None:
        """A job held by this process that could not be given back (the database was away)."""
        with self._lock:
            self._unreleased.add(job_id)

    def take_unreleased(self) -> list[int]:
        """The jobs to give back now (forgotten here: a failure keeps them again)."""
        with self._lock:
            ids, self._unreleased = sorted(self._unreleased), set()
        return ids
