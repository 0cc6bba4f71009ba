"""Engine configuration, the package surface, and what ``db`` may import."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

import db
from db import make_engine, migrations, normalize_url

REPOSITORY = Path(__file__).resolve().parents[2]


def test_sqlite_engine_pragmas(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'x.db'}", busy_timeout_s=7)
    try:
        with engine.connect() as connection:
            pragmas = {
                name: connection.execute(text(f"PRAGMA {name}")).scalar()
                for name in ("journal_mode", "foreign_keys", "busy_timeout")
            }
        assert pragmas == {"journal_mode": "wal", "foreign_keys": 1, "busy_timeout": 7000}
    finally:
        engine.dispose()


def test_sqlite_transactions_take_the_write_lock_up_front(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    first, second = make_engine(url), make_engine(url, busy_timeout_s=0.2)
    try:
        with first.begin() as held:
            held.execute(text("SELECT 1"))  # a read-only transaction still holds the lock
            with pytest.raises(OperationalError, match="database is locked"), second.connect() as c:
                c.execute(text("SELECT 1"))
        with second.connect() as c:  # released at commit
            assert c.execute(text("SELECT 1")).scalar() == 1
    finally:
        first.dispose()
        second.dispose()


def test_postgres_urls_get_the_installed_driver() -> None:
    assert normalize_url("postgresql://u@h:5/d").drivername == "postgresql+psycopg"
    assert normalize_url("postgresql+psycopg://u@h/d").drivername == "postgresql+psycopg"
    assert normalize_url("sqlite:///x.db").drivername == "sqlite"


def test_migrations_do_not_depend_on_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    migrations.upgrade(url)
    assert migrations.current(url) is not None
    assert migrations.current(url) == migrations.head()
    assert migrations.ALEMBIC_DIR == REPOSITORY / "alembic"


def test_public_surface() -> None:
    assert sorted(db.__all__) == sorted(set(db.__all__))
    missing = [name for name in db.__all__ if not hasattr(db, name)]
    assert missing == []
    assert {"claim", "transition", "JobStatus", "TransferJob", "session_scope"} <= set(db.__all__)


def test_db_imports_neither_the_service_nor_torch() -> None:
    probe = (
        "import sys, db; "
        "bad = sorted(m for m in ('torch', 'migrator', 'mlflow', 'apscheduler', 'core') "
        "if m in sys.modules); print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPOSITORY, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
