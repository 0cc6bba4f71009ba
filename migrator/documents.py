"""The JSON-ready forms of the service's objects, defined once: module decisions, module maps,
jobs. The CLI's ``--json`` documents, the migration runs' ``module_map.json`` and the tables are
all built from these."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from core.decisions import Decision, ModuleDecision
from core.vocabulary import Combine

if TYPE_CHECKING:
    from core.transfer import TransferResult
    from db import ModulePair, TransferJob

__all__ = [
    "decision_document",
    "decision_from_row",
    "decision_row",
    "job_document",
    "module_map",
]


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


def job_document(job: TransferJob, **extra: Any) -> dict[str, Any]:
    """A transfer job: its state, what the policy said, attempts, lease and result."""
    doc: dict[str, Any] = {
        "id": job.id,
        "status": job.status.value,
        "adapter": job.adapter_version.ref,
        "source_base": job.source_base.ref,
        "target_base": job.target_base.ref,
        "atc": job.atc,
        "mode": job.mode,
        "policy_decision": None if job.policy_decision is None else job.policy_decision.value,
        "policy_reason": job.policy_reason,
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
