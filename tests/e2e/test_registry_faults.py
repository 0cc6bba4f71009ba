"""A real ``mlflow server`` behind a relay that injects the registry's faults on the network,
and ``migrator tick`` passes against it:

* the reply of ``create_model_version`` is held past the client's timeout (the server has
  committed): exactly one version per job, and a duplicate pair registered beforehand is
  resolved by the reconciler with an audit row;
* the registry dies in the middle of an adapter download: the pass ends, says the registry was
  unreachable, exits 1, and no job changes state or spends an attempt; the next pass, with the
  registry back, registers everything.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from db import approve, duplicate_events, make_engine, session_scope
from migrator.registry import ModelVersionInfo, Tag, VersionRef
from migrator.registry.mlflow_registry import MlflowRegistry
from tests.e2e.conftest import SyntheticFiles
from tests.e2e.harness import jobs_table, migrator_env, read_jobs, run_cli
from tests.e2e.test_crash_recovery import check_one_version_per_job
from tests.fixtures.mlflow import MlflowServer
from tests.fixtures.relay import Relay
from tests.migrator.scenario import register

pytestmark = [pytest.mark.e2e, pytest.mark.mlflow_server, pytest.mark.slow]

CREATE = "POST /api/2.0/mlflow/model-versions/create"
TIMEOUT_S = 5  # the migrator's MLflow client gives up on a reply after this long


@pytest.fixture
def relay(own_mlflow_server: MlflowServer) -> Iterator[Relay]:
    relay = Relay(own_mlflow_server.port).start()
    yield relay
    relay.stop()


def _story(registry: MlflowRegistry, synthetic: SyntheticFiles) -> list[VersionRef]:
    """Base enc/1 with three adapters, then its successor enc/2; returns the adapters."""
    v1 = register(registry, "enc", synthetic.v1, {Tag.ROLE: "base"})
    adapters = [
        register(registry, name, files, {Tag.ROLE: "adapter", Tag.BASE: str(v1), Tag.FORMAT: fmt})
        for name, (files, fmt) in synthetic.adapters.items()
    ]
    register(registry, "enc", synthetic.v2, {Tag.ROLE: "base"})
    return adapters


def _env(tmp_path: Path, relay: Relay, database: str, **settings: object) -> dict[str, str]:
    env = migrator_env(
        data_dir=tmp_path / "data", tracking_uri=relay.url, database_url=database, **settings
    )
    env["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(TIMEOUT_S)
    return env


def _transferred(registry: MlflowRegistry, lineages: list[str]) -> list[ModelVersionInfo]:
    return [
        v
        for v in registry.list_versions(role="adapter")
        if v.name in lineages and Tag.JOB in v.tags
    ]


def test_a_create_whose_reply_is_lost_registers_once_and_doubles_are_resolved(
    synthetic: SyntheticFiles, own_mlflow_server: MlflowServer, relay: Relay, tmp_path: Path
) -> None:
    direct = MlflowRegistry(own_mlflow_server.url, retries=2, backoff_s=0.5)
    lineages = [ref.name for ref in _story(direct, synthetic)]
    database = f"sqlite:///{tmp_path / 'jobs.db'}"
    env = _env(tmp_path, relay, database)
    relay.hold_reply(CREATE, seconds=TIMEOUT_S + 3)  # the first registration: committed, lost

    tick = run_cli(["tick", "--json"], env, timeout_s=180)

    def context() -> str:
        return f"{tick.describe()}\n--- jobs ---\n{jobs_table(database)}"

    assert relay.held == 1, context()
    assert tick.returncode == 0, context()
    check_one_version_per_job(direct, database, lineages, context())
    assert "register a version of" in tick.stderr, context()  # the try whose reply was lost

    # A duplicate pair that is already there (made by an older release, or another database).
    kept = _transferred(direct, lineages)[0]
    copy = direct.client.create_model_version(
        kept.name, kept.source, run_id=kept.run_id, tags=dict(kept.tags)
    )
    doubled = VersionRef(kept.name, str(copy.version))
    again = run_cli(["tick", "--json"], env, timeout_s=180)
    assert again.returncode == 0, again.describe()
    assert again.json()["duplicates"] == [
        {"version": str(doubled), "duplicate_of": str(kept.ref)}
    ], again.describe()
    assert direct.get_version(doubled).tags[Tag.DUPLICATE_OF] == str(kept.ref)
    assert Tag.DUPLICATE_OF not in direct.get_version(kept.ref).tags
    engine = make_engine(database)
    try:
        with session_scope(engine) as session:
            (event,) = duplicate_events(session=session)
            assert (event.name, event.version, event.kept_version) == (
                kept.name,
                doubled.version,
                kept.ref.version,
            )
            assert event.job_tag == kept.tags[Tag.JOB] and "doubles" in (event.reason or "")
    finally:
        engine.dispose()
    health = run_cli(["health", "--json"], env).json()
    assert health["duplicates_marked"] == 1 and health["failed_jobs"] == 0, health
    unmarked = [v for v in _transferred(direct, lineages) if Tag.DUPLICATE_OF not in v.tags]
    assert sorted(str(v.ref) for v in unmarked) == sorted(j.result_ref for j in read_jobs(database))


def test_a_registry_that_dies_mid_download_ends_the_pass_and_fails_nothing(
    synthetic: SyntheticFiles, own_mlflow_server: MlflowServer, relay: Relay, tmp_path: Path
) -> None:
    direct = MlflowRegistry(own_mlflow_server.url, retries=2, backoff_s=0.5)
    adapters = _story(direct, synthetic)
    lineages = [ref.name for ref in adapters]
    database = f"sqlite:///{tmp_path / 'jobs.db'}"
    env = _env(tmp_path, relay, database, auto_approve_atc=0.0)
    planned = run_cli(["tick"], env, timeout_s=180)  # assessed and planned: waiting for alice
    assert planned.returncode == 0, planned.describe()
    engine = make_engine(database)
    try:
        with session_scope(engine) as session:
            for job in read_jobs(database):
                approve(job.id, "alice", "checked", session=session)
    finally:
        engine.dispose()
    before = [(j.id, j.status, j.attempts) for j in read_jobs(database)]
    assert [s for _, s, _ in before] == ["approved"] * 3

    for ref in adapters:  # whichever adapter is downloaded first: the registry dies mid-file
        run_id = direct.get_version(ref).run_id
        relay.cut_reply(f"/{run_id}/artifacts/files/", after_bytes=2000)
    cut = run_cli(["tick"], env, timeout_s=180)

    def context() -> str:
        return f"{cut.describe()}\n--- jobs ---\n{jobs_table(database)}"

    assert relay.cuts == 1, context()
    assert cut.returncode == 1, context()
    assert "registry unreachable" in cut.stderr, context()
    assert "ensure that the path is correct" not in cut.stderr, context()
    assert "VersionNotFoundError" not in cut.stderr, context()
    assert "pass ended early" in cut.stderr, context()
    assert [(j.id, j.status, j.attempts) for j in read_jobs(database)] == before, context()
    assert _transferred(direct, lineages) == [], context()

    relay.clear_rules()
    relay.up()  # the registry is back
    resumed = run_cli(["tick", "--json"], env, timeout_s=180)
    assert resumed.returncode == 0, resumed.describe()
    check_one_version_per_job(direct, database, lineages, resumed.describe())
    assert [j.attempts for j in read_jobs(database)] == [1, 1, 1]
