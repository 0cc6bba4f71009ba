"""The approval policy on every signal: ATC, weights-only drift, the functional check, and what a
transfer leaves out.

Auto-approval needs every available signal to clear its threshold; each decision records every
signal with its value, threshold and verdict (:class:`Signal`), so that ``jobs show``,
``approvals list``, the run's metrics and the version's description can say why.

Two moments decide:

- **planning** (:func:`plan_decision`), on the base pair: ATC (``<= auto_approve_atc`` approved,
  ``<= max_atc`` pending, above skipped), drift (``<= max_weight_drift``, and no source tensor
  missing in the target), the bases' representation agreement (``>= min_functional_agreement``;
  where the check cannot run the decision says so, and ``require_functional_check`` makes it
  wait for an admin);
- **after the transfer, before registration** (:func:`transfer_signals`), per adapter: the share
  of its energy that reached no target module (``<= max_dropped_share``) and its effect
  agreement (``>= min_functional_agreement``). A job approved by the policy whose transfer fails
  one of them is held for an admin instead of being registered; one an admin approved is
  registered (the admin saw the signals of the pair; the held job's show the rest).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

from db import JobStatus
from migrator.settings import Settings

__all__ = [
    "PolicyDecision",
    "Signal",
    "Verdict",
    "agreement_of",
    "drift_signal",
    "functional_signal",
    "plan_decision",
    "signals_from_json",
    "transfer_signals",
]


class Verdict(StrEnum):
    """What one signal says."""

    PASS = "pass"  # clears its threshold
    HOLD = "hold"  # a person should look (pending approval)
    SKIP = "skip"  # too far to transfer (ATC above max_atc)
    UNAVAILABLE = "unavailable"  # could not be measured (the reason is in the detail)


@dataclass(frozen=True)
class Signal:
    """One signal of a decision.

    Attributes:
        name: ``atc``, ``weight_drift``, ``base_agreement``, ``dropped_share``,
            ``adapter_agreement``.
        value: the measured value (None when unavailable).
        threshold: the setting it is held against, written out (``<= 0.30``).
        verdict: :class:`Verdict`.
        detail: what else a person needs (the reason it is unavailable, the missing tensors).
    """

    name: str
    value: float | None
    threshold: str
    verdict: Verdict
    detail: str = ""

    def line(self) -> str:
        """``name value (threshold): verdict; detail`` for messages."""
        value = "n/a" if self.value is None else f"{self.value:.3f}"
        text = f"{self.name} {value} ({self.threshold}): {self.verdict.value}"
        return f"{text}; {self.detail}" if self.detail else text


@dataclass(frozen=True)
class PolicyDecision:
    """The decision on a planned job: the status, the reason in words, every signal."""

    decision: JobStatus
    reason: str
    signals: tuple[Signal, ...]

    def as_json(self) -> list[dict[str, Any]]:
        return signals_json(self.signals)


def signals_json(signals: Iterable[Signal]) -> list[dict[str, Any]]:
    """The signals as stored with the job and shown by ``jobs show``."""
    return [{**asdict(s), "verdict": s.verdict.value} for s in signals]


def signals_from_json(rows: Sequence[Mapping[str, Any]] | None) -> tuple[Signal, ...]:
    """Stored signals back as :class:`Signal` (unknown keys ignored)."""
    return tuple(
        Signal(
            name=str(r["name"]),
            value=None if r.get("value") is None else float(r["value"]),
            threshold=str(r.get("threshold", "")),
            verdict=Verdict(r.get("verdict", Verdict.UNAVAILABLE)),
            detail=str(r.get("detail", "")),
        )
        for r in rows or ()
    )


def _atc_signal(atc: float, s: Settings) -> Signal:
    threshold = f"<= {s.auto_approve_atc:.2f} approve, <= {s.max_atc:.2f} pending"
    if atc <= s.auto_approve_atc:
        return Signal("atc", atc, threshold, Verdict.PASS)
    if atc <= s.max_atc:
        return Signal("atc", atc, threshold, Verdict.HOLD, "between the thresholds")
    return Signal("atc", atc, threshold, Verdict.SKIP, "the bases are too different")


def drift_signal(drift: Mapping[str, Any] | None, s: Settings) -> Signal:
    """Weights-only drift (``core.drift.WeightDrift`` as stored: ``drift``, ``missing``,
    ``missing_share``, ``missing_examples``)."""
    threshold = f"<= {s.max_weight_drift:g}, no source tensor missing"
    if drift is None:
        return Signal("weight_drift", None, threshold, Verdict.UNAVAILABLE, "not measured")
    value, missing = float(drift["drift"]), int(drift.get("missing", 0))
    detail = ""
    if missing:
        examples = ", ".join(drift.get("missing_examples", [])[:3])
        share = float(drift.get("missing_share", 0.0))
        detail = f"{missing} source tensors ({share:.0%}) not in the target, e.g. {examples}"
    ok = value <= s.max_weight_drift and not missing
    return Signal("weight_drift", value, threshold, Verdict.PASS if ok else Verdict.HOLD, detail)


def functional_signal(
    name: str, value: float | None, unavailable: str | None, s: Settings
) -> Signal:
    """A functional agreement (the worst over components and probe kinds) against
    ``min_functional_agreement``; ``unavailable`` says why it could not be measured."""
    threshold = f">= {s.min_functional_agreement:g}"
    if unavailable is not None:
        verdict = Verdict.HOLD if s.require_functional_check else Verdict.UNAVAILABLE
        detail = unavailable + (" (require_functional_check)" if verdict is Verdict.HOLD else "")
        return Signal(name, None, threshold, verdict, detail)
    if value is None:  # measured, but undefined: the adapter changes nothing on one side
        return Signal(name, None, threshold, Verdict.HOLD, "undefined: no effect on one side")
    ok = value >= s.min_functional_agreement
    return Signal(name, value, threshold, Verdict.PASS if ok else Verdict.HOLD)


def _combine(signals: Sequence[Signal]) -> tuple[JobStatus, str]:
    verdicts = {x.verdict for x in signals}
    failing = [x.line() for x in signals if x.verdict in (Verdict.SKIP, Verdict.HOLD)]
    if Verdict.SKIP in verdicts:
        return JobStatus.SKIPPED, "skipped (an admin can force it): " + "; ".join(failing)
    if Verdict.HOLD in verdicts:
        return JobStatus.PENDING_APPROVAL, "waiting for an admin: " + "; ".join(failing)
    unavailable = [x.name for x in signals if x.verdict is Verdict.UNAVAILABLE]
    extra = f" ({', '.join(unavailable)} unavailable)" if unavailable else ""
    return JobStatus.APPROVED, "approved by policy: every signal clears its threshold" + extra


def plan_decision(
    atc: float,
    s: Settings,
    *,
    drift: Mapping[str, Any] | None = None,
    base_agreement: float | None = None,
    functional_unavailable: str | None = "not measured",
) -> PolicyDecision:
    """The planning decision on a base pair's signals (module docstring)."""
    signals = (
        _atc_signal(atc, s),
        drift_signal(drift, s),
        functional_signal("base_agreement", base_agreement, functional_unavailable, s),
    )
    decision, reason = _combine(signals)
    return PolicyDecision(decision, reason, signals)


def transfer_signals(
    dropped_share: float,
    adapter_agreement: float | None,
    functional_unavailable: str | None,
    s: Settings,
) -> tuple[Signal, ...]:
    """The signals of one transfer, before registration (module docstring)."""
    threshold = f"<= {s.max_dropped_share:g}"
    dropped = Signal(
        "dropped_share",
        dropped_share,
        threshold,
        Verdict.PASS if dropped_share <= s.max_dropped_share + 1e-12 else Verdict.HOLD,
        "" if dropped_share <= s.max_dropped_share + 1e-12 else "adapter modules left out",
    )
    agreement = functional_signal("adapter_agreement", adapter_agreement, functional_unavailable, s)
    return (dropped, agreement)


def agreement_of(check: Mapping[str, Any], key: str) -> tuple[float | None, str | None]:
    """(value, why it is unavailable) of a stored functional check (its ``cka`` for a base
    pair, ``agreement`` for an adapter; an empty check was not measured)."""
    if not check:
        return None, "not measured"
    if "unavailable" in check:
        return None, str(check["unavailable"])
    value = check.get(key)
    return (None if value is None else float(value)), None
