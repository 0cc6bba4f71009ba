"""The daemon: an APScheduler interval job around one ``run_once`` pass.

The scheduler is thin (STYLE.md): it calls the same pass that ``migrator tick`` and the tests
call, one at a time (``max_instances=1``, ``coalesce=True``), catches and logs what goes wrong,
and keeps going through registry and database outages. SIGTERM/SIGINT ask the pass in flight to
stop claiming new jobs; the job in hand finishes (or, on a second signal, its lease is released
and the process exits).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from types import FrameType
from typing import Any

from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_MISSED, JobExecutionEvent
from apscheduler.schedulers.background import BackgroundScheduler

__all__ = ["Daemon", "StopToken"]

log = logging.getLogger(__name__)
_JOB_ID = "migrator-poll"


class StopToken:
    """Shared stop request: the pass checks it between jobs and stops claiming new work."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.forced = False

    def request(self) -> None:
        self._event.set()

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._event.wait(timeout)


class Daemon:
    """Runs ``tick`` every ``interval_s`` seconds until stopped.

    Args:
        tick: one full pass (it receives the stop token); exceptions are logged, not raised.
        interval_s: seconds between passes.
        on_forced_stop: called on a second signal, before exiting, to release held leases.
    """

    def __init__(
        self,
        tick: Callable[[StopToken], Any],
        interval_s: float,
        *,
        on_forced_stop: Callable[[], None] | None = None,
    ) -> None:
        self.tick = tick
        self.interval_s = interval_s
        self.on_forced_stop = on_forced_stop
        self.stop = StopToken()
        self.passes = 0
        self.failures = 0
        self._running = threading.Lock()
        self._poll_again = threading.Event()
        self.scheduler = BackgroundScheduler(timezone=UTC)

    def _run_pass(self) -> None:
        with self._running:
            self._poll_again.clear()
            started = time.monotonic()
            try:
                result = self.tick(self.stop)
                self.passes += 1
                log.info("pass done in %.1fs: %s", time.monotonic() - started, result)
            except Exception as exc:
                self.failures += 1
                log.error(
                    "pass failed (%s: %s); next attempt in %.0fs",
                    type(exc).__name__,
                    exc,
                    self.interval_s,
                    exc_info=log.isEnabledFor(logging.DEBUG),
                )
        if self._poll_again.is_set() and not self.stop.requested:
            self.poll_now()

    def poll_now(self) -> None:
        """Ask for a pass as soon as possible (the webhook calls this)."""
        if self._running.locked():
            self._poll_again.set()  # picked up when the pass in flight ends
            return
        job = self.scheduler.get_job(_JOB_ID)
        if job is not None:
            job.modify(next_run_time=datetime.now(UTC))

    def _on_event(self, event: JobExecutionEvent) -> None:
        if event.code == EVENT_JOB_MISSED:
            log.debug("a pass was skipped: the previous one was still running")
        elif event.exception is not None:
            log.error("scheduler job error: %s", event.exception)

    def _handle_signal(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.stop.requested:
            log.warning("%s again: releasing leases and exiting now", name)
            self.stop.forced = True
            if self.on_forced_stop is not None:
                self.on_forced_stop()
            raise SystemExit(130)
        log.info("%s: finishing the job in hand, then stopping (signal again to force)", name)
        self.stop.request()

    def run_forever(self, *, install_signals: bool = True) -> None:
        """Start the schedule (first pass immediately) and block until a stop is requested."""
        if install_signals:
            signal.signal(signal.SIGTERM, self._handle_signal)
            signal.signal(signal.SIGINT, self._handle_signal)
        self.scheduler.add_listener(self._on_event, EVENT_JOB_ERROR | EVENT_JOB_MISSED)
        self.scheduler.add_job(
            self._run_pass,
            "interval",
            seconds=self.interval_s,
            id=_JOB_ID,
            max_instances=1,
            coalesce=True,
            misfire_grace_time=None,
            next_run_time=datetime.now(UTC),
        )
        self.scheduler.start()
        log.info("daemon started: a pass every %.0fs", self.interval_s)
        try:
            while not self.stop.wait(0.5):
                pass
        finally:
            self.scheduler.shutdown(wait=True)  # the pass in flight sees the token and ends
            log.info("daemon stopped after %d passes (%d failed)", self.passes, self.failures)
