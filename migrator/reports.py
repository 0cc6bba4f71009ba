"""What people read on a transferred version's page: its description (the heatmaps are
:mod:`migrator.heatmaps`, the lineage sections :mod:`migrator.pages`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from migrator.documents import ModuleCounts

__all__ = ["TransferSummary", "version_description"]


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
    signals: tuple[tuple[str, str], ...] = ()  # (name, "value (threshold): verdict; detail")


def _run_id(run_link: str) -> str:
    """The run id of a run link (``#/experiments/E/runs/ID?...``)."""
    return run_link.split("?", 1)[0].rsplit("/", 1)[-1]


def _experiment_link(run_link: str) -> str:
    """The link of the experiment holding the run, its runs listed (model-training layout)."""
    path, _, query = run_link.partition("?")
    return path.split("/runs/", 1)[0] + (f"?{query}" if query else "")


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
        f"| migration run | [{_run_id(s.run_link)}]({s.run_link}) in the "
        f"[migration experiment]({_experiment_link(s.run_link)}) |",
        f"| ATC (left / right) | {s.atc:.3f} ({s.atc_left:.3f} / {s.atc_right:.3f}) |",
        f"| mode | {s.mode} |",
        f"| energy retained | {s.energy_retained:.1%} |",
        *(f"| {label} | {value} |" for label, value in s.counts.rows()),
        f"| approved by | {s.approved_by} |",
    ]
    if s.signals:
        lines += [
            "",
            "**Signals behind the decision**",
            "",
            "| signal | value, threshold, verdict |",
        ]
        lines += ["|---|---|"] + [
            f"| {name} | {text.split(' ', 1)[-1]} |" for name, text in s.signals
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
        "similarity heatmap (`similarity.png`; for hundreds of modules a per-block summary, "
        "with the full map in `similarity_full.png`).",
    ]
    return "\n".join(lines)
