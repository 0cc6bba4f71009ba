"""Summaries, rank correlation, tables and the plot of the transfer-quality experiment.

Definitions (per target; "none" is deterministic, every other row has one value per seed):

- gain = metric - metric(no adapter), in accuracy points;
- share = mean gain of the row / mean gain of "trained" (the headline "share of the Trained gain
  recovered"); ``share_sd`` is the spread of the per-seed ratios (same seed for both). Undefined
  (None) when the trained gain is under :data:`MIN_TRAINED_GAIN` points: a ratio of noise.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "MIN_TRAINED_GAIN",
    "plot",
    "print_tables",
    "rank_correlation",
    "spearman",
    "summarize",
]

FIGURES = (
    "energy_retained",
    "adapter_weighted_similarity",
    "modules_transferred",
    "modules_rematched",
    "modules_skipped",
)
"""Transfer figures averaged over seeds (from :class:`core.transfer.TransferResult`)."""

MIN_TRAINED_GAIN = 1.0
"""Below this trained gain (accuracy points) the recovered share is not reported."""


def _sd(values: Sequence[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(
    metrics: Mapping[str, list[float]],
    figures: Mapping[str, list[dict[str, float]]],
    labels: Mapping[str, str],
) -> dict[str, dict[str, Any]]:
    """Per row: metric mean/sd/per seed, gain, share of the trained gain, transfer figures."""
    none = metrics["none"][0]
    trained_gains = [m - none for m in metrics["trained"]]
    trained_mean = statistics.fmean(trained_gains)
    out: dict[str, dict[str, Any]] = {}
    for key, values in metrics.items():
        gains = [v - none for v in values]
        row: dict[str, Any] = {
            "label": labels.get(key, key),
            "metric_mean": statistics.fmean(values),
            "metric_sd": _sd(values),
            "metric_per_seed": values,
            "gain_mean": statistics.fmean(gains),
            "gain_sd": _sd(gains),
        }
        if key == "none":
            row["share"], row["share_sd"] = 0.0, 0.0
        elif trained_mean < MIN_TRAINED_GAIN:
            row["share"], row["share_sd"] = None, None
        else:
            row["share"] = statistics.fmean(gains) / trained_mean
            per_seed = [g / t for g, t in zip(gains, trained_gains, strict=True) if abs(t) > 1e-9]
            row["share_sd"] = _sd(per_seed)
        for name in (
            "energy_retained",
            "modules_transferred",
            "modules_rematched",
            "modules_skipped",
        ):
            seen = [f[name] for f in figures.get(key, [])]
            row[name] = statistics.fmean(seen) if seen else None
        out[key] = row
    return out


def _ranks(values: Sequence[float]) -> list[float]:
    """Average ranks (ties share the mean of their positions), 1-based."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def _rho(x: Sequence[float], y: Sequence[float]) -> float | None:
    rx, ry = _ranks(x), _ranks(y)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    return None if sxx == 0 or syy == 0 else sxy / math.sqrt(sxx * syy)


