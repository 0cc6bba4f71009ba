"""Driving the real ``migrator`` CLI and daemon as subprocesses, and reading what they leave.

Everything here talks to real components: the CLI runs as ``python -m migrator`` in a child
process with ``MIGRATOR_*`` settings in its environment, the job database is read with the
project's own ``db`` queries, and the registry through ``mlflow``'s client.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.exc import OperationalError

from db import list_jobs, make_engine, session_scope

__all__ = [
    "CliResult",
    "DaemonProcess",
    "JobRow",
    "PendingCli",
    "jobs_table",
    "migrator_env",
    "read_jobs",
    "run_cli",
    "run_cli_parallel",
    "wait_for",
]

MIGRATOR = [sys.executable, "-m", "migrator"]
_INHERITED_OUT = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


def migrator_env(
    *,
    data_dir: Path,
    tracking_uri: str,
    database_url: str,
    **settings: object,
) -> dict[str, str]:
    """The environment of a migrator child process: this one's, minus any ``MIGRATOR_*`` it
    happens to carry, plus the given settings (keyword ``lease_s`` -> ``MIGRATOR_LEASE_S``).

    Defaults suit tiny models and short waits: polls every second, k = 8, quick registry and
    job retries, no telemetry, no hub access.
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("MIGRATOR_") and k not in _INHERITED_OUT
    }
    values: dict[str, object] = {
        "data_dir": data_dir,
        "tracking_uri": tracking_uri,
        "database_url": database_url,
        "poll_interval_s": 1,
        "similarity_rank": 8,
        "lease_s": 10,
        "heartbeat_s": 1,
        "registry_retries": 1,
        "registry_backoff_s": 0.2,
        "retry_backoff_s": 1,
        "log_level": "INFO",
        **settings,
    }
    env.update({f"MIGRATOR_{k.upper()}": str(v) for k, v in values.items()})
    env.update(
        {
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
            # Two daemons and the test share two cores: no thread oversubscription.
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
        }
    )
    return env


@dataclass(frozen=True)
class CliResult:
    """A finished CLI command."""

    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        """The one JSON document on stdout (fails the test when stdout holds anything else)."""
        try:
            return json.loads(self.stdout)
        except json.JSONDecodeError as exc:
            raise AssertionError(
                f"`migrator {' '.join(self.args)}` did not print one JSON document ({exc}):\n"
                f"stdout:\n{self.stdout}\nstderr:\n{self.stderr[-3000:]}"
            ) from None

    def describe(self) -> str:
        return (
            f"`migrator {' '.join(self.args)}` exited {self.returncode}\n"
            f"stdout:\n{self.stdout[-3000:]}\nstderr:\n{self.stderr[-3000:]}"
        )


def _start(args: Sequence[str], env: Mapping[str, str], cwd: Path | None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*MIGRATOR, *args],
        env=dict(env),
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _finish(process: subprocess.Popen[str], args: Sequence[str], timeout_s: float) -> CliResult:
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        raise AssertionError(
            f"`migrator {' '.join(args)}` ran over {timeout_s}s\nstderr:\n{stderr[-3000:]}"
        ) from None
    return CliResult(tuple(args), process.returncode, stdout, stderr)


def run_cli(
    args: Sequence[str], env: Mapping[str, str], *, timeout_s: float = 90, cwd: Path | None = None
) -> CliResult:
    """Run one ``migrator`` command to its end."""
    return _finish(_start(args, env, cwd), args, timeout_s)


class PendingCli:
    """A ``migrator`` command started in the background; :meth:`result` waits for it."""

    def __init__(
        self, args: Sequence[str], env: Mapping[str, str], cwd: Path | None = None
    ) -> None:
        self.args = tuple(args)
        self.process = _start(args, env, cwd)

    def result(self, timeout_s: float = 90) -> CliResult:
        return _finish(self.process, self.args, timeout_s)


