"""The compact tables: names shortened in the middle where rows agree, widths fitted."""

from __future__ import annotations

from io import StringIO

from rich.console import Console

from migrator.cli.tables import Column, fit_widths, middle_ellipsis, print_table, shared_prefix


def test_middle_ellipsis_keeps_both_ends() -> None:
    assert middle_ellipsis("short", 10) == "short"
    cut = middle_ellipsis("minilm-docs-files/1", 12)
    assert len(cut) == 12 and cut.startswith("minilm") and cut.endswith("les/1") and "…" in cut


def test_the_cut_falls_where_the_rows_agree() -> None:
    names = ["encoder.layer.0.attention.self.query", "encoder.layer.1.attention.self.query"]
    shared = shared_prefix(names)
    assert shared == len("encoder.layer.")
    cut = [middle_ellipsis(n, 26, shared=shared) for n in names]
    assert cut[0] != cut[1] and all(len(c) == 26 for c in cut)
    assert cut[0].endswith("0.attention.self.query") and cut[1].endswith("1.attention.self.query")


def test_fit_widths_narrows_only_names() -> None:
    assert fit_widths([2, 30, 30], [False, True, True], [2, 8, 8], 50) == [2, 22, 22]
    assert fit_widths([2, 30], [False, True], [2, 8], 5) == [2, 8]  # no narrower than min


def test_a_table_fits_the_console_one_line_a_row() -> None:
    buffer = StringIO()
    console = Console(file=buffer, width=40)
    columns = (Column("ID"), Column("NAME", squeeze=True), Column("MORE", wide_only=True))
    rows = [(i, f"a-very-long-registered-model-name-{i}/1", "x") for i in range(3)]
    print_table(console, columns, rows)
    lines = buffer.getvalue().splitlines()
    assert len(lines) == 4 and max(map(len, lines)) <= 40 and "MORE" not in lines[0]
    buffer.seek(0), buffer.truncate()
    print_table(console, columns, rows, wide=True)
    assert (
        "a-very-long-registered-model-name-0/1" in buffer.getvalue() and "MORE" in buffer.getvalue()
    )
