"""What people look at: the similarity heatmap, the module map, and the version description."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np

if TYPE_CHECKING:
    from migrator.documents import ModuleCounts

__all__ = ["TransferSummary", "plot_similarity", "version_description"]

_MAX_TICK_LABELS = 48


def _short(name: str) -> str:
    """Shorten a module name for an axis label, keeping what tells modules apart."""
    for long, short in (
        ("down_blocks", "db"),
        ("up_blocks", "ub"),
        ("mid_block", "mb"),
        ("attentions", "at"),
        ("transformer_blocks", "tb"),
        ("encoder.layer", "L"),
        ("model.layers", "L"),
        ("attention.self.", ""),
        ("attention.output.", "o."),
        ("self_attn.", ""),
    ):
        name = name.replace(long, short)
    return name


def plot_similarity(
    phi_left: np.ndarray,
    phi_right: np.ndarray,
    sources: Sequence[str],
    targets: Sequence[str],
    out: Path | BinaryIO,
    *,
    title: str,
    matches: Sequence[tuple[int, int]] = (),
) -> None:
    """Write a PNG with the left (U) and right (V) subspace similarity of every module pair.

    Args:
        phi_left, phi_right: (S, T) similarities in [0, 1] (0 for invalid pairs).
        sources, targets: module names along the rows and columns.
        out: PNG path, or a binary file to write the PNG to.
        title: figure title (e.g. the two bases and the ATC).
        matches: (source index, target index) of the chosen module pairs, marked on the plot.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_s, n_t = phi_left.shape
    side = min(16.0, 4.0 + 0.12 * max(n_s, n_t))
    fig, axes = plt.subplots(1, 2, figsize=(2 * side + 1.5, side), constrained_layout=True)
    for ax, phi, label in ((axes[0], phi_left, "left (U)"), (axes[1], phi_right, "right (V)")):
        image = ax.imshow(phi, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        ax.set_title(f"subspace similarity, {label}")
        ax.set_xlabel("target module")
        ax.set_ylabel("source module")
        if n_t <= _MAX_TICK_LABELS:
            ax.set_xticks(range(n_t), [_short(t) for t in targets], rotation=90, fontsize=6)
        if n_s <= _MAX_TICK_LABELS:
            ax.set_yticks(range(n_s), [_short(s) for s in sources], fontsize=6)
        if matches:
            rows, cols = zip(*matches, strict=True)
            ax.scatter(cols, rows, s=8, marker="s", facecolors="none", edgecolors="red", lw=0.6)
    fig.colorbar(image, ax=axes, shrink=0.8, label="Psi")
    fig.suptitle(title)
    if isinstance(out, Path):
        out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, format="png")
    plt.close(fig)


@dataclass(frozen=True)
class TransferSummary:
    """What the description of a transferred adapter version says."""

    adapter_name: str
    source_version: str
    source_link: str
    old_base: str
    old_base_link: str | None
    new_base: str
    new_base_link: str | None
    run_link: str
    job_id: int
    atc: float
    atc_left: float
    atc_right: float
    mode: str
    energy_retained: float
    counts: ModuleCounts
    approved_by: str
    is_lorax: bool
    notes: tuple[str, ...] = ()


def _link(text: str, href: str | None) -> str:
    return f"[{text}]({href})" if href else f"`{text}`"


def version_description(s: TransferSummary) -> str:
    """Markdown shown on the MLflow version page: where it came from, how, and how well.

    The links are relative to the MLflow UI (``#/models/...``), so a person can walk the lineage
    from version page to version page.
    """
    lines = [
        f"**Transferred LoRA-X adapter** (job {s.job_id}), made without training from "
        f"{_link(f'{s.adapter_name} v{s.source_version}', s.source_link)}.",
        "",
        "| | |",
        "|---|---|",
        f"| from base | {_link(s.old_base, s.old_base_link)} |",
        f"| to base | {_link(s.new_base, s.new_base_link)} |",
        f"| migration run | [{s.run_link.rsplit('/', 1)[-1]}]({s.run_link}) |",
        f"| ATC (left / right) | {s.atc:.3f} ({s.atc_left:.3f} / {s.atc_right:.3f}) |",
        f"| mode | {s.mode} |",
        f"| energy retained | {s.energy_retained:.1%} |",
        *(f"| {label} | {value} |" for label, value in s.counts.rows()),
        f"| approved by | {s.approved_by} |",
    ]
    notes = list(s.notes)
    if not s.is_lorax:
        notes.insert(
            0,
            "The source is a plain LoRA, not a LoRA-X: it was projected onto the new base's "
            "subspace, which keeps less of its effect than a LoRA-X transfer.",
        )
    if notes:
        lines += ["", "**Notes**", ""] + [f"- {n}" for n in notes]
    lines += [
        "",
        "The migration run holds the metrics, the module map (`module_map.json`) and the "
        "similarity heatmap (`similarity.png`).",
    ]
    return "\n".join(lines)
