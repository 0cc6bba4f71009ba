"""The job database as the service uses it: create the embedded one, refuse a stale schema,
wait for a database that is not up yet, count what an operator watches."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from sqlalchemy import inspect
from sqlalchemy.exc import OperationalError

from db import count_by_status, duplicate_events, make_engine, migrations, session_scope
from migrator.daemon import StopToken

__all__ = ["ensure_sqlite_parent", "health_counts", "prepare_database", "wait_for_database"]

log = logging.getLogger(__name__)


def ensure_sqlite_parent(url: str) -> None:
    """Create the folder of a SQLite database file (SQLite creates the file, not its folder)."""
    if url.startswith("sqlite:///") and not url.startswith("sqlite:///:memory:"):
        Path(url[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)


def prepare_database(url: str) -> None:
    """Make the database ready to use, or say why not.

    An empty embedded SQLite database is created at head (nothing to lose, nobody to ask); any
    other database must already be at head (``migrator db upgrade``).

    Raises:
        DatabaseNotAtHeadError: a database at another revision.
        OperationalError: the database cannot be reached.
    """
    ensure_sqlite_parent(url)
    if url.startswith("sqlite") and migrations.current(url) is None:
        engine = make_engine(url)
        try:
            empty = not inspect(engine).get_table_names()
        finally:
            engine.dispose()
        if empty:
            log.info("creating the job database %s", url)
            migrations.upgrade(url)
    migrations.ensure_at_head(url)


def wait_for_database(url: str, stop: StopToken, *, first_delay_s: float = 1.0) -> bool:
    """Retry :func:`prepare_database` with backoff while the database is unreachable.

    Returns:
        True once ready; False if a stop was requested first.
    """
    delay = first_delay_s
    while True:
        try:
            prepare_database(url)
            return True
        except OperationalError as exc:
            log.warning(
                "job database unreachable (%s); retrying in %.0fs",
                str(exc.orig).splitlines()[0],
                delay,
            )
        if stop.wait(delay):
            return False
        delay = min(delay * 2, 60.0)
        time.sleep(0)


def health_counts(url: str) -> dict[str, Any]:
    """What ``migrator health`` adds to the heartbeat: jobs per status, jobs failed for good
    (waiting for ``migrator jobs retry``), duplicate versions the reconciler marked. An
    unreachable database is reported, not raised: liveness is the heartbeat's to say.

    Returns:
        ``{"jobs": {status: n}, "failed_jobs": n, "duplicates_marked": n}``, or
        ``{"jobs": None, "database_error": "..."}``.
    """
    engine = make_engine(url, busy_timeout_s=5)
    try:
        with session_scope(engine) as session:
            counts = {str(status): n for status, n in count_by_status(session=session).items()}
            marked = len(duplicate_events(session=session))
    except Exception as exc:  # unreachable, or not migrated yet
        first = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        return {"jobs": None, "database_error": first[0] if first else type(exc).__name__}
    finally:
        engine.dispose()
    return {"jobs": counts, "failed_jobs": counts["failed"], "duplicates_marked": marked}
