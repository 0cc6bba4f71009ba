"""The similarity heatmaps of a base pair, readable inside the MLflow UI.

One PNG per base pair (``similarity.png``), sized to its module count, with a colour scale and
a legend for the chosen module matches. Past :data:`FULL_MAP_LIMIT` modules a full map is
unreadable at a page's width: ``similarity.png`` is then a per-block summary (blocks: the
layers or transformer blocks the names share) and the full map is ``similarity_full.png``.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["FULL_MAP_LIMIT", "Match", "block_of", "heatmap_figures", "summarize_blocks"]

#: Modules per side above which ``similarity.png`` is a per-block summary.
FULL_MAP_LIMIT = 96
_MAX_TICK_LABELS = 64
_MAX_BLOCKS = 48
_CMAP = "viridis"
_SEGMENT = re.compile(r"^\d+$")


@dataclass(frozen=True)
class Match:
    """A chosen module pair: source row, target column, and whether the names differ."""

    source: int
    target: int
    rematched: bool = False


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


def block_of(name: str, depth: int) -> str:
    """A module's block: its name up to and including its ``depth``-th numeric segment
    (``encoder.layer.3.attention.self.query`` -> ``encoder.layer.3`` at depth 1)."""
    parts = name.split(".")
    seen = 0
    for i, part in enumerate(parts):
        if _SEGMENT.match(part):
            seen += 1
            if seen == depth:
                return ".".join(parts[: i + 1])
    return ".".join(parts[:-1]) or name


def _blocks(names: Sequence[str]) -> tuple[list[str], list[int]]:
    """(block names in first-seen order, block index of each module), at the finest depth
    that gives at most ``_MAX_BLOCKS`` blocks."""
    best: tuple[list[str], list[int]] | None = None
    numeric = min((sum(bool(_SEGMENT.match(p)) for p in n.split(".")) for n in names), default=0)
    for depth in range(1, min(numeric, 3) + 1):
        labels = [block_of(n, depth) for n in names]
        order = list(dict.fromkeys(labels))
        if len(order) > _MAX_BLOCKS:
            break
        best = (order, [order.index(label) for label in labels])
    if best is None:
        labels = [block_of(n, 1) for n in names]
        order = list(dict.fromkeys(labels))
        best = (order, [order.index(label) for label in labels])
    return best


def summarize_blocks(
    phi: np.ndarray, sources: Sequence[str], targets: Sequence[str], matches: Sequence[Match]
) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """Per block pair: the mean over the target block's modules of the best similarity any
    module of the source block offers, and how many chosen matches go from one to the other.

    Returns:
        (summary (Bs, Bt), match counts (Bs, Bt), source block names, target block names).
    """
    src_blocks, src_of = _blocks(sources)
    tgt_blocks, tgt_of = _blocks(targets)
    summary = np.zeros((len(src_blocks), len(tgt_blocks)))
    src_index = np.array(src_of)
    tgt_index = np.array(tgt_of)
    for bs in range(len(src_blocks)):
        best = phi[src_index == bs].max(axis=0)  # best source of the block, per target
        for bt in range(len(tgt_blocks)):
            summary[bs, bt] = float(best[tgt_index == bt].mean())
    counts = np.zeros_like(summary, dtype=int)
    for m in matches:
        counts[src_of[m.source], tgt_of[m.target]] += 1
    return summary, counts, src_blocks, tgt_blocks


def _figure(rows: int, cols: int):  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cell = 0.16 if max(rows, cols) <= _MAX_TICK_LABELS else 0.05
    side_w = min(30.0, max(3.5, 1.6 + cell * cols))
    side_h = min(30.0, max(3.0, 1.8 + cell * rows))
    fig, axes = plt.subplots(
        1, 2, figsize=(2 * side_w + 1.4, side_h + 1.2), constrained_layout=True, squeeze=False
    )
    return plt, fig, axes[0]


def _legend(fig, axes, image, *, label: str, handles: list) -> None:  # type: ignore[no-untyped-def]
    fig.colorbar(image, ax=list(axes), shrink=0.85, label=label)
    if handles:
        fig.legend(
            handles=handles,
            loc="outside lower center",
            ncols=len(handles),
            fontsize=8,
            facecolor="lightgray",
        )


def _full_map(
    phi_left: np.ndarray,
    phi_right: np.ndarray,
    sources: Sequence[str],
    targets: Sequence[str],
    matches: Sequence[Match],
    title: str,
) -> bytes:
    from matplotlib.lines import Line2D

    n_s, n_t = phi_left.shape
    plt, fig, axes = _figure(n_s, n_t)
    image = None
    for ax, phi, side in ((axes[0], phi_left, "left (U)"), (axes[1], phi_right, "right (V)")):
        image = ax.imshow(phi, vmin=0.0, vmax=1.0, cmap=_CMAP, aspect="auto")
        ax.set_title(f"subspace similarity, {side}", fontsize=9)
        ax.set_xlabel("target module")
        ax.set_ylabel("source module")
        if n_t <= _MAX_TICK_LABELS:
            ax.set_xticks(range(n_t), [_short(t) for t in targets], rotation=90, fontsize=6)
        if n_s <= _MAX_TICK_LABELS:
            ax.set_yticks(range(n_s), [_short(s) for s in sources], fontsize=6)
        for rematched, colour in ((False, "white"), (True, "red")):
            chosen = [m for m in matches if m.rematched is rematched]
            if chosen:
                ax.scatter(
                    [m.target for m in chosen],
                    [m.source for m in chosen],
                    s=max(4.0, 400.0 / max(n_s, n_t)),
                    marker="s",
                    facecolors="none",
                    edgecolors=colour,
                    linewidths=0.8,
                )
    handles = [
        Line2D([], [], marker="s", ls="", mfc="none", mec=c, label=label)
        for c, label in (
            ("white", "chosen: same name"),
            ("red", "chosen: rematched (another name)"),
        )
    ]
    _legend(fig, axes, image, label="Psi_k (0 unrelated, 1 same subspace)", handles=handles)
    fig.suptitle(title, fontsize=10)
    return _png(plt, fig)


def _summary_map(
    phi_left: np.ndarray,
    phi_right: np.ndarray,
    sources: Sequence[str],
    targets: Sequence[str],
    matches: Sequence[Match],
    title: str,
) -> bytes:
    left, counts, src_blocks, tgt_blocks = summarize_blocks(phi_left, sources, targets, matches)
    right, _, _, _ = summarize_blocks(phi_right, sources, targets, matches)
    plt, fig, axes = _figure(len(src_blocks), len(tgt_blocks))
    image = None
    for ax, summary, side in ((axes[0], left, "left (U)"), (axes[1], right, "right (V)")):
        image = ax.imshow(summary, vmin=0.0, vmax=1.0, cmap=_CMAP, aspect="auto")
        ax.set_title(f"per block, {side}", fontsize=9)
        ax.set_xticks(range(len(tgt_blocks)), [_short(b) for b in tgt_blocks], rotation=90)
        ax.set_yticks(range(len(src_blocks)), [_short(b) for b in src_blocks])
        ax.tick_params(labelsize=6)
        ax.set_xlabel("target block")
        ax.set_ylabel("source block")
        for (bs, bt), n in np.ndenumerate(counts):
            if n:
                ax.text(bt, bs, str(n), ha="center", va="center", fontsize=6, color="red")
    label = "mean over target modules of the best Psi_k in the source block"
    _legend(fig, axes, image, label=label, handles=[])
    fig.suptitle(
        f"{title}\nred numbers: chosen module matches per block pair; full map: "
        "similarity_full.png",
        fontsize=9,
    )
    return _png(plt, fig)


def _png(plt, fig) -> bytes:  # type: ignore[no-untyped-def]
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=100, format="png")
    plt.close(fig)
    return buffer.getvalue()


def heatmap_figures(
    phi_left: np.ndarray,
    phi_right: np.ndarray,
    sources: Sequence[str],
    targets: Sequence[str],
    *,
    title: str,
    matches: Sequence[Match] = (),
) -> dict[str, bytes]:
    """The heatmap files of a base pair: file name -> PNG bytes.

    Args:
        phi_left, phi_right: (S, T) similarities in [0, 1] (0 for invalid pairs).
        sources, targets: module names along the rows and columns.
        title: figure title (the two bases and the ATC).
        matches: the chosen module pairs, marked on the map.

    Returns:
        ``{"similarity.png": full map}``, or past :data:`FULL_MAP_LIMIT` modules
        ``{"similarity.png": per-block summary, "similarity_full.png": full map}``.
    """
    full = _full_map(phi_left, phi_right, sources, targets, matches, title)
    if max(phi_left.shape) <= FULL_MAP_LIMIT:
        return {"similarity.png": full}
    summary = _summary_map(phi_left, phi_right, sources, targets, matches, title)
    return {"similarity.png": summary, "similarity_full.png": full}
