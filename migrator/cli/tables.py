"""Tables the way ``kubectl get`` prints them: one line per row, fitted to the terminal by
shortening names in the middle (``minilm-d…-files/1``), every column and full names with
``--wide``. The long detail of one object is a ``show`` command's."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rich.console import Console
from rich.text import Text

__all__ = ["ELLIPSIS", "Column", "fit_widths", "middle_ellipsis", "print_table", "shared_prefix"]

ELLIPSIS = "…"
GAP = 2  # spaces between columns


@dataclass(frozen=True)
class Column:
    """A table column.

    Attributes:
        header: printed in capitals.
        squeeze: may be shortened (names); other columns keep their width.
        wide_only: shown only with ``--wide``.
        justify: ``left`` or ``right``.
        min_width: the narrowest a squeezed column gets.
    """

    header: str
    squeeze: bool = False
    wide_only: bool = False
    justify: str = "left"
    min_width: int = 8


def middle_ellipsis(text: str, width: int, *, shared: int = 0) -> str:
    """``text`` in at most ``width`` characters, a middle part replaced by an ellipsis, so that
    the start and the end of a name still tell it apart (``minilm-docs-files/1`` ->
    ``minilm…files/1``).

    Args:
        shared: how many leading characters every value of the column shares: the cut is made
            there when it fits, so that what differs between rows stays
            (``encoder.layer.0.attention.self.query`` -> ``enc…0.attention.self.query``).
    """
    if len(text) <= width:
        return text
    if width <= 1:
        return ELLIPSIS[:width]
    cut = len(text) - width + 1
    if shared - cut >= 1:
        keep = shared - cut
        return text[:keep] + ELLIPSIS + text[keep + cut :]
    head = width // 2
    tail = width - 1 - head
    return text[:head] + ELLIPSIS + (text[len(text) - tail :] if tail else "")


def shared_prefix(values: Sequence[str]) -> int:
    """The length of the prefix every value starts with (0 for fewer than two values)."""
    if len(values) < 2:
        return 0
    first, *rest = values
    length = len(first)
    for value in rest:
        length = min(length, len(value))
        while value[:length] != first[:length]:
            length -= 1
    return length


def fit_widths(
    natural: Sequence[int], squeeze: Sequence[bool], minimum: Sequence[int], total: int
) -> list[int]:
    """Column widths that fit ``total`` characters (with the gaps), narrowing the widest
    squeezable column one character at a time; as narrow as the minimums allow otherwise."""
    widths = list(natural)
    room = total - GAP * (len(widths) - 1)
    while sum(widths) > room:
        candidates = [i for i, w in enumerate(widths) if squeeze[i] and w > minimum[i]]
        if not candidates:
            break
        widest = max(candidates, key=lambda i: widths[i])
        widths[widest] -= 1
    return widths


def _line(cells: Sequence[str], widths: Sequence[int], columns: Sequence[Column]) -> str:
    parts = []
    for cell, width, column in zip(cells, widths, columns, strict=True):
        parts.append(cell.rjust(width) if column.justify == "right" else cell.ljust(width))
    return (" " * GAP).join(parts).rstrip()


def print_table(
    console: Console,
    columns: Sequence[Column],
    rows: Sequence[Sequence[object]],
    *,
    wide: bool = False,
    title: str | None = None,
) -> None:
    """Print ``rows`` under ``columns``: fitted to the console's width, or (``wide``) every
    column at its full width. A row holds one value per column, wide-only ones included."""
    keep = [i for i, c in enumerate(columns) if wide or not c.wide_only]
    shown = [columns[i] for i in keep]
    cells = [["-" if row[i] is None or row[i] == "" else str(row[i]) for i in keep] for row in rows]
    cells = [[c.replace("\n", " ") for c in row] for row in cells]
    natural = [max([len(c.header)] + [len(r[j]) for r in cells]) for j, c in enumerate(shown)]
    widths = natural
    if not wide:
        minimum = [
            max(len(c.header), min(c.min_width, n)) for c, n in zip(shown, natural, strict=True)
        ]
        widths = fit_widths(natural, [c.squeeze for c in shown], minimum, console.width)
    if title:
        console.print(Text(title, style="bold"))
    console.print(Text(_line([c.header for c in shown], widths, shown), style="bold"))
    shared = [shared_prefix([r[j] for r in cells if r[j] != "-"]) for j in range(len(shown))]
    for row in cells:
        fitted = [
            middle_ellipsis(c, w, shared=p) for c, w, p in zip(row, widths, shared, strict=True)
        ]
        console.print(Text(_line(fitted, widths, shown)), soft_wrap=True)
