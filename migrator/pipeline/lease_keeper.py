"""Keeping the leases of the jobs this process runs alive, for every executor.

One background thread renews every held job's lease each ``heartbeat_s``. A job whose lease is
found lost is remembered (:attr:`LeaseKeeper.lost`) and no longer renewed; the executor then
leaves it to its new owner. Callbacks let an executor mirror the state elsewhere:
``on_renewed`` after each renewal, ``on_closed`` once a job is no longer held (lost, dropped, or
the keeper exits); the Ray executor opens and closes its publishing gate with them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable

from db import LeaseLostError, heartbeat, session_scope
from migrator.pipeline.context import Context

__all__ = ["LeaseKeeper"]

log = logging.getLogger(__name__)


class LeaseKeeper:
    """Renews the leases of held jobs in one thread until they are dropped or the keeper exits.

    Args:
        ctx: the pass's context (settings: ``worker_id``, ``lease_s``, ``heartbeat_s``).
        on_renewed: called with a job id after each successful renewal.
        on_closed: called with a job id once it is no longer held (lost, dropped, keeper exit).
    """

    def __init__(
        self,
        ctx: Context,
        *,
        on_renewed: Callable[[int], None] | None = None,
        on_closed: Callable[[int], None] | None = None,
    ) -> None:
        self.ctx = ctx
        self.on_renewed = on_renewed
        self.on_closed = on_closed
        self.lost: dict[int, str] = {}
        self._held: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease-keeper", daemon=True)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        with self._lock:
            held, self._held = list(self._held), set()
        for job_id in held:
            self._notify(self.on_closed, job_id)

    def renew(self, job_id: int) -> None:
        """Renew one lease now. Raises LeaseLostError when the job is no longer ours."""
        s = self.ctx.settings
        with session_scope(self.ctx.sessions) as session:
            heartbeat(job_id, s.worker_id, session=session, lease_seconds=s.lease_s)

    def hold(self, job_ids: Iterable[int]) -> list[int]:
        """Renew these leases now and keep renewing them; returns the ones still ours."""
        kept = []
        for job_id in job_ids:
            if self._renew_or_lose(job_id):
                with self._lock:
                    self._held.add(job_id)
                kept.append(job_id)
        return kept

    def drop(self, job_id: int) -> None:
        """Stop renewing a job (it has ended, or was given back)."""
        with self._lock:
            self._held.discard(job_id)
        self._notify(self.on_closed, job_id)

    def check(self, job_id: int) -> None:
        """Raise LeaseLostError unless the job's lease is still ours (renewing it now)."""
        if job_id not in self.lost:
            self._renew_or_lose(job_id)
        if job_id in self.lost:
            raise LeaseLostError(job_id, self.ctx.settings.worker_id, "unknown", None)

    def _renew_or_lose(self, job_id: int) -> bool:
        try:
            self.renew(job_id)
        except LeaseLostError as exc:
            with self._lock:
                self._held.discard(job_id)
            self.lost[job_id] = str(exc)
            log.warning("job %d: lease lost (%s)", job_id, exc)
            self._notify(self.on_closed, job_id)
            return False
        self._notify(self.on_renewed, job_id)
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.ctx.settings.heartbeat_s):
            with self._lock:
                held = sorted(self._held)
            for job_id in held:
                try:
                    self._renew_or_lose(job_id)
                except Exception as exc:  # database briefly away: try again next beat
                    log.warning("heartbeat of job %d failed: %s", job_id, exc)

    @staticmethod
    def _notify(callback: Callable[[int], None] | None, job_id: int) -> None:
        if callback is None:
            return
        try:
            callback(job_id)
        except Exception as exc:  # a mirror of the lease state; the lease itself is fine
            log.warning("lease callback for job %d failed: %s", job_id, exc)
