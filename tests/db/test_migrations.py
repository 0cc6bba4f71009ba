"""Migrations: up from empty, down to base, up again; no drift; the revision guard."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import inspect, text

from db import (
    VERSION_TABLE,
    Base,
    DatabaseNotAtHeadError,
    SchemaDriftError,
    make_engine,
    migrations,
)

REPOSITORY = Path(__file__).resolve().parents[2]
OUR_TABLES = {table.name for table in Base.metadata.sorted_tables}


def _tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade(db_url: str) -> None:
    assert migrations.current(db_url) is None
    assert not migrations.is_at_head(db_url)

    migrations.upgrade(db_url)
    assert migrations.current(db_url) == migrations.head()
    assert migrations.is_at_head(db_url)
    assert _tables(db_url) == OUR_TABLES | {VERSION_TABLE}
    migrations.check(db_url)  # no drift
    migrations.upgrade(db_url)  # repeating is a no-op
    assert migrations.current(db_url) == migrations.head()

    migrations.downgrade(db_url, "base")
    assert migrations.current(db_url) is None
    assert _tables(db_url) == {VERSION_TABLE}

    migrations.upgrade(db_url)
    assert migrations.is_at_head(db_url)
    migrations.check(db_url)


def test_own_version_table_leaves_mlflows_alone(db_url: str) -> None:
    # MLflow keeps an ``alembic_version`` table; ours must not read or write it.
    engine = make_engine(db_url)
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE alembic_version (version_num VARCHAR(32))"))
        connection.execute(text("INSERT INTO alembic_version VALUES ('mlflow-rev')"))
    migrations.upgrade(db_url)
    migrations.check(db_url)  # a foreign table is not drift
    with engine.connect() as connection:
        assert connection.execute(text("SELECT version_num FROM alembic_version")).all() == [
            ("mlflow-rev",)
        ]
        assert connection.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).all() == [
            (migrations.head(),)
        ]
    engine.dispose()


def test_check_reports_drift(db_url: str) -> None:
    migrations.upgrade(db_url)
    migrations.check(db_url)
    engine = make_engine(db_url)
    with engine.begin() as connection:
        connection.execute(text("DROP INDEX ix_transfer_jobs_status_next_attempt_at"))
    engine.dispose()
    with pytest.raises(SchemaDriftError) as raised:
        migrations.check(db_url)
    assert "ix_transfer_jobs_status_next_attempt_at" in str(raised.value)


def test_ensure_at_head_names_both_revisions(db_url: str) -> None:
    with pytest.raises(DatabaseNotAtHeadError) as raised:
        migrations.ensure_at_head(db_url)
    expected = migrations.head()
    assert str(raised.value) == (
        f"database at revision <empty>, code expects {expected}: run `migrator db upgrade`"
    )
    with pytest.raises(DatabaseNotAtHeadError):
        migrations.check(db_url)
    migrations.upgrade(db_url)
    migrations.ensure_at_head(db_url)


def test_constraint_names_follow_the_convention(migrated_url: str) -> None:
    engine = make_engine(migrated_url)
    try:
        inspector = inspect(engine)
        for table in Base.metadata.sorted_tables:
            reflected_unique = {uc["name"] for uc in inspector.get_unique_constraints(table.name)}
            reflected_fk = {fk["name"] for fk in inspector.get_foreign_keys(table.name)}
            reflected_ix = {
                ix["name"]
                for ix in inspector.get_indexes(table.name)
                if not ix.get("duplicates_constraint")  # PostgreSQL: a unique constraint's index
            }
            reflected_ck = {ck["name"] for ck in inspector.get_check_constraints(table.name)}
            model = {c.name for c in table.constraints}
            assert {c.name for c in table.indexes} == reflected_ix
            assert reflected_unique | reflected_fk | reflected_ck <= model, table.name
            # every enum column has its CHECK, named ck_<table>_<column>
            for column in table.columns:
                if getattr(column.type, "enums", None):
                    assert f"ck_{table.name}_{column.name}" in reflected_ck
    finally:
        engine.dispose()


def test_alembic_command_line_reads_the_service_setting(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    env = {**os.environ, "MIGRATOR_DATABASE_URL": url}
    alembic = [sys.executable, "-m", "alembic", "-c", str(REPOSITORY / "alembic" / "alembic.ini")]
    done = subprocess.run(
        [*alembic, "upgrade", "head"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert migrations.current(url) == migrations.head()
    done = subprocess.run(
        [*alembic, "check"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "No new upgrade operations detected" in done.stdout


def test_0005_adds_the_watchers_tables_and_keeps_bases_both_ways(db_url: str) -> None:
    migrations.upgrade(db_url, "0004")
    engine = make_engine(db_url)
    try:
        with engine.begin() as connection:
            connection.execute(
                text(
                    "INSERT INTO base_model_versions (name, version, status, discovered_at) "
                    "VALUES ('enc', '1', 'active', CURRENT_TIMESTAMP)"
                )
            )
        migrations.upgrade(db_url)
        assert {"registry_cursors", "registry_marks"} <= _tables(db_url)
        migrations.check(db_url)
        with engine.begin() as connection:
            assert connection.execute(
                text("SELECT name, problem FROM base_model_versions")
            ).all() == [("enc", None)]  # a base recorded before: not opened yet, no problem
            connection.execute(text("UPDATE base_model_versions SET problem = 'no weights'"))
        migrations.downgrade(db_url, "0004")
        assert not {"registry_cursors", "registry_marks"} & _tables(db_url)
        columns = {c["name"] for c in inspect(engine).get_columns("base_model_versions")}
        assert "problem" not in columns and "superseded_by" in columns
        with engine.connect() as connection:
            assert connection.execute(text("SELECT name FROM base_model_versions")).all() == [
                ("enc",)
            ]
    finally:
        engine.dispose()
