"""The migration pass: registry snapshot, succession, assessments, planning, execution."""

from migrator.pipeline.context import Context, Workspace
from migrator.pipeline.execution import JobOutcome, execute_job
from migrator.pipeline.planning import PairATC, Planner, Proposal, policy_decision
from migrator.pipeline.snapshot import AdapterEntry, Snapshot, read_registry
from migrator.pipeline.tick import PlannedJob, TickReport, execute_runnable, run_once

__all__ = [
    "AdapterEntry",
    "Context",
    "JobOutcome",
    "PairATC",
    "PlannedJob",
    "Planner",
    "Proposal",
    "Snapshot",
    "TickReport",
    "Workspace",
    "execute_job",
    "execute_runnable",
    "policy_decision",
    "read_registry",
    "run_once",
]
