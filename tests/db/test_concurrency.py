"""Two worker processes claim from one database: every job exactly once, also across a crash."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from db import JobStatus, list_jobs, session_scope
from tests.db.seed import seed_runnable_jobs

REPOSITORY = Path(__file__).resolve().parents[2]


def _spawn(url: str, worker: str, out: Path, *extra: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(REPOSITORY)}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.db.claim_worker",
            "--url",
            url,
            "--worker",
            worker,
            "--out",
            str(out),
            *extra,
        ],
        cwd=REPOSITORY,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _events(out: Path, kind: str) -> list[int]:
    lines = out.read_text().splitlines() if out.exists() else []
    return [int(line.split()[1]) for line in lines if line.startswith(kind + " ")]


def _wait_for(predicate, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _finish(process: subprocess.Popen[bytes]) -> None:
    try:
        _, stderr = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    assert process.returncode == 0, stderr.decode()


def test_two_processes_claim_each_job_exactly_once(
    migrated_url: str, factory: sessionmaker[Session], tmp_path: Path
) -> None:
    with session_scope(factory) as session:
        job_ids = seed_runnable_jobs(session, 200)
    start = tmp_path / "go"
    outs = {name: tmp_path / f"{name}.log" for name in ("a", "b")}
    workers = [
        _spawn(migrated_url, name, out, "--start-file", str(start)) for name, out in outs.items()
    ]
    try:
        _wait_for(
            lambda: (
                all("ready" in out.read_text() for out in outs.values() if out.exists())
                and all(out.exists() for out in outs.values())
            )
        )
        start.touch()  # both start claiming together
        for worker in workers:
            _finish(worker)
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()

    claims = {name: _events(out, "claim") for name, out in outs.items()}
    done = {name: _events(out, "done") for name, out in outs.items()}
    everything = claims["a"] + claims["b"]
    assert claims["a"] and claims["b"], "both workers must have taken part"
    duplicates = [job for job, n in Counter(everything).items() if n > 1]
    assert duplicates == []
    assert sorted(everything) == sorted(job_ids)  # none missed
    assert sorted(done["a"] + done["b"]) == sorted(job_ids)
    with session_scope(factory) as session:
        jobs = list_jobs(session=session)
        assert {job.status for job in jobs} == {JobStatus.SUCCEEDED}
        assert {job.attempts for job in jobs} == {1}
        by_worker = Counter(job.mlflow_run_id for job in jobs)
        assert by_worker == {"run-a": len(claims["a"]), "run-b": len(claims["b"])}


def test_a_killed_workers_job_is_reclaimed_and_finishes_once(
    migrated_url: str, factory: sessionmaker[Session], tmp_path: Path
) -> None:
    with session_scope(factory) as session:
        job_ids = seed_runnable_jobs(session, 3)
    out_a, out_b = tmp_path / "a.log", tmp_path / "b.log"
    hanging = _spawn(migrated_url, "a", out_a, "--hang", "--lease", "1")
    try:
        _wait_for(lambda: bool(_events(out_a, "claim")))
    finally:
        hanging.send_signal(signal.SIGKILL)
        hanging.wait(timeout=10)
    (stranded,) = _events(out_a, "claim")
    assert stranded == job_ids[0]
    with session_scope(factory) as session:
        held = [job for job in list_jobs(statuses={JobStatus.RUNNING}, session=session)]
        assert [(job.id, job.lease_owner) for job in held] == [(stranded, "a")]

    survivor = _spawn(migrated_url, "b", out_b, "--lease", "30")
    _finish(survivor)

    assert _events(out_a, "done") == []
    claims_b = _events(out_b, "claim")
    assert Counter(claims_b) == Counter(job_ids)  # the stranded job reclaimed, once
    assert Counter(_events(out_b, "done")) == Counter(job_ids)
    with session_scope(factory) as session:
        jobs = {job.id: job for job in list_jobs(session=session)}
        assert {job.status for job in jobs.values()} == {JobStatus.SUCCEEDED}
        assert (jobs[stranded].attempts, jobs[stranded].mlflow_run_id) == (2, "run-b")
        assert {jobs[j].attempts for j in job_ids[1:]} == {1}
