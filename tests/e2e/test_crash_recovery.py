"""Crash-point tests (STYLE.md): the daemon is killed while it holds a claimed batch (right after
claiming it, or at a step of its first transfer), restarted, and every job ends with exactly one
registered version; the jobs queued behind the one in hand spend no attempt on the crash. With
``claim_batch`` 1 and 4. The restart is a daemon, or one ``migrator tick --json`` pass.

``MIGRATOR_CRASH_AT=<point>:1`` makes the process ``os._exit(137)`` at ``<point>`` once (the
marker file counts), so the restarted daemon, with the same environment, goes on. A short lease
lets it reclaim the jobs the dead process held.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from migrator.registry import ModelVersionInfo, Tag, VersionRef
from migrator.registry.mlflow_registry import MlflowRegistry
from tests.e2e.conftest import StartDaemon, SyntheticFiles
from tests.e2e.harness import jobs_table, migrator_env, read_jobs, run_cli, wait_for
from tests.fixtures.mlflow import MlflowServer
from tests.migrator.scenario import register

pytestmark = [pytest.mark.e2e, pytest.mark.mlflow_server, pytest.mark.slow]

LEASE_S = 3


def transferred_versions(registry: MlflowRegistry, lineages: list[str]) -> list[ModelVersionInfo]:
    """Every version of these adapter models that a migration registered (has ``lorax.job``)."""
    return [
        v
        for v in registry.list_versions(role="adapter")
        if v.name in lineages and Tag.JOB in v.tags
    ]


def check_one_version_per_job(
    registry: MlflowRegistry, database: str, lineages: list[str], context: str
) -> None:
    """Every job succeeded with its own version; the registry holds exactly those versions, each
    made from its own migration run."""
    jobs = read_jobs(database)
    assert jobs and all(j.status == "succeeded" for j in jobs), context
    results = [j.result_ref for j in jobs]
    assert len(set(results)) == len(jobs), f"results shared between jobs: {results}\n{context}"
    versions = transferred_versions(registry, lineages)
    assert len(versions) == len(jobs), (
        f"{len(versions)} transferred versions for {len(jobs)} jobs: "
        f"{sorted(str(v.ref) for v in versions)}\n{context}"
    )
    by_job = {v.tags[Tag.JOB]: v for v in versions}
    assert len(by_job) == len(versions), f"two versions carry one job id\n{context}"
    client = registry.client
    for job in jobs:
        version = by_job.get(str(job.id))
        assert version is not None, f"no version of job {job.id}\n{context}"
        assert str(version.ref) == job.result_ref, context
        assert version.tags[Tag.TRANSFERRED_FROM] == job.adapter
        assert version.tags[Tag.BASE] == job.target_base
        assert version.run_id is not None and version.run_id == job.mlflow_run_id, context
        run = client.get_run(version.run_id)
        # The run is this job's own (job ids repeat across job databases sharing a registry).
        assert run.data.tags.get(Tag.TRANSFERRED_FROM) == job.adapter, (run.data.tags, context)
        assert run.data.tags.get(Tag.BASE) == job.target_base, (run.data.tags, context)
        assert run.data.params["adapter"] == job.adapter


@pytest.mark.parametrize(
    ("point", "batch"),
    [
        ("after_claim", 4),
        ("mid_transfer", 1),
        ("mid_transfer", 4),
        ("after_register", 1),
        ("after_register", 4),
    ],
)
def test_killed_daemon_restarts_without_losing_or_duplicating(
    point: str,
    batch: int,
    synthetic: SyntheticFiles,
    mlflow_server: MlflowServer,
    server_registry: MlflowRegistry,
    unique: str,
    start_daemon: StartDaemon,
    tmp_path: Path,
) -> None:
    database = f"sqlite:///{tmp_path / 'jobs.db'}"
    env = {
        **migrator_env(
            data_dir=tmp_path / "data",
            tracking_uri=mlflow_server.url,
            database_url=database,
            lease_s=LEASE_S,
            heartbeat_s=1,
            claim_batch=batch,
        ),
        "MIGRATOR_CRASH_AT": f"{point}:1",
        "MIGRATOR_CRASH_MARKER": str(tmp_path / "crash.marker"),
    }
    crashing = start_daemon(env, "crashing")  # it starts up while the registry fills

    registry = server_registry
    base = f"{unique}-enc"
    v1 = register(registry, base, synthetic.v1, {Tag.ROLE: "base"})
    lineages = []
    for name, (files, fmt) in synthetic.adapters.items():
        ref = register(
            registry,
            f"{unique}-{name}",
            files,
            {Tag.ROLE: "adapter", Tag.BASE: str(v1), Tag.FORMAT: fmt},
        )
        lineages.append(ref.name)
    v2 = register(registry, base, synthetic.v2, {Tag.ROLE: "base"})
    assert v2 == VersionRef(base, "2")

    code = crashing.wait_exit(timeout_s=120)
    assert code == 137, crashing.tail()
    assert f"crash point {point}" in crashing.text(), crashing.tail()

    jobs = read_jobs(database)
    assert len(jobs) == 3, jobs_table(database)
    # The batch the dead process held: its first job's work had begun (unless it died right
    # after claiming), the others were queued; jobs past the batch were not claimed.
    started = 0 if point == "after_claim" else 1
    expected = [("running", started)] + [("running", 0)] * (min(batch, 3) - 1)
    expected += [("approved", 0)] * (3 - min(batch, 3))
    assert [(j.status, j.attempts) for j in jobs] == expected, jobs_table(database)
    registered = transferred_versions(registry, lineages)
    if point == "after_register":
        # Registered but not recorded: the window the lineage lookup must cover.
        assert len(registered) == 1, registered
        crashed: int | None = int(registered[0].tags[Tag.JOB])
    else:
        assert registered == []
        crashed = jobs[0].id if started else None

    if point == "after_register":
        restarted = start_daemon(env, "restarted")

        def context() -> str:
            return f"{crashing.tail(30)}\n{restarted.tail()}\n--- jobs ---\n{jobs_table(database)}"

        wait_for(
            lambda: all(j.status == "succeeded" for j in read_jobs(database)),
            timeout_s=120,
            what="every job to succeed after the restart",
            context=context,
            watch=[restarted],
        )
        assert restarted.alive, context()
        before = len(transferred_versions(registry, lineages))
        assert restarted.terminate() == 0, context()
        # Its further passes changed nothing.
        assert len(transferred_versions(registry, lineages)) == before
        restart_log = restarted.text()
    else:
        # The restart is one pass, ``migrator tick --json``, once the dead process's leases ran
        # out (it renewed them every second until it died).
        time.sleep(LEASE_S + 0.5)
        tick = run_cli(["tick", "--json"], env, timeout_s=120)

        def context() -> str:
            return f"{crashing.tail(30)}\n{tick.describe()}\n--- jobs ---\n{jobs_table(database)}"

        assert tick.returncode == 0, context()
        report = tick.json()
        assert sorted((row["job"], row["status"]) for row in report["jobs"]) == [
            (job.id, "succeeded") for job in jobs
        ], context()
        restart_log = tick.stderr

    check_one_version_per_job(registry, database, lineages, context())
    attempts = {j.id: j.attempts for j in read_jobs(database)}
    # The job whose work the crash cut short spent two attempts; every other one, one.
    assert attempts == {j.id: 2 if j.id == crashed else 1 for j in jobs}, (attempts, context())
    if point == "after_register":
        assert "(found registered)" in restart_log, context()
