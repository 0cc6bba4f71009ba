"""The JSON-ready forms of the service's objects, defined once: module decisions, module maps,
jobs. The CLI's ``--json`` documents, the migration runs' ``module_map.json`` and the tables are
all built from these."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from core.decisions import Decision, ModuleDecision
from core.vocabulary import Combine

if TYPE_CHECKING:
    from core.transfer import TransferResult
    from db import ModulePair, TransferJob

__all__ = [
    "ModuleCounts",
    "current_decision",
    "decision_document",
    "decision_from_row",
    "decision_row",
    "job_document",
    "module_map",
]


@dataclass(frozen=True)
class ModuleCounts:
    """How many modules each module decision covers: the one vocabulary of the version
    description, the run metrics, ``jobs show``, ``atc``, ``transfer`` and their JSON.

    Attributes:
        same_name: target modules fed by the adapter (source) module of the same name.
        rematched: target modules fed by a source module of another name.
        skipped: target modules that receive nothing (no source module similar enough).
        left_out: adapter modules whose update reaches no target module (None: no adapter,
            as in ``migrator atc``).
        adapter_modules: the adapter's modules in all (None: no adapter).
    """

    same_name: int
    rematched: int
    skipped: int
    left_out: int | None = None
    adapter_modules: int | None = None

    @classmethod
    def of_decisions(cls, decisions: Sequence[ModuleDecision]) -> ModuleCounts:
        """The target-module counts of an assessment's decisions."""
        kinds = [d.decision for d in decisions]
        return cls(
            kinds.count(Decision.SAME_NAME),
            kinds.count(Decision.REMATCHED),
            kinds.count(Decision.SKIPPED),
        )

    @classmethod
    def of_transfer(
        cls, result: TransferResult, decisions: Sequence[ModuleDecision] | None
    ) -> ModuleCounts:
        """What a transfer did: target modules it fed by same name or rematched, target modules
        the decisions skipped, and the adapter modules it left out."""
        sources = {s for r in result.modules for s, _ in r.contributions}
        sources |= {r.source for r in result.modules if r.decision is Decision.SKIPPED}
        skipped = [d for d in decisions or () if d.decision is Decision.SKIPPED]
        return cls(
            same_name=result.modules_transferred - result.modules_rematched,
            rematched=result.modules_rematched,
            skipped=len(skipped),
            left_out=result.modules_skipped,
            adapter_modules=len(sources),
        )

    def document(self) -> dict[str, int | None]:
        """The JSON form (``module_counts``)."""
        return {
            "target_same_name": self.same_name,
            "target_rematched": self.rematched,
            "target_skipped": self.skipped,
            "adapter_left_out": self.left_out,
            "adapter_modules": self.adapter_modules,
        }

    def metrics(self) -> dict[str, float]:
        """The run metrics (MLflow metric names)."""
        out = {
            "target_modules_same_name": float(self.same_name),
            "target_modules_rematched": float(self.rematched),
            "target_modules_skipped": float(self.skipped),
        }
        if self.left_out is not None:
            out["adapter_modules_left_out"] = float(self.left_out)
        return out

    def rows(self) -> list[tuple[str, str]]:
        """(label, value) rows for tables and the version description."""
        rows = [
            (
                "target modules: same name / rematched / skipped",
                f"{self.same_name} / {self.rematched} / {self.skipped}",
            )
        ]
        if self.left_out is not None:
            rows.append(("adapter modules left out", f"{self.left_out} of {self.adapter_modules}"))
        return rows

    def text(self) -> str:
        """One line: ``4 same name, 8 rematched, 0 skipped target modules; 12 of 24 adapter
        modules left out``."""
        line = (
            f"{self.same_name} same name, {self.rematched} rematched, {self.skipped} skipped "
            "target modules"
        )
        if self.left_out is not None:
            line += f"; {self.left_out} of {self.adapter_modules} adapter modules left out"
        return line


def decision_document(d: ModuleDecision) -> dict[str, Any]:
    """One target module's decision: ``target``, ``source``, ``decision``, similarities, mass,
    reason (and the weighted sources of a merged target)."""
    doc: dict[str, Any] = {
        "target": d.target,
        "source": d.source,
        "decision": d.decision.value,
        "phi": round(d.phi, 6),
        "phi_left": round(d.phi_left, 6),
        "phi_right": round(d.phi_right, 6),
        "transport_mass": d.mass,
        "reason": d.reason,
    }
    if d.contributions:
        doc["contributions"] = [[s, w] for s, w in d.contributions]
    return doc