def rank_correlation(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rho of two paired samples (average ranks for ties); None if one is constant."""
    return _rho(x, y)


def spearman(targets: Mapping[str, Any], rows: Sequence[str]) -> dict[str, Any]:
    """Spearman's rho between the pair's ATC and the recovered share, per transfer row over the
    targets (where the share is defined), and pooled over the LoRA-X rows (ATC ties share
    ranks). A negative rho is what a useful ATC gives (higher cost, less recovered)."""
    out: dict[str, Any] = {}
    pooled: list[tuple[float, float]] = []
    for row in rows:
        points = [
            (name, t["atc"], t["rows"][row]["share"])
            for name, t in targets.items()
            if t["rows"].get(row, {}).get("share") is not None
        ]
        rho = _rho([p[1] for p in points], [p[2] for p in points]) if len(points) >= 3 else None
        out[row] = {"rho": rho, "n": len(points), "points": points}
        if row.startswith("lorax_") and row != "lorax_project_unfiltered":
            pooled += [(p[1], p[2]) for p in points]
    rho = _rho([p[0] for p in pooled], [p[1] for p in pooled]) if len(pooled) >= 3 else None
    out["lorax_pooled"] = {"rho": rho, "n": len(pooled)}
    return out


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def print_tables(doc: Mapping[str, Any], labels: Mapping[str, str]) -> None:
    """Print the successor table and the results table (markdown)."""
    src = doc["source"]
    print(f"\nSource {src['model']}: no adapter {src['none']:.1f}; LoRA-X trained "
          f"{statistics.fmean(src['lorax']):.1f} +/- {_sd(src['lorax']):.1f}; LoRA trained "
          f"{statistics.fmean(src['lora']):.1f} +/- {_sd(src['lora']):.1f}  "
          f"({doc['experiment']['metric']})")  # fmt: skip
    print("\n| target | what | weight change vs source: attention / FFN (mean) | embedding "
          "cosine to source | ATC (left / right) | ATC at k=8 / k=128 / weighted | modules "
          "same / rematched / skipped |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for name, t in doc["targets"].items():
        change = t.get("weight_change")
        moved = (
            "-"
            if change is None
            else f"{100 * change['attention']['mean']:.2f}% / {100 * change['ffn']['mean']:.2f}%"
        )
        v = t.get("atc_variants", {})
        variants = " / ".join(_fmt(v.get(key), ".3f") for key in ("k=8", "k=128", "weighted k=32"))
        d = t["decisions"]
        cosine = _fmt(t.get("embedding_cosine_to_source"), ".3f")
        print(f"| {name} | {t['kind']} | {moved} | {cosine} | {t['atc']:.3f} ({t['atc_left']:.3f}"
              f" / {t['atc_right']:.3f}) | {variants} | {d['same_name']} / {d['rematched']} / "
              f"{d['skipped']} |")  # fmt: skip
    print(
        "\n| target | row | accuracy % (mean +/- sd) | gain | share of trained gain | ATC | "
        "energy retained |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, t in doc["targets"].items():
        for key, row in t["rows"].items():
            share = None if row["share"] is None else 100 * row["share"]
            print(f"| {name} | {labels.get(key, key)} | {row['metric_mean']:.1f} +/- "
                  f"{row['metric_sd']:.1f} | {row['gain_mean']:+.1f} | {_fmt(share, '.0f')}"
                  f"{'%' if share is not None else ''} | {t['atc']:.3f} | "
                  f"{_fmt(row['energy_retained'], '.3f')} |")  # fmt: skip
    print("\nSpearman rho (ATC vs share recovered, over targets):")
    for key, s in doc["spearman"].items():
        print(f"  {labels.get(key, key)}: rho {_fmt(s['rho'], '.2f')} (n={s['n']})")


def plot(doc: Mapping[str, Any], path: Path, labels: Mapping[str, str]) -> None:
    """Accuracy per target and row (bars, sd whiskers) and share recovered vs ATC (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = doc["targets"]
    rows = list(dict.fromkeys(key for t in targets.values() for key in t["rows"]))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(15, 6.5))
    width = 0.8 / len(rows)
    for i, key in enumerate(rows):
        cells = [
            (j + (i - len(rows) / 2 + 0.5) * width, t["rows"][key])
            for j, t in enumerate(targets.values())
            if key in t["rows"]
        ]
        ax1.bar(
            [x for x, _ in cells],
            [c["metric_mean"] for _, c in cells],
            width,
            yerr=[c["metric_sd"] for _, c in cells],
            label=labels.get(key, key),
            capsize=2,
        )
    ax1.set_xticks(range(len(targets)), list(targets))
    ax1.set_ylabel("held-out 1-NN accuracy (%), mean +/- sd over seeds")
    ax1.set_title("Intent task: accuracy per target base")
    ax1.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.07))
    for key in rows:
        if key in ("none", "trained"):
            continue
        pts = sorted(
            (t["atc"], 100 * t["rows"][key]["share"], name)
            for name, t in targets.items()
            if t["rows"].get(key, {}).get("share") is not None
        )
        if not pts:
            continue
        ax2.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=labels.get(key, key))
        if key == "lorax_project":
            for x, y, name in pts:
                ax2.annotate(name, (x, y), fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax2.axhline(100, color="grey", lw=0.8, ls="--")
    ax2.axhline(90, color="grey", lw=0.5, ls=":")
    # ATCs of related successors are ~1e-5..1e-2: a linear axis would stack them at 0
    ax2.set_xscale("symlog", linthresh=1e-3)
    ax2.set_xlim(-1e-4, 1.0)
    ax2.set_xlabel("ATC (source -> target), symlog axis (linear below 0.001)")
    ax2.set_ylabel("share of the Trained gain recovered (%)")
    ax2.set_title("Transferred vs trained, by ATC")
    ax2.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.12))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
