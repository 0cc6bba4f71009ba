"""Signals beside ATC in the transfer-quality experiment, and the matching variants for depth.

- **Weight drift** (:func:`core.drift.weight_drift`) of every target from the source.
- **Functional check** (:mod:`migrator.functional`): debiased linear CKA of the bases' final
  representations on each probe kind (and per matched layer), and per adapter the agreement of
  its effect on the source with its transfer's effect on the target.
- **Matching variants** for a depth-pruned target (:mod:`core.matching`, :mod:`core.layers`):
  merge (a target module gets the mass-weighted combination of every source module sending it
  mass) and the order-preserving layer map, alone and together; ``core.transfer`` carries a
  target's contributions as sum_i w_i dW_i', one LoRA of rank sum_i r_i.
- **Rank correlation** of every signal with the share of the trained gain recovered, over all
  targets and seeds, and the decision the proposed thresholds give.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.quality_report import MIN_TRAINED_GAIN, rank_correlation
from core.adapter import LoraAdapter
from core.atc import ATCResult
from core.drift import weight_drift
from core.factorize import FactorStore
from core.layers import layer_pairs, ordered_plan
from core.matching import MatchStrategy, MergeWeights, ModuleDecision, match_modules
from core.transfer import TransferMode, transfer_adapter
from core.weights import WeightSource
from migrator.functional import (
    FunctionalConfig,
    FunctionalPair,
    NotRunnableError,
    ProbeSettings,
    check_adapter,
    check_bases,
    open_pair,
)

__all__ = [
    "FULL_PROBES",
    "MATCH_VARIANTS",
    "PROPOSED",
    "QUICK_PROBES",
    "PairSignals",
    "adapter_signals",
    "carry_contributions",
    "pair_signals",
    "print_signal_tables",
    "signal_summary",
    "variant_decisions",
]

FULL_PROBES = ProbeSettings(count=64, length=32)
QUICK_PROBES = ProbeSettings(count=16, length=12, batch_size=16)
KINDS = ("token_ids", "words", "text")

PROPOSED = {
    "auto_approve_atc": 0.3,
    "max_atc": 0.6,
    "max_weight_drift": 0.01,
    "min_functional_agreement": 0.8,
}
"""The thresholds proposed from this bench (see bench/README.md, "Signals beside ATC")."""

MATCH_VARIANTS: dict[str, tuple[str, MatchStrategy, bool, MergeWeights]] = {
    "lorax_project_merge": ("merge (OT plan)", MatchStrategy.MERGE, False, MergeWeights.SOURCE),
    "lorax_project_merge_mean": ("merge, mean weights (OT plan)", MatchStrategy.MERGE, False, MergeWeights.TARGET),
    "lorax_project_ordered": ("order-preserving map", MatchStrategy.ONE_TO_ONE, True, MergeWeights.SOURCE),
    "lorax_project_ordered_merge": ("order-preserving map + merge", MatchStrategy.MERGE, True, MergeWeights.SOURCE),
    "lorax_project_ordered_merge_mean": ("order-preserving map + merge, mean weights", MatchStrategy.MERGE, True, MergeWeights.TARGET),
}  # fmt: skip
"""Row key -> (label, strategy, order-preserving plan, merge weights): LoRA-X, project mode."""


@dataclass
class PairSignals:
    """What a target's signals are, and the open functional pair its adapters reuse."""

    facts: dict[str, Any]
    pair: FunctionalPair | None