def run_cli_parallel(
    commands: Sequence[tuple[Sequence[str], Mapping[str, str]]],
    *,
    timeout_s: float = 120,
    cwd: Path | None = None,
) -> list[CliResult]:
    """Run several independent ``migrator`` commands at once (their start-up dominates)."""
    started = [(_start(args, env, cwd), args) for args, env in commands]
    return [_finish(process, args, timeout_s) for process, args in started]


class DaemonProcess:
    """``migrator run`` (or another long command) in its own process group, logging to a file.

    Stop it with :meth:`terminate` (SIGTERM, returns the exit code); :meth:`kill` is the
    finalizer's hammer for whatever is left.
    """

    def __init__(
        self, env: Mapping[str, str], log: Path, *, args: Sequence[str] = ("run",)
    ) -> None:
        self.args = tuple(args)
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            self.process: subprocess.Popen[bytes] = subprocess.Popen(
                [*MIGRATOR, *self.args],
                env=dict(env),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def tail(self, lines: int = 60) -> str:
        """The last lines of the daemon's log, for assertion messages."""
        body = "\n".join(self.text().splitlines()[-lines:])
        return f"--- {self.log} (pid {self.pid}, exit {self.process.poll()}) ---\n{body}"

    def wait_exit(self, timeout_s: float) -> int:
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"the process did not exit within {timeout_s}s\n{self.tail()}"
            ) from None

    def terminate(self, timeout_s: float = 60) -> int:
        """SIGTERM to the daemon itself (not its group), then wait for its exit code."""
        if self.alive:
            os.kill(self.pid, signal.SIGTERM)
        return self.wait_exit(timeout_s)

    def kill(self) -> None:
        if self.alive:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                return
            self.process.wait(timeout=10)


def wait_for(
    check: Callable[[], bool],
    *,
    timeout_s: float,
    what: str,
    context: Callable[[], str] = lambda: "",
    interval_s: float = 0.5,
    watch: Sequence[DaemonProcess] = (),
) -> None:
    """Poll ``check`` until it holds; fail with ``what`` and ``context()`` (say, a daemon's log
    tail and the job table) after ``timeout_s``, or at once when a ``watch``ed process exits."""
    deadline = time.monotonic() + timeout_s
    while True:
        if check():
            return
        for process in watch:
            if not process.alive:
                raise AssertionError(
                    f"a daemon exited while waiting for {what}\n{process.tail()}\n{context()}"
                )
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}\n{context()}")
        time.sleep(interval_s)


@dataclass(frozen=True)
class JobRow:
    """A transfer job as the job database holds it."""

    id: int
    adapter: str
    source_base: str
    target_base: str
    status: str
    attempts: int
    atc: float | None
    result_ref: str | None
    mlflow_run_id: str | None
    last_error: str | None
    policy_reason: str | None


def read_jobs(database_url: str) -> list[JobRow]:
    """Every job, oldest first; an empty list while the database is busy or not created yet."""
    engine = make_engine(database_url, busy_timeout_s=5)
    try:
        with session_scope(engine) as session:
            return [
                JobRow(
                    id=job.id,
                    adapter=job.adapter_version.ref,
                    source_base=job.source_base.ref,
                    target_base=job.target_base.ref,
                    status=job.status.value,
                    attempts=job.attempts,
                    atc=job.atc,
                    result_ref=job.result_ref,
                    mlflow_run_id=job.mlflow_run_id,
                    last_error=job.last_error,
                    policy_reason=job.policy_reason,
                )
                for job in list_jobs(session=session)
            ]
    except OperationalError:
        return []
    finally:
        engine.dispose()


def jobs_table(database_url: str) -> str:
    """The job table as text, for assertion messages."""
    rows = read_jobs(database_url)
    if not rows:
        return "(no jobs)"
    return "\n".join(
        f"job {r.id}: {r.adapter} -> {r.target_base} {r.status} attempts={r.attempts} "
        f"atc={r.atc} result={r.result_ref} error={r.last_error} reason={r.policy_reason}"
        for r in rows
    )
