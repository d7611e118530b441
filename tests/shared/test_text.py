"""shared.text: the one table printer of the CLIs and the benchmark report."""

from __future__ import annotations

import pytest

from hybridml.shared.text import format_table

HEADER = ["name", "bytes", "note"]
ROWS = [["digits", "24,060", "int8"], ["eta", "6,741,878", ""]]


def test_plain_table_pads_columns_rules_the_header_and_strips_line_ends() -> None:
    assert format_table(HEADER, ROWS).splitlines() == [
        "name    bytes      note",
        "------  ---------  ----",
        "digits  24,060     int8",
        "eta     6,741,878",
    ]


def test_right_alignment_indent_and_no_rule() -> None:
    assert format_table(HEADER, ROWS, align="lr", indent="  ", rule=False).splitlines() == [
        "  name        bytes  note",
        "  digits     24,060  int8",
        "  eta     6,741,878",
    ]


def test_markdown_table_has_pipes_and_marks_right_aligned_columns() -> None:
    assert format_table(["a", "n"], [["x", 1.5], ["yy", 10]], align="lr",
                        markdown=True).splitlines() == [
        "| a   |   n |",
        "|-----|----:|",
        "| x   | 1.5 |",
        "| yy  |  10 |",
    ]


def test_a_header_alone_still_makes_a_table() -> None:
    assert format_table(["id", "role"], []) == "id  role\n--  ----"


def test_rows_of_the_wrong_width_and_unknown_alignments_are_refused() -> None:
    with pytest.raises(ValueError, match="row 1 has 2 cells; the header has 3"):
        format_table(HEADER, [ROWS[0], ["x", "y"]])
    with pytest.raises(ValueError, match="align takes 'l' and 'r'"):
        format_table(HEADER, ROWS, align="lc")