def pair_signals(
    source_dir: Path, target_dir: Path, decisions: Sequence[ModuleDecision], probes: ProbeSettings
) -> PairSignals:
    """Weight drift and the base pair's functional check (layers matched as the decisions say)."""
    t0 = time.perf_counter()
    drift = weight_drift(WeightSource.open(source_dir), WeightSource.open(target_dir))
    facts: dict[str, Any] = {
        "drift": drift.drift,
        "drift_missing_share": drift.missing_share,
        "drift_median_tensor": drift.median_relative,
        "drift_seconds": time.perf_counter() - t0,
    }
    try:
        pair = open_pair(source_dir, target_dir, FunctionalConfig(probes))
    except NotRunnableError as exc:
        facts["functional"] = {"available": False, "reason": str(exc)}
        return PairSignals(facts, None)
    check = check_bases(pair, layer_pairs=layer_pairs((d.source, d.target) for d in decisions))
    by_kind = check.components[0][1].by_kind()
    facts["cka"] = {k: by_kind[k].cka for k in KINDS if k in by_kind}
    facts["cka_layers"] = {
        k: [[x.source, x.target, x.cka] for x in by_kind[k].layers] for k in by_kind
    }
    facts["functional_pair_seconds"] = check.seconds
    facts["functional_build_seconds"] = pair.build_seconds
    return PairSignals(facts, pair)


def adapter_signals(
    pair: FunctionalPair | None, source_adapter: LoraAdapter, moved: LoraAdapter
) -> dict[str, Any]:
    """The adapter-effect agreement r per probe kind (None: no effect on a side) and its cost."""
    if pair is None:
        return {"available": False}
    result = check_adapter(pair, source_adapter, moved)
    by_kind = result.components[0][1].by_kind() if result.components else {}
    return {
        "r": {k: by_kind[k].r for k in KINDS if k in by_kind},
        "effect_ratio": {k: by_kind[k].effect_ratio for k in KINDS if k in by_kind},
        "seconds": result.seconds,
    }


def variant_decisions(
    atc: ATCResult, min_similarity: float
) -> dict[str, tuple[ModuleDecision, ...]]:
    """The decisions of every matching variant (:data:`MATCH_VARIANTS`)."""
    ordered = ordered_plan(atc)
    return {
        key: match_modules(
            atc,
            min_similarity=min_similarity,
            strategy=strategy,
            plan=ordered.plan if use_order else None,
            merge_weights=weights,
        )
        for key, (_, strategy, use_order, weights) in MATCH_VARIANTS.items()
    }


def carry_contributions(
    adapter: LoraAdapter,
    source: FactorStore,
    target: FactorStore,
    decisions: Sequence[ModuleDecision],
    *,
    mode: TransferMode,
    atc: ATCResult,
) -> tuple[LoraAdapter, dict[str, float]]:
    """Transfer with decisions that may name several (source, weight) contributions per target:
    :func:`core.transfer.transfer_adapter` gives such a target sum_i w_i dW_i', one LoRA of
    rank sum_i r_i. Returns the adapter and its figures."""
    result = transfer_adapter(adapter, source, target, decisions, mode=mode, atc=atc)
    return result.adapter, {
        "energy_retained": result.energy_retained,
        "modules_transferred": float(result.modules_transferred),
        "modules_rematched": float(result.modules_rematched),
        "modules_skipped": float(result.modules_skipped),
        "adapter_weighted_similarity": result.adapter_weighted_similarity or 0.0,
    }


def _per_seed_share(rows: Mapping[str, Any], row: str) -> list[float | None]:
    none = rows["none"]["metric_mean"]
    trained = [t - none for t in rows["trained"]["metric_per_seed"]]
    values = [v - none for v in rows[row]["metric_per_seed"]]
    if statistics.fmean(trained) < MIN_TRAINED_GAIN:
        return [None] * len(values)
    return [v / t if abs(t) > 1e-9 else None for v, t in zip(values, trained, strict=True)]


def _decision(atc: float, drift: float, cka: float | None, effect: float | None) -> str:
    p = PROPOSED
    if atc > p["max_atc"]:
        return "skipped"
    checks = [
        atc <= p["auto_approve_atc"],
        drift <= p["max_weight_drift"],
        cka is not None and cka >= p["min_functional_agreement"],
        effect is not None and effect >= p["min_functional_agreement"],
    ]
    return "approved" if all(checks) else "pending"


