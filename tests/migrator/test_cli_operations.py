"""The admin CLI as an operator meets it: compact tables at 80 columns, read-only commands
that create nothing, "not found" messages that say where they looked, plain wording, help
without placeholders, and start-up that does not load the heavy stack."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from db import JobStatus, audit_trail, list_jobs, migrations, session_scope
from migrator.database import ensure_sqlite_parent
from migrator.pipeline import run_once
from migrator.registry import Tag
from migrator.registry.memory import MemoryRegistry
from migrator.settings import load_settings
from migrator.wiring import build_context
from tests.e2e.harness import CliResult, migrator_env, run_cli
from tests.fixtures.mlflow import MlflowStore
from tests.migrator.scenario import Story, register, successor, write_weights

HEAVY = ("torch", "ot", "mlflow", "transformers", "diffusers", "peft", "ray")


@dataclass(frozen=True)
class NineJobs:
    """A job database holding nine jobs: three succeeded, three pending, three skipped."""

    root: Path
    database_url: str
    ids: dict[str, list[int]]  # status -> job ids

    def env(self, **settings: object) -> dict[str, str]:
        values: dict[str, object] = {"data_dir": self.root / "data", **settings}
        return migrator_env(
            tracking_uri=f"sqlite:///{self.root / 'no-mlflow.db'}",
            database_url=self.database_url,
            **values,  # type: ignore[arg-type]
        )


@pytest.fixture(scope="module")
def nine_jobs(tmp_path_factory: pytest.TempPathFactory) -> NineJobs:
    root = tmp_path_factory.mktemp("nine-jobs")
    registry = MemoryRegistry(root / "registry")
    settings = load_settings(
        data_dir=root / "data",
        tracking_uri="sqlite:///unused.db",
        similarity_rank=8,
        auto_approve_atc=0.01,
        max_atc=0.5,
    )
    url = settings.database_url.get_secret_value()
    ensure_sqlite_parent(url)
    migrations.upgrade(url)
    story = Story(root / "story", registry, base_name="minilm-docs")
    story.register_v1_with_adapters()
    story.register_successors()
    mid = write_weights(root / "mid", successor(story.v1, eps=0.5))
    register(registry, "minilm-docs-mid", mid, {Tag.ROLE: "base", Tag.SUPERSEDES: "minilm-docs/1"})
    ctx = build_context(settings, registry)
    run_once(ctx)
    with session_scope(ctx.sessions) as session:
        jobs = list_jobs(session=session)
        ids: dict[str, list[int]] = {}
        for job in jobs:
            ids.setdefault(job.status.value, []).append(job.id)
    assert sorted(len(v) for v in ids.values()) == [3, 3, 3], ids
    return NineJobs(root, url, ids)


def _cli(args: list[str], env: dict[str, str], cwd: Path | None = None) -> CliResult:
    return run_cli(args, {**env, "COLUMNS": "80"}, cwd=cwd)


def test_jobs_list_fits_80_columns(nine_jobs: NineJobs) -> None:
    listed = _cli(["jobs", "list"], nine_jobs.env())
    assert listed.returncode == 0, listed.describe()
    lines = listed.stdout.rstrip("\n").splitlines()
    assert len(lines) <= 12, listed.stdout
    assert max(len(line) for line in lines) <= 80, listed.stdout
    assert len([line for line in lines[1:] if line.strip()]) == 9
    assert "…" in listed.stdout  # names shortened in the middle, not broken over lines
    assert "minilm-docs-kohyaC/1" not in listed.stdout

    wide = _cli(["jobs", "list", "--wide"], nine_jobs.env())
    assert wide.returncode == 0, wide.describe()
    assert "minilm-docs-kohyaC/1" in wide.stdout and "POLICY SAID" in wide.stdout
    docs = _cli(["jobs", "list", "--json"], nine_jobs.env()).json()
    assert len(docs) == 9 and {"id", "status", "policy_decision", "decision"} <= set(docs[0])


def test_read_only_commands_create_nothing(tmp_path: Path, nine_jobs: NineJobs) -> None:
    env = {k: v for k, v in nine_jobs.env().items() if not k.startswith("MIGRATOR_")}
    cwd = tmp_path / "somewhere"
    cwd.mkdir()
    for args in (["approvals", "list"], ["jobs", "list"], ["jobs", "show", "1"], ["lineage", "x"]):
        result = _cli(args, env, cwd=cwd)
        assert result.returncode == 2, result.describe()
        assert "no job database at .migrator/migrator.db" in result.stderr, result.describe()
    check = _cli(["db", "check"], env, cwd=cwd)
    assert check.returncode == 1 and "no job database" in check.stdout, check.describe()
    assert list(cwd.iterdir()) == []


def test_not_found_says_where_it_looked(nine_jobs: NineJobs) -> None:
    env = nine_jobs.env()
    missing = _cli(["lineage", "minilm-docs-styleX"], env)
    assert missing.returncode == 2, missing.describe()
    message = missing.stderr
    assert nine_jobs.database_url in message and "no-mlflow.db" in message, message
    assert "did you mean: minilm-docs-styleA" in message, message
    job = _cli(["jobs", "show", "4242"], env)
    assert job.returncode == 2 and nine_jobs.database_url in job.stderr, job.describe()
    assert "it holds jobs 1 to 9" in job.stderr, job.describe()


def test_admin_wording_and_repeated_approval(nine_jobs: NineJobs) -> None:
    env = nine_jobs.env()
    done = nine_jobs.ids["succeeded"][0]
    retried = _cli(["jobs", "retry", str(done)], env)
    assert retried.returncode == 2, retried.describe()
    assert f"cannot retry job {done}: it has succeeded" in retried.stderr, retried.describe()
    assert "is succeeded" not in retried.stderr

    pending = nine_jobs.ids["pending_approval"][0]
    first = _cli(["approvals", "approve", str(pending), "--by", "alice"], env)
    assert first.returncode == 0, first.describe()
    again = _cli(["approvals", "approve", str(pending), "--by", "bob"], env)
    assert again.returncode == 0, again.describe()
    assert "approved already" in again.stdout and "nothing changed" in again.stdout
    shown = _cli(["jobs", "show", str(pending)], env)
    assert shown.returncode == 0, shown.describe()
    assert "status:       approved" in shown.stdout or "status: approved" in " ".join(
        shown.stdout.split()
    ), shown.stdout
    flat = " ".join(shown.stdout.split())
    assert "decision: approved by alice" in flat, shown.stdout
    assert "policy said: pending_approval" in flat, shown.stdout
    from db import make_engine

    with session_scope(make_engine(nine_jobs.database_url)) as session:
        actors = [e.actor for e in audit_trail(pending, session=session)]
        assert actors == ["policy", "alice"], actors
        job = next(j for j in list_jobs(session=session) if j.id == pending)
        assert job.status is JobStatus.APPROVED


def test_health_reads_as_a_sentence(tmp_path: Path, nine_jobs: NineJobs) -> None:
    env = nine_jobs.env(data_dir=tmp_path)
    none = _cli(["health"], env)
    assert none.returncode == 1 and none.stdout.startswith("unhealthy: no heartbeat"), none.stdout
    (tmp_path / "heartbeat.json").write_text(json.dumps({"at": time.time(), "worker": "w-1"}))
    beat = _cli(["health"], env)
    assert beat.returncode == 0, beat.describe()
    assert beat.stdout.startswith("healthy: last pass") and "by w-1" in beat.stdout
    assert "{" not in beat.stdout


def test_help_has_no_placeholders(nine_jobs: NineJobs) -> None:
    shown = _cli(["jobs", "show", "--help"], nine_jobs.env())
    assert shown.returncode == 0, shown.describe()
    assert "JOB_ID" in shown.stdout
    assert "{job_id}" not in shown.stdout and "<bool>" not in shown.stdout


def _loaded(args: list[str], env: dict[str, str]) -> set[str]:
    """The modules a ``migrator`` command has loaded when it exits (whatever its exit code)."""
    code = (
        "import atexit, sys\n"
        "atexit.register(lambda: sys.stderr.write('\\nLOADED=' + ','.join(sorted("
        "{m.split('.')[0] for m in sys.modules})) + '\\n'))\n"
        "from migrator.cli import main\n"
        f"sys.argv = ['migrator', *{args!r}]\n"
        "main()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    line = next(x for x in done.stderr.splitlines() if x.startswith("LOADED="))
    return set(line.removeprefix("LOADED=").split(","))


def test_start_up_loads_no_heavy_library(nine_jobs: NineJobs) -> None:
    env = nine_jobs.env()
    for args in (
        ["--help"],
        ["transfer", "/nonexistent", "--from", "/a", "--to", "/b", "-o", "/c"],
    ):
        loaded = _loaded(args, env)
        assert "typer" in loaded  # the probe works
        assert not loaded & {*HEAVY, "sqlalchemy", "pydantic_settings", "numpy"}, (args, loaded)
    listed = _loaded(["jobs", "list"], env)
    assert "sqlalchemy" in listed
    assert not listed & set(HEAVY), listed


def test_tick_and_plan_say_how_many_transfers_wait(
    tmp_path: Path, mlflow_store: MlflowStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from migrator.cli import app
    from migrator.registry.mlflow_registry import MlflowRegistry

    env = migrator_env(
        data_dir=tmp_path / "data",
        tracking_uri=mlflow_store.uri,
        database_url=f"sqlite:///{tmp_path / 'jobs.db'}",
        artifact_root=mlflow_store.artifact_root,
        auto_approve_atc=0.0,  # every related transfer waits for a person
    )
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    registry = MlflowRegistry(mlflow_store.uri, artifact_root=mlflow_store.artifact_root)
    story = Story(tmp_path / "story", registry)
    story.register_v1_with_adapters()
    story.register_successors()
    runner = CliRunner()
    first = runner.invoke(app, ["tick"])
    assert first.exit_code == 0, first.output
    assert "3 transfers wait for approval: see `migrator approvals list`" in first.stdout
    for command in ("tick", "plan"):
        again = runner.invoke(app, [command])
        assert again.exit_code == 0, again.output
        assert "nothing new to do; 3 transfers wait for approval" in again.stdout, again.stdout
        assert "nothing to do: no adapter is stranded" not in again.stdout
    doc = json.loads(runner.invoke(app, ["plan", "--json"]).stdout)
    assert doc["waiting_for_approval"] == 3
