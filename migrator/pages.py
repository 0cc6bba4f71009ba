"""The lineage as the MLflow UI shows it: a markdown section on base and adapter version pages
(links both ways: successors and predecessors, the adapters carried off a base and those that
arrived, where each adapter version went), and the one-line description of a registered model.

The section starts at :data:`MARKER` and replaces only itself: what a person wrote above it
stays. Links are relative to the UI (``#/models/NAME/versions/N``), so every version page leads
to the next by clicks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from migrator.registry import VersionRef
from migrator.registry.pages import Alias

__all__ = [
    "MARKER",
    "Carry",
    "adapter_section",
    "base_section",
    "merge_section",
    "model_description",
]

MARKER = "#### Lineage (kept up to date by LoRA-X Migrator)"

Link = Callable[[VersionRef], str]

_MODEL_DESCRIPTIONS = {
    "base": "LoRA-X base model: each version's page links its successors or predecessors and "
    "the adapters carried off it or onto it.",
    "adapter": "LoRA-X adapter lineage: one version per base it lives on; each version's page "
    "links where it came from and where it was carried.",
}


@dataclass(frozen=True)
class Carry:
    """One transfer job as the pages show it."""

    job_id: int
    adapter: VersionRef  # the source adapter version
    source_base: VersionRef
    target: VersionRef
    status: str
    result: VersionRef | None
    atc: float | None


def _escape(text: str) -> str:
    for char in "\\`*_[]|<>":
        text = text.replace(char, "\\" + char)
    return text


def ref_link(ref: VersionRef, link: Link) -> str:
    """``[name v3](#/models/name/versions/3)``."""
    return f"[{_escape(ref.name)} v{ref.version}]({link(ref)})"


def _outcome(c: Carry, link: Link) -> str:
    """What became of a carry, in words."""
    atc = "" if c.atc is None else f", ATC {c.atc:.3f}"
    if c.status == "succeeded" and c.result is not None:
        return f"registered as {ref_link(c.result, link)} (job {c.job_id}{atc})"
    words = {
        "pending_approval": f"waiting for approval (job {c.job_id}{atc}): "
        f"`migrator approvals approve {c.job_id}`, or set the alias "
        f"`{Alias.approved(c.job_id)}` on this adapter",
        "approved": f"approved, to be transferred (job {c.job_id}{atc})",
        "running": f"being transferred (job {c.job_id}{atc})",
        "failed": f"failed (job {c.job_id}): `migrator jobs show {c.job_id}`",
        "skipped": f"skipped: the bases are too different (job {c.job_id}{atc})",
        "rejected": f"rejected by an admin (job {c.job_id})",
    }
    return words.get(c.status, f"{c.status} (job {c.job_id})")


def merge_section(description: str, section: str) -> str:
    """``description`` with its lineage section replaced by (or extended with) ``section``."""
    head = description.split(MARKER, 1)[0].rstrip()
    return (head + "\n\n" if head else "") + MARKER + "\n\n" + section.strip() + "\n"


def _refs(refs: Sequence[VersionRef], link: Link) -> str:
    return ", ".join(ref_link(r, link) for r in refs)


def base_section(
    base: VersionRef,
    *,
    successors: Sequence[VersionRef],
    predecessors: Sequence[VersionRef],
    adapters: Sequence[VersionRef],
    carried: Sequence[Carry],
    arrived: Sequence[Carry],
    link: Link,
) -> str:
    """The lineage section of a base version page.

    Args:
        successors: the bases that deprecate it (empty: it is active).
        predecessors: the bases it deprecates.
        adapters: adapter versions on it that did not arrive by a transfer, or were carried on.
        carried: jobs carrying its adapters to other bases.
        arrived: jobs carrying adapters onto it (those with a registered result are shown).
    """
    lines = []
    if successors:
        lines.append(f"**Deprecated**: superseded by {_refs(successors, link)}.")
    else:
        lines.append("**Active** base: no successor yet.")
    if predecessors:
        lines.append(f"\nSupersedes {_refs(predecessors, link)}.")
    by_adapter: dict[VersionRef, list[Carry]] = {}
    for c in carried:
        by_adapter.setdefault(c.adapter, []).append(c)
    if adapters:
        lines += ["", "| adapter on this base | carried to | outcome |", "|---|---|---|"]
        for adapter in adapters:
            jobs = by_adapter.get(adapter, [])
            if not jobs:
                lines.append(f"| {ref_link(adapter, link)} | - | - |")
            for c in jobs:
                lines.append(
                    f"| {ref_link(adapter, link)} | {ref_link(c.target, link)} "
                    f"| {_outcome(c, link)} |"
                )
    arrived = [c for c in arrived if c.result is not None]
    if arrived:
        lines += ["", "| adapter that arrived | transferred from | job |", "|---|---|---|"]
        for c in arrived:
            assert c.result is not None
            source = f"{ref_link(c.adapter, link)} on {ref_link(c.source_base, link)}"
            atc = "" if c.atc is None else f", ATC {c.atc:.3f}"
            lines.append(f"| {ref_link(c.result, link)} | {source} | {c.job_id}{atc} |")
    return "\n".join(lines)


def adapter_section(
    adapter: VersionRef,
    *,
    base: VersionRef,
    base_deprecated: bool,
    carried: Sequence[Carry],
    came_from: Carry | None,
    link: Link,
) -> str:
    """The lineage section of an adapter version page: its base, where it came from, where it
    was carried."""
    state = " (deprecated)" if base_deprecated else ""
    lines = [f"On base {ref_link(base, link)}{state}."]
    if came_from is not None:
        lines.append(
            f"\nTransferred from {ref_link(came_from.adapter, link)} on "
            f"{ref_link(came_from.source_base, link)} (job {came_from.job_id})."
        )
    if carried:
        lines += ["", "| carried to base | outcome |", "|---|---|"]
        lines += [f"| {ref_link(c.target, link)} | {_outcome(c, link)} |" for c in carried]
    return "\n".join(lines)


def model_description(role: str) -> str:
    """The one-line description of a base or adapter registered model."""
    return _MODEL_DESCRIPTIONS[role]


def is_generated_model_description(text: str) -> bool:
    """Whether a registered model's description is one of ours (so it may be rewritten)."""
    return text.strip() in _MODEL_DESCRIPTIONS.values()
