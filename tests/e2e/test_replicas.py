"""Two daemon replicas on one PostgreSQL job database and one registry share the work: twenty
adapters are each transferred exactly once (row locks with SKIP LOCKED, leases)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from db import migrations
from migrator.registry import Tag, VersionRef
from migrator.registry.mlflow_registry import MlflowRegistry
from tests.e2e.conftest import StartDaemon, SyntheticFiles
from tests.e2e.harness import DaemonProcess, jobs_table, migrator_env, read_jobs, wait_for
from tests.e2e.test_crash_recovery import check_one_version_per_job, transferred_versions
from tests.fixtures.mlflow import MlflowServer
from tests.migrator.scenario import register

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.mlflow_server,
    pytest.mark.postgres,
    pytest.mark.slow,
]

_DONE = re.compile(r"job (\d+): \S+ -> \S+ on \S+ in ")


def _done_by(daemon: DaemonProcess) -> list[int]:
    """Ids of the jobs this replica carried to the end (its ``job N: ... in Xs`` lines)."""
    return [int(m.group(1)) for m in _DONE.finditer(daemon.text())]


def test_two_replicas_transfer_each_adapter_once(
    synthetic: SyntheticFiles,
    mlflow_server: MlflowServer,
    server_registry: MlflowRegistry,
    postgres_url: str,
    unique: str,
    start_daemon: StartDaemon,
    tmp_path: Path,
) -> None:
    migrations.upgrade(postgres_url)
    replicas = [
        start_daemon(
            migrator_env(
                data_dir=tmp_path / f"data{i}",
                tracking_uri=mlflow_server.url,
                database_url=postgres_url,
                claim_batch=1,  # take turns job by job
            ),
            f"replica{i}",
        )
        for i in range(2)
    ]

    registry = server_registry
    base = f"{unique}-enc"
    v1 = register(registry, base, synthetic.v1, {Tag.ROLE: "base"})
    lineages = [
        register(
            registry,
            f"{unique}-a{i:02d}",
            files,
            {Tag.ROLE: "adapter", Tag.BASE: str(v1), Tag.FORMAT: "lorax"},
        ).name
        for i, files in enumerate(synthetic.lorax_many)
    ]
    assert len(lineages) == 20

    def context() -> str:
        tails = "\n".join(r.tail(40) for r in replicas)
        return f"{tails}\n--- jobs ---\n{jobs_table(postgres_url)}"

    wait_for(
        lambda: all("pass done" in r.text() for r in replicas),
        timeout_s=90,
        what="both replicas to finish a first pass",
        context=context,
        watch=replicas,
    )
    v2 = register(registry, base, synthetic.v2, {Tag.ROLE: "base"})
    assert v2 == VersionRef(base, "2")

    wait_for(
        lambda: (
            (jobs := read_jobs(postgres_url)) != []
            and len(jobs) == 20
            and all(j.status == "succeeded" for j in jobs)
        ),
        timeout_s=180,
        what="20 transfers to succeed",
        context=context,
        watch=replicas,
    )
    assert all(r.alive for r in replicas), context()
    check_one_version_per_job(registry, postgres_url, lineages, context())
    jobs = read_jobs(postgres_url)
    assert {j.adapter for j in jobs} == {f"{name}/1" for name in lineages}
    assert [j.attempts for j in jobs] == [1] * 20, context()
    versions = transferred_versions(registry, lineages)
    assert sorted(v.name for v in versions) == sorted(lineages)  # one new version per lineage
    assert all(v.version == "2" for v in versions)

    done = [_done_by(r) for r in replicas]
    assert sorted(done[0] + done[1]) == sorted(j.id for j in jobs), (done, context())
    assert all(done), f"one replica did all the work: {done}\n{context()}"
    assert "found registered" not in "".join(r.text() for r in replicas), context()
    for replica in replicas:
        assert replica.terminate() == 0, context()
