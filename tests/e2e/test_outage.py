"""The registry goes away while the daemon runs: it logs the failure, keeps running, and finishes
the work once the registry is back.

A dedicated ``mlflow server`` (own port, backend file and artifacts folder) is stopped and then
started again on the same port with the same files; the session server is not touched.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from db import approve, make_engine, session_scope
from migrator.registry import Tag, VersionRef
from migrator.registry.mlflow_registry import MlflowRegistry
from tests.e2e.conftest import StartDaemon, SyntheticFiles
from tests.e2e.harness import jobs_table, migrator_env, read_jobs, wait_for
from tests.e2e.test_crash_recovery import check_one_version_per_job
from tests.fixtures.mlflow import MlflowServer
from tests.migrator.scenario import register

pytestmark = [pytest.mark.e2e, pytest.mark.mlflow_server, pytest.mark.slow]


def test_daemon_survives_a_registry_outage(
    synthetic: SyntheticFiles,
    own_mlflow_server: MlflowServer,
    start_daemon: StartDaemon,
    tmp_path: Path,
) -> None:
    registry = MlflowRegistry(own_mlflow_server.url, retries=2, backoff_s=0.5)
    database = f"sqlite:///{tmp_path / 'jobs.db'}"
    # Every transfer waits for an admin, so that approved work is in hand during the outage.
    env = migrator_env(
        data_dir=tmp_path / "data",
        tracking_uri=own_mlflow_server.url,
        database_url=database,
        auto_approve_atc=0.0,
    )
    daemon = start_daemon(env, "daemon")  # it starts up while the registry fills

    v1 = register(registry, "enc", synthetic.v1, {Tag.ROLE: "base"})
    lineages = []
    for name, (files, fmt) in synthetic.adapters.items():
        ref = register(
            registry, name, files, {Tag.ROLE: "adapter", Tag.BASE: str(v1), Tag.FORMAT: fmt}
        )
        lineages.append(ref.name)
    register(registry, "enc", synthetic.v2, {Tag.ROLE: "base"})

    def context() -> str:
        return (
            f"{daemon.tail()}\n--- jobs ---\n{jobs_table(database)}\n"
            f"--- server log ---\n{own_mlflow_server.log.read_text(errors='replace')[-2000:]}"
        )

    wait_for(
        lambda: [j.status for j in read_jobs(database)] == ["pending_approval"] * 3,
        timeout_s=90,
        what="three transfers waiting for approval",
        context=context,
        watch=[daemon],
    )

    own_mlflow_server.stop()
    seen = len(daemon.text())
    engine = make_engine(database)
    try:
        with session_scope(engine) as session:
            for job in read_jobs(database):
                approve(job.id, "alice", "during the outage", session=session)
    finally:
        engine.dispose()

    def failures() -> list[str]:
        return [line for line in daemon.text()[seen:].splitlines() if "pass failed" in line]

    wait_for(
        lambda: len(failures()) >= 2,
        timeout_s=60,
        what="the daemon to log two failed passes while the registry is down",
        context=context,
        watch=[daemon],
    )
    assert daemon.alive, context()
    assert "RegistryUnavailableError" in failures()[0], context()
    assert own_mlflow_server.url.removeprefix("http://") in daemon.text()[seen:], context()
    # The approved work waits: nothing was claimed, failed or retried meanwhile.
    assert [(j.status, j.attempts) for j in read_jobs(database)] == [("approved", 0)] * 3, context()

    own_mlflow_server.start()  # same port, backend file and artifacts folder
    wait_for(
        lambda: [j.status for j in read_jobs(database)] == ["succeeded"] * 3,
        timeout_s=90,
        what="the approved transfers to complete once the registry is back",
        context=context,
        watch=[daemon],
    )
    assert daemon.alive, context()
    check_one_version_per_job(registry, database, lineages, context())
    for job in read_jobs(database):
        assert job.attempts == 1, context()
        assert job.result_ref is not None
        version = registry.get_version(VersionRef.parse(job.result_ref))
        assert version.tags[Tag.APPROVED_BY] == "alice"
    assert daemon.terminate() == 0, context()
