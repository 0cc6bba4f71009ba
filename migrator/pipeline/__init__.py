"""The migration pass: registry snapshot, succession, assessments, planning, execution.

Executors (``migrator.executors``) plug in through :class:`Executor`; the pipeline never
imports them.
"""

from migrator.pipeline.context import Context, Workspace
from migrator.pipeline.executor import Executor, JobOutcome, OutcomeStatus
from migrator.pipeline.planning import PairATC, Planner, Proposal, policy_decision
from migrator.pipeline.snapshot import AdapterEntry, Snapshot, read_registry
from migrator.pipeline.tick import PlannedJob, TickReport, execute_runnable, run_once

__all__ = [
    "AdapterEntry",
    "Context",
    "Executor",
    "JobOutcome",
    "OutcomeStatus",
    "PairATC",
    "PlannedJob",
    "Planner",
    "Proposal",
    "Snapshot",
    "TickReport",
    "Workspace",
    "execute_runnable",
    "policy_decision",
    "read_registry",
    "run_once",
]
