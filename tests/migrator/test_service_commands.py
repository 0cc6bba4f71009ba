"""``migrator db check`` and ``migrator health`` through the real command line (in process)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from db import migrations
from migrator.cli import app


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MIGRATOR_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("MIGRATOR_TRACKING_URI", f"sqlite:///{tmp_path / 'unused.db'}")
    monkeypatch.setenv("MIGRATOR_DATABASE_URL", f"sqlite:///{tmp_path / 'jobs.db'}")
    return tmp_path


def test_db_check_names_an_empty_database_as_other_commands_do(env: Path) -> None:
    result = CliRunner().invoke(app, ["db", "check"])
    assert result.exit_code == 1, result.output
    assert "database at revision <empty>" in result.output
    assert "revision none" not in result.output
    doc = json.loads(CliRunner().invoke(app, ["db", "check", "--json"]).stdout)
    assert doc["revision"] is None and "<empty>" in doc["problem"]


def test_health_keeps_its_keys_and_adds_the_counts(env: Path) -> None:
    migrations.upgrade(f"sqlite:///{env / 'jobs.db'}")
    missing = CliRunner().invoke(app, ["health", "--json"])
    assert missing.exit_code == 1  # no heartbeat yet
    doc = json.loads(missing.stdout)
    assert doc["healthy"] is False and "no heartbeat" in doc["reason"]
    assert doc["failed_jobs"] == 0 and doc["duplicates_marked"] == 0

    beat = env / "data" / "heartbeat.json"
    beat.parent.mkdir(parents=True, exist_ok=True)
    beat.write_text(json.dumps({"at": time.time(), "worker": "w1", "pass": "ok"}))
    result = CliRunner().invoke(app, ["health", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert {"healthy", "age_s", "max_age_s", "worker", "last_pass"} <= set(doc)
    assert doc["healthy"] is True and doc["worker"] == "w1" and doc["last_pass_result"] == "ok"
    assert doc["jobs"]["failed"] == 0 and set(doc["jobs"]) >= {"approved", "succeeded"}