def signal_summary(targets: Mapping[str, Any], row: str = "lorax_project") -> dict[str, Any]:
    """Points (target, seed, share, signals), Spearman's rho of each signal with the share over
    all of them, and the proposed policy's decision per target and seed.

    An undefined effect agreement (the transfer changes nothing: every module skipped) ranks as
    -1, the worst value, as the policy treats it.
    """
    points = []
    for name, t in targets.items():
        cka = t.get("cka", {})
        for seed, share in enumerate(_per_seed_share(t["rows"], row)):
            effect = (
                t["adapter_signals"][seed].get("r", {})
                if seed < len(t.get("adapter_signals", []))
                else {}
            )
            worst_effect = None if not effect or None in effect.values() else min(effect.values())
            point = {
                "target": name, "seed": seed, "share": share, "atc": t["atc"], "drift": t["drift"],
                **{f"cka_{k}": cka.get(k) for k in KINDS},
                **{f"effect_{k}": (-1.0 if effect.get(k) is None else effect[k]) for k in KINDS},
                "decision": _decision(t["atc"], t["drift"], min(cka.values()) if cka else None, worst_effect),
            }  # fmt: skip
            points.append(point)
    signals = ["atc", "drift", *(f"cka_{k}" for k in KINDS), *(f"effect_{k}" for k in KINDS)]
    rho = {}
    for signal in signals:
        pts = [
            (p[signal], p["share"])
            for p in points
            if p["share"] is not None and p[signal] is not None
        ]
        rho[signal] = {
            "rho": rank_correlation([a for a, _ in pts], [b for _, b in pts]) if len(pts) >= 3 else None,
            "n": len(pts),
        }  # fmt: skip
    return {"points": points, "spearman": rho, "proposed_thresholds": dict(PROPOSED)}


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def print_signal_tables(doc: Mapping[str, Any]) -> None:
    """The signals per target, their rank correlations, the decisions and the costs (markdown)."""
    targets = doc["targets"]
    print("\n| target | ATC | weight drift | missing tensors | CKA (token ids / words / text) | "
          "adapter-effect r (token ids / words / text), mean over seeds | share recovered "
          "(project) | proposed policy |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    decisions: dict[str, list[str]] = {}
    for p in doc["signals"]["points"]:
        decisions.setdefault(p["target"], []).append(p["decision"])
    for name, t in targets.items():
        cka = " / ".join(_fmt(t.get("cka", {}).get(k)) for k in KINDS)
        effects = []
        for k in KINDS:
            values = [s.get("r", {}).get(k) for s in t.get("adapter_signals", [])]
            defined = [v for v in values if v is not None]
            effects.append(
                _fmt(statistics.fmean(defined))
                if defined and len(defined) == len(values)
                else "n/a"
            )
        share = t["rows"]["lorax_project"]["share"]
        verdicts = ", ".join(
            f"{v} x{decisions[name].count(v)}" for v in sorted(set(decisions.get(name, [])))
        )
        print(f"| {name} | {t['atc']:.3f} | {100 * t['drift']:.2f}% | {100 * t['drift_missing_share']:.0f}% | "
              f"{cka} | {' / '.join(effects)} | {_fmt(None if share is None else 100 * share, '.0f')}% | "
              f"{verdicts} |")  # fmt: skip
    print("\nSpearman rho of each signal with the share recovered (LoRA-X project, all targets "
          "and seeds):")  # fmt: skip
    for signal, s in doc["signals"]["spearman"].items():
        print(f"  {signal}: rho {_fmt(s['rho'])} (n={s['n']})")
    costs = doc["signals"]["costs"]
    print(f"\nFunctional check cost: {costs['pair_seconds_mean']:.1f} s per base pair (of which "
          f"{costs['build_seconds_mean']:.1f} s building both bases), {costs['adapter_seconds_mean']:.1f} "
          f"s per adapter; weight drift {costs['drift_seconds_mean']:.2f} s per pair "
          f"({costs['probes']})")  # fmt: skip