def decision_row(d: ModuleDecision) -> dict[str, Any]:
    """The column values of a stored module pair (``db.ModulePair``)."""
    return {
        "source_module": d.source,
        "target_module": d.target,
        "phi_left": d.phi_left,
        "phi_right": d.phi_right,
        "transport_mass": d.mass,
        "decision": d.decision.value,
        "reason": d.reason,
        "contributions": [[s, w] for s, w in d.contributions] or None,
    }


def decision_from_row(row: ModulePair, combine: Combine | str) -> ModuleDecision:
    """A stored module pair back as the decision it was (Phi recombined with ``combine``)."""
    import numpy as np

    left, right = row.phi_left or 0.0, row.phi_right or 0.0
    phi = float(Combine(combine).phi(np.array([left]), np.array([right]))[0])
    return ModuleDecision(
        target=row.target_module,
        source=row.source_module,
        decision=Decision(row.decision),
        phi=phi,
        phi_left=left,
        phi_right=right,
        mass=row.transport_mass or 0.0,
        reason=row.reason or "",
        contributions=tuple((str(s), float(w)) for s, w in row.contributions or ()),
    )


def module_map(
    decisions: Sequence[ModuleDecision] | None, result: TransferResult
) -> list[dict[str, Any]]:
    """One row per target module decision with what the adapter gave it, then the adapter
    modules that reached no target (or every module, without decisions)."""
    reports = {r.target: r for r in result.modules if r.target is not None and r.rank > 0}
    rows: list[dict[str, Any]] = []
    for d in decisions or ():
        report = reports.pop(d.target, None)
        rows.append(
            {
                **decision_document(d),
                "adapter_update": report is not None,
                "energy_source": None if report is None else report.energy_source,
                "energy_target": None if report is None else report.energy_target,
                "notes": [] if report is None else list(report.notes),
            }
        )
    for r in result.modules:
        if r.rank > 0 and r.target not in reports:
            continue  # shown with its decision above
        rows.append(
            {
                "target": r.target,
                "source": r.source,
                "decision": r.decision.value,
                "phi": r.phi,
                "adapter_update": r.rank > 0,
                "energy_source": r.energy_source,
                "energy_target": r.energy_target,
                "notes": list(r.notes),
            }
        )
    return rows


#: Audit actions that decide whether a job may run (retries only run it again).
_DECIDING_ACTIONS = frozenset({"approve", "reject", "force", "policy"})


def current_decision(job: TransferJob) -> tuple[str | None, str | None, Any]:
    """The decision in force on a job and who took it: (approved | pending_approval |
    rejected | skipped, actor, when), from its last deciding audit row; Nones before any."""
    for event in reversed(job.audit_events):
        if event.action.value in _DECIDING_ACTIONS:
            return event.to_status.value, event.actor, event.at
    return None, None, None


def job_document(job: TransferJob, **extra: Any) -> dict[str, Any]:
    """A transfer job: its state, the decision in force (and who took it) beside what the
    policy said, attempts, lease and result."""
    decision, decided_by, decided_at = current_decision(job)
    doc: dict[str, Any] = {
        "id": job.id,
        "status": job.status.value,
        "decision": decision,
        "decided_by": decided_by,
        "decided_at": decided_at,
        "adapter": job.adapter_version.ref,
        "source_base": job.source_base.ref,
        "target_base": job.target_base.ref,
        "atc": job.atc,
        "mode": job.mode,
        "policy_decision": None if job.policy_decision is None else job.policy_decision.value,
        "policy_reason": job.policy_reason,
        "signals": list(job.signals or []),
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "next_attempt_at": job.next_attempt_at,
        "last_error": job.last_error,
        "lease_owner": job.lease_owner,
        "lease_expires_at": job.lease_expires_at,
        "result": job.result_ref,
        "mlflow_run_id": job.mlflow_run_id,
        "created_at": job.created_at,
        "updated_at": job.updated_at,
    }
    doc.update(extra)
    return doc
