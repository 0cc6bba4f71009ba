"""Engines, sessions and the transaction boundary.

SQLite is the embedded single-process default; PostgreSQL is for several daemon replicas. On
SQLite every transaction starts with ``BEGIN IMMEDIATE``: it takes the database's single write
lock up front (waiting up to the busy timeout), so a transaction that reads and then writes can
never fail half-way with ``SQLITE_BUSY``, and two processes that claim jobs are serialised
instead of both seeing the same runnable row. WAL keeps readers of committed data unblocked.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import URL, Engine, create_engine, event, make_url
from sqlalchemy.orm import Session, sessionmaker

__all__ = [
    "SQLITE_IMMEDIATE_FLAG",
    "make_engine",
    "make_session_factory",
    "normalize_url",
    "session_scope",
]

#: Set in a SQLite connection's ``info`` by :func:`make_engine`: its transactions begin
#: IMMEDIATE. :func:`db.leases.claim` refuses SQLite connections without it.
SQLITE_IMMEDIATE_FLAG = "migrator_begin_immediate"


def normalize_url(url: str | URL) -> URL:
    """Parse a database URL; a bare ``postgresql://`` gets the installed psycopg 3 driver."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def make_engine(
    url: str | URL,
    *,
    busy_timeout_s: float = 30.0,
    sqlite_foreign_keys: bool = True,
    echo: bool = False,
) -> Engine:
    """An engine configured for the job database.

    Args:
        url: SQLAlchemy URL (``sqlite:///path.db`` or ``postgresql+psycopg://...``).
        busy_timeout_s: SQLite only: how long to wait for the write lock before failing.
        sqlite_foreign_keys: SQLite only: enforce foreign keys (migrations turn it off, as
            alembic's batch mode recreates tables).
        echo: log every statement.

    Returns:
        The engine. SQLite: WAL journal, foreign keys on, busy timeout, ``BEGIN IMMEDIATE``.
        PostgreSQL: ``pool_pre_ping`` so a restarted server costs one retry, not an error.
    """
    parsed = normalize_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(parsed, pool_pre_ping=True, echo=echo)

    engine = create_engine(parsed, echo=echo, connect_args={"timeout": busy_timeout_s})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, record: Any) -> None:
        # Take transaction control away from the sqlite3 module (it would BEGIN lazily and
        # DEFERRED); the "begin" hook below emits our own BEGIN.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = NORMAL")
            cursor.execute(f"PRAGMA foreign_keys = {'ON' if sqlite_foreign_keys else 'OFF'}")
        finally:
            cursor.close()
        record.info[SQLITE_IMMEDIATE_FLAG] = True

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """A session factory whose objects stay readable after commit (``expire_on_commit=False``)."""
    return sessionmaker(bind=engine, expire_on_commit=False)


@contextmanager
def session_scope(bind: Engine | sessionmaker[Session]) -> Iterator[Session]:
    """One transaction: commit when the block ends normally, roll back when it raises.

    Args:
        bind: an engine (a session with ``expire_on_commit=False`` is made) or a factory.

    Yields:
        The session. Query and command functions in ``db`` flush but never commit; this is the
        only place that does.
    """
    session = bind() if isinstance(bind, sessionmaker) else Session(bind, expire_on_commit=False)
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
