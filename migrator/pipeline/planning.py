"""Assess base pairs and plan one job per adapter lineage and target base.

Per lineage (an adapter registered model) and active target base, the source is the lineage's
version whose base has the lowest ATC to the target: an original adapter two bases back may beat
a transferred one, since chained transfers compound error. The policy then decides on that ATC:
``<= auto_approve_atc`` approved, ``<= max_atc`` pending approval, above skipped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session

from core.errors import InputError
from db import (
    Assessment,
    BaseModelVersion,
    JobStatus,
    ModulePair,
    find_assessment,
    find_base_version,
    job_for_lineage,
    params_hash,
    replan_job,
    stale_pending_jobs,
    store_assessment,
)
from migrator.assessment_params import assessment_parameters
from migrator.documents import decision_row
from migrator.pipeline.context import Context
from migrator.pipeline.snapshot import AdapterEntry, Snapshot
from migrator.policy import PolicyDecision, Signal, agreement_of, plan_decision
from migrator.registry import ModelVersionInfo, RegistryError, RegistryUnavailableError, VersionRef
from migrator.settings import Settings

if TYPE_CHECKING:  # the math is loaded by the pass that assesses, not by every pass
    from migrator.bases import BaseComparison

__all__ = ["PairATC", "Planner", "Prefetch", "Proposal", "pair_decision"]

Prefetch = Callable[[Sequence[ModelVersionInfo]], None]
"""Factorizes bases into the cache ahead of their assessment (the executor's; may do nothing)."""

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PairATC:
    """The ATC of one (source base, target base) pair, or why there is none."""

    source: VersionRef
    target: VersionRef
    atc: float | None = None
    atc_left: float | None = None
    atc_right: float | None = None
    error: str | None = None
    assessment_id: int | None = None
    computed: bool = False  # computed in this pass (not found stored)
    counts: tuple[tuple[str, int], ...] = ()
    signals: Mapping[str, Any] = field(default_factory=dict)  # drift, functional check


def pair_decision(pair: PairATC, settings: Settings) -> PolicyDecision:
    """The policy on every signal of a pair that has an ATC (:mod:`migrator.policy`)."""
    assert pair.atc is not None
    agreement, unavailable = agreement_of(pair.signals.get("functional", {}), "cka")
    return plan_decision(
        pair.atc,
        settings,
        drift=pair.signals.get("drift"),
        base_agreement=agreement,
        functional_unavailable=unavailable,
    )


def _stored_pair(source: VersionRef, target: VersionRef, stored: Assessment) -> PairATC:
    counts: dict[str, int] = {}
    for pair in stored.module_pairs:
        counts[pair.decision] = counts.get(pair.decision, 0) + 1
    return PairATC(
        source,
        target,
        stored.atc,
        stored.atc_left,
        stored.atc_right,
        assessment_id=stored.id,
        counts=tuple(sorted(counts.items())),
        signals=dict(stored.signals or {}),
    )


@dataclass(frozen=True)
class Proposal:
    """One job to plan: carry ``adapter`` (of ``lineage``) from its base to ``target``."""

    lineage: str
    adapter: AdapterEntry
    target: VersionRef
    pair: PairATC
    decision: JobStatus
    reason: str
    candidates: tuple[tuple[str, float | None], ...]
    signals: tuple[Signal, ...] = ()

    @property
    def source_base(self) -> VersionRef:
        assert self.adapter.base is not None
        return self.adapter.base


class Planner:
    """Plans the jobs a pass should create, assessing base pairs as needed.

    Args:
        ctx: the pass's context.
        snapshot: the registry as read at the start of the pass.
        prefetch: factorizes bases ahead of their assessment (the executor's ``prefetch``).
        dry_run: compute assessments but store nothing.
        known_usable: bases already found usable (their weights were opened in an earlier
            pass), so that a pass need not download every base to know who supersedes whom.
        known_problems: bases already found unusable, and why (not opened again either).
    """

    def __init__(
        self,
        ctx: Context,
        snapshot: Snapshot,
        *,
        prefetch: Prefetch | None = None,
        dry_run: bool = False,
        known_usable: frozenset[VersionRef] = frozenset(),
        known_problems: Mapping[VersionRef, str] | None = None,
    ) -> None:
        self.ctx = ctx
        self.known_usable = known_usable
        self.known_problems = dict(known_problems or {})
        self.snapshot = snapshot
        self.prefetch = prefetch
        self.dry_run = dry_run
        self.parameters = assessment_parameters(ctx.settings)
        self._usable: dict[VersionRef, str | None] = {}
        self._pairs: dict[tuple[VersionRef, VersionRef], PairATC] = {}
        self.assessments: dict[tuple[VersionRef, VersionRef], BaseComparison] = {}

    # --- bases --------------------------------------------------------------------------
    def base_problem(self, ref: VersionRef) -> str | None:
        """Why ``ref`` cannot be used as a base (None when it can). Opens it once."""
        if ref not in self._usable:
            info = self.snapshot.bases.get(ref)
            if info is None:
                self._usable[ref] = f"base {ref} is not in the registry"
            elif ref in self.known_usable:  # opened and recorded by an earlier pass
                self._usable[ref] = None
            elif ref in self.known_problems:
                self._usable[ref] = self.known_problems[ref]
            else:
                try:
                    self.ctx.workspace.base(info)
                    self._usable[ref] = None
                except RegistryUnavailableError:
                    raise  # an outage, not bad content: the pass stops and is tried again
                except (InputError, RegistryError) as exc:
                    self._usable[ref] = f"base {ref} has no usable weights: {exc}"
                    log.warning(self._usable[ref])
        return self._usable[ref]

    def usable(self, ref: VersionRef) -> bool:
        return self.base_problem(ref) is None

    @property
    def base_problems(self) -> list[str]:
        """Why each base found unusable so far cannot be used."""
        return [problem for problem in self._usable.values() if problem]

    @property
    def pairs(self) -> list[PairATC]:
        """Every base pair looked at so far (stored, computed or failed)."""
        return list(self._pairs.values())

    # --- assessments --------------------------------------------------------------------
    def pair_atc(self, source: VersionRef, target: VersionRef, *, session: Session) -> PairATC:
        key = (source, target)
        if key not in self._pairs:
            self._pairs[key] = self._pair_atc(source, target, session=session)
        return self._pairs[key]

    def _pair_atc(self, source: VersionRef, target: VersionRef, *, session: Session) -> PairATC:
        for ref in (target, source):
            problem = self.base_problem(ref)
            if problem is not None:
                return PairATC(source, target, error=problem)
        src_row = find_base_version(source.name, source.version, session=session)
        tgt_row = find_base_version(target.name, target.version, session=session)
        if src_row is not None and tgt_row is not None:
            stored = find_assessment(src_row.id, tgt_row.id, self.parameters, session=session)
            if stored is not None:
                return _stored_pair(source, target, stored)
        self.ctx.say(f"assessing {source} -> {target}")
        from migrator.bases import compare_bases

        try:
            if self.prefetch is not None:  # Ray: factorize on the cluster first
                self.prefetch((self.snapshot.bases[source], self.snapshot.bases[target]))
            src = self.ctx.workspace.base(self.snapshot.bases[source])
            tgt = self.ctx.workspace.base(self.snapshot.bases[target])
            result = compare_bases(src, tgt, self.ctx.settings)
            signals = self._measure(source, target, result)
        except InputError as exc:
            return PairATC(source, target, error=f"assessing {source} -> {target}: {exc}")
        self.assessments[(source, target)] = result
        assessment_id = None
        if not self.dry_run and src_row is not None and tgt_row is not None:
            assessment_id = self._store(result, signals, src_row, tgt_row, session=session)
        atc = result.atc
        self.ctx.say(
            f"ATC {source} -> {target}: {atc.atc:.3f} (left {atc.atc_left:.3f}, "
            f"right {atc.atc_right:.3f}) in {result.seconds:.1f}s"
        )
        return PairATC(
            source,
            target,
            atc.atc,
            atc.atc_left,
            atc.atc_right,
            assessment_id=assessment_id,
            computed=True,
            counts=tuple(sorted(result.counts.items())),
            signals=signals,
        )

    def _measure(
        self, source: VersionRef, target: VersionRef, result: BaseComparison
    ) -> dict[str, Any]:
        """The pair's signals beside ATC: weights-only drift over every same-named tensor, and
        the functional check where it can change the decision (ATC <= max_atc)."""
        from migrator.functional.service import drift_document

        ws, s = self.ctx.workspace, self.ctx.settings
        src_info, tgt_info = self.snapshot.bases[source], self.snapshot.bases[target]
        drift = drift_document(ws.base(src_info).source, ws.base(tgt_info).source)
        if result.atc.atc > s.max_atc:
            functional: dict[str, Any] = {"unavailable": "not run: ATC above max_atc"}
        else:
            self.ctx.say(f"functional check {source} -> {target}")
            matched = [(src, d.target) for d in result.decisions for src, _ in d.sources]
            functional = ws.functional.base_check(
                ws.base_folder(src_info), ws.base_folder(tgt_info), matched
            )
        return {"drift": drift, "functional": functional}

    def _store(
        self,
        result: BaseComparison,
        signals: Mapping[str, Any],
        src_row: BaseModelVersion,
        tgt_row: BaseModelVersion,
        *,
        session: Session,
    ) -> int:
        """Store the assessment with its decisions and heatmap, rendered once for every run
        planned from it."""
        atc = result.atc
        figures = result.figures(source_label=src_row.ref, target_label=tgt_row.ref)
        row, _ = store_assessment(
            src_row.id,
            tgt_row.id,
            self.parameters,
            atc_left=atc.atc_left,
            atc_right=atc.atc_right,
            atc=atc.atc,
            module_pairs=[ModulePair(**decision_row(d)) for d in result.decisions],
            timings={"assess_s": result.seconds},
            figures=figures,
            signals=dict(signals),
            session=session,
        )
        return row.id

    def replan_stale(self, *, session: Session) -> list[tuple[int, str]]:
        """Jobs waiting for approval whose assessment was made under other parameters (a
        setting changed since) are planned again under the current ones, each with an audit
        row; approved jobs keep the decisions they were approved with.

        Returns:
            (job id, reason) of each job re-planned.
        """
        replanned = []
        for job in stale_pending_jobs(params_hash(self.parameters), session=session):
            source = VersionRef(job.source_base.name, job.source_base.version)
            target = VersionRef(job.target_base.name, job.target_base.version)
            pair = self.pair_atc(source, target, session=session)
            if pair.atc is None or pair.assessment_id is None:
                continue  # cannot assess now (bad content, outage): it waits as it is
            verdict = pair_decision(pair, self.ctx.settings)
            reason = (
                f"re-planned: the assessment parameters changed since it was planned; "
                f"{verdict.reason}"
            )
            replan_job(
                job.id,
                assessment_id=pair.assessment_id,
                atc=pair.atc,
                decision=verdict.decision,
                reason=reason,
                signals=verdict.as_json(),
                session=session,
            )
            replanned.append((job.id, reason))
        return replanned

    # --- planning -----------------------------------------------------------------------
    def propose(
        self, successions: dict[VersionRef, list[VersionRef]], *, session: Session
    ) -> list[Proposal]:
        """The jobs to create: one per (lineage, target) that has none and no version there."""
        proposals: list[Proposal] = []
        ghosts = self.snapshot.ghost_bases()
        lineages = self.snapshot.lineages()
        for target, predecessors in successions.items():
            sources = set(predecessors) | {g for g in ghosts if g.name == target.name}
            tgt_row = find_base_version(target.name, target.version, session=session)
            for lineage, entries in sorted(lineages.items()):
                if any(e.base == target for e in entries):
                    continue  # the lineage already has a version on the target
                candidates = [e for e in entries if e.base in sources]
                if not candidates:
                    continue
                if tgt_row is not None and job_for_lineage(lineage, tgt_row.id, session=session):
                    continue
                proposals.append(self._choose(lineage, candidates, target, session=session))
        return proposals

    def _choose(
        self,
        lineage: str,
        candidates: Sequence[AdapterEntry],
        target: VersionRef,
        *,
        session: Session,
    ) -> Proposal:
        scored = []
        for entry in candidates:
            assert entry.base is not None
            scored.append((entry, self.pair_atc(entry.base, target, session=session)))

        def rank(item: tuple[AdapterEntry, PairATC]) -> tuple[float, int, int]:
            entry, pair = item
            atc = pair.atc if pair.atc is not None else float("inf")
            # lowest ATC; then an original over a transferred version; then the newest
            return (atc, int(entry.transferred), -int(entry.ref.version))

        entry, pair = min(scored, key=rank)
        shown = tuple((str(e.ref), p.atc) for e, p in scored)
        if pair.atc is None:
            return Proposal(
                lineage, entry, target, pair, JobStatus.SKIPPED, pair.error or "no ATC", shown
            )
        verdict = pair_decision(pair, self.ctx.settings)
        reason = verdict.reason
        if len(scored) > 1:
            reason += f"; source {entry.ref} chosen among {len(scored)} versions (lowest ATC)"
        return Proposal(
            lineage, entry, target, pair, verdict.decision, reason, shown, verdict.signals
        )
