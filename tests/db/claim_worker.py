"""A worker process for the concurrency tests: claims jobs until none is left.

Run as ``python -m tests.db.claim_worker --url URL --worker NAME --out FILE [...]``. It appends
one line per event to FILE (``ready``, ``claim ID``, ``done ID``, ``exit``), flushed at once so
that a test can read it while the worker runs or after it was killed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import TextIO

from db import (
    JobStatus,
    claim,
    complete,
    list_jobs,
    make_engine,
    make_session_factory,
    session_scope,
    start,
)


def _log(out: TextIO, line: str) -> None:
    out.write(line + "\n")
    out.flush()
    os.fsync(out.fileno())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--worker", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--start-file", type=Path, help="wait for this file before claiming")
    parser.add_argument("--limit", type=int, default=5)
    parser.add_argument("--lease", type=float, default=30.0)
    parser.add_argument("--work-s", type=float, default=0.002, help="pretend work per job")
    parser.add_argument("--hang", action="store_true", help="claim one job, then hang")
    parser.add_argument("--deadline-s", type=float, default=60.0)
    args = parser.parse_args(argv)

    engine = make_engine(args.url)
    factory = make_session_factory(engine)
    deadline = time.monotonic() + args.deadline_s
    with args.out.open("a") as out:
        _log(out, "ready")
        while args.start_file is not None and not args.start_file.exists():
            if time.monotonic() > deadline:
                return 3
            time.sleep(0.01)
        while time.monotonic() < deadline:
            with session_scope(factory) as session:
                jobs = claim(
                    args.worker,
                    limit=1 if args.hang else args.limit,
                    lease_seconds=args.lease,
                    session=session,
                )
                claimed = [job.id for job in jobs]
            if args.hang and claimed:
                with session_scope(factory) as session:  # its work begins, and never ends
                    start(claimed[0], args.worker, session=session)
            for job_id in claimed:
                _log(out, f"claim {job_id}")
            if args.hang and claimed:
                time.sleep(3600)  # holding the lease until killed
            for job_id in claimed:
                with session_scope(factory) as session:  # as an executor does, before the work
                    start(job_id, args.worker, session=session)
                time.sleep(args.work_s)
                with session_scope(factory) as session:
                    complete(
                        job_id, args.worker, mlflow_run_id=f"run-{args.worker}", session=session
                    )
                _log(out, f"done {job_id}")
            if claimed:
                continue
            with session_scope(factory) as session:
                left = list_jobs(
                    statuses={JobStatus.APPROVED, JobStatus.RUNNING}, limit=1, session=session
                )
            if not left:
                _log(out, "exit")
                return 0
            time.sleep(0.05)  # someone holds the rest: wait for them to finish or expire
    return 4


if __name__ == "__main__":
    sys.exit(main())
