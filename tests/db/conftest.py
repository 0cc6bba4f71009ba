"""Fixtures of the job database tests: a database migrated to head on each back end.

Each back end is migrated once per session. SQLite: the migrated file is copied for each test.
PostgreSQL: one migrated database is emptied before each test (``TRUNCATE ... RESTART
IDENTITY``, 0.05 s, where ``CREATE DATABASE`` costs 0.3 s); tests that change the schema use
``db_url`` (a fresh database) instead. The migrations themselves are tested from empty
databases in ``test_migrations.py``.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from db import Base, make_engine, make_session_factory, migrations
from tests.fixtures.postgres import PostgresServer


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sqlite-template") / "jobs.db"
    migrations.upgrade(f"sqlite:///{path}")
    return path


@pytest.fixture(scope="session")
def postgres_migrated(postgres_server: PostgresServer) -> str:
    url = postgres_server.create_database("migrated")
    migrations.upgrade(url)
    return url


def _empty_tables(url: str) -> None:
    tables = ", ".join(table.name for table in Base.metadata.sorted_tables)
    engine = make_engine(url)
    try:
        with engine.begin() as connection:
            connection.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    finally:
        engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def migrated_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A job database at head: a SQLite file, then a PostgreSQL database."""
    if request.param == "sqlite":
        path = tmp_path / "jobs.db"
        shutil.copyfile(request.getfixturevalue("sqlite_template"), path)
        yield f"sqlite:///{path}"
        return
    url = request.getfixturevalue("postgres_migrated")
    _empty_tables(url)  # before, not after: a failed test's rows do not leak into the next
    yield url


@pytest.fixture
def engine(migrated_url: str) -> Iterator[Engine]:
    engine = make_engine(migrated_url)
    yield engine
    engine.dispose()


@pytest.fixture
def factory(engine: Engine) -> sessionmaker[Session]:
    return make_session_factory(engine)
