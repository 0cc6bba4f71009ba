"""The private PostgreSQL fixture: loopback only, and skip versus fail without binaries."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from tests.fixtures.postgres import (
    PostgresServer,
    _find_bin_dir,
    _pid_alive,
    _remove_leftovers,
    _start_server,
)

REPOSITORY = Path(__file__).resolve().parents[2]
PROBE = """
import pytest

@pytest.mark.postgres
def test_needs_postgres(postgres_url):
    assert postgres_url
"""


@pytest.mark.postgres
def test_server_is_private_and_local(postgres_server: PostgresServer) -> None:
    engine = create_engine(postgres_server.url("postgres"))
    try:
        with engine.connect() as connection:
            settings = {
                name: connection.execute(text(f"SHOW {name}")).scalar()
                for name in ("listen_addresses", "port", "unix_socket_directories")
            }
    finally:
        engine.dispose()
    assert settings == {
        "listen_addresses": "127.0.0.1",
        "port": str(postgres_server.port),
        "unix_socket_directories": str(postgres_server.root),
    }


@pytest.mark.postgres
def test_leftovers_of_dead_sessions_are_stopped_and_removed(
    postgres_server: PostgresServer,
) -> None:
    bin_dir = _find_bin_dir()
    assert bin_dir is not None
    orphan = _start_server(bin_dir)
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead_pid = int(gone.stdout)
    assert not _pid_alive(dead_pid)
    (orphan.root / "owner.pid").write_text(str(dead_pid))  # as if its session was killed
    postmaster = int((orphan.data_dir / "postmaster.pid").read_text().split()[0])
    assert _pid_alive(postmaster)

    _remove_leftovers(bin_dir)

    assert not _pid_alive(postmaster)
    assert not orphan.root.exists()
    assert postgres_server.root.exists()  # a live session's server is left alone
    engine = create_engine(postgres_server.url("postgres"))
    try:
        with engine.connect() as connection:
            assert connection.execute(text("SELECT 1")).scalar() == 1
    finally:
        engine.dispose()


def _run_probe(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_probe.py").write_text(PROBE)
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    postgres: needs PostgreSQL\n")
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env.update(PG_BIN=str(tmp_path / "no-postgres-here"), PYTHONPATH=str(REPOSITORY))
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "tests.fixtures.postgres",
            "-q",
            "-rsE",
            "-p",
            "no:cacheprovider",
            "test_probe.py",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_missing_binaries_skip_locally(tmp_path: Path) -> None:
    done = _run_probe(tmp_path, ci=None)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 skipped" in done.stdout
    assert "PostgreSQL server binaries not found" in done.stdout


def test_missing_binaries_fail_under_ci(tmp_path: Path) -> None:
    done = _run_probe(tmp_path, ci="true")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "1 error" in done.stdout
    assert "CI=true requires them" in done.stdout
