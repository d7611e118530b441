"""Text for people: tables for the command lines and reports, and echoed input made safe.

:func:`printable` is how text that came from a request (a path, a header, a column name) goes
into a log line or an error's details: control characters, lone surrogates and other
non-printables become escapes, and the length is capped, so a request cannot forge log lines
or make an encoder fail.

Plain (the CLIs)::

    name    latest  versions
    ------  ------  --------
    digits  1       1

Markdown (the benchmark report) has the same columns between pipes, and a ``---:`` rule under
right-aligned ones. Columns are as wide as their widest cell; lines carry no trailing blanks.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

ECHO_LIMIT = 200


def printable(text: str, limit: int = ECHO_LIMIT) -> str:
    """``text`` with every non-printable character escaped and at most ``limit`` of its
    characters kept (then ``...``): safe in one log line and in UTF-8 output.

    Escapes look like Python's (``\\r``, ``\\n``, ``\\t``, ``\\x1b``, ``\\ud800``); printable
    text, including letters of any script, is kept as it is. The result is for people, not
    for parsing back: a backslash already in ``text`` is left alone.
    """
    if len(text) <= limit and text.isprintable():  # the common case: nothing to do
        return text
    cut = text[:limit]
    out = "".join(c if c.isprintable() else _escape(c) for c in cut)
    return out if len(text) <= limit else out + "..."


def _escape(c: str) -> str:
    code = ord(c)
    named = _NAMED.get(c)
    if named is not None:
        return named
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def format_table(header: Sequence[str], rows: Iterable[Sequence[object]], *, align: str = "",
                 indent: str = "", rule: bool = True, markdown: bool = False,
                 widths: Sequence[int] | None = None, show_header: bool = True) -> str:
    """Return ``rows`` under ``header`` as aligned text, one line per row.

    ``align`` gives one letter per column, ``l`` (left, the default for columns it does not
    cover) or ``r`` (right, for numbers). ``indent`` starts every line. ``rule`` draws dashes
    under the header (always on in Markdown, which needs it). Cells are ``str()``-ed.
    ``widths`` fixes the columns' widths (a longer cell overflows), for a table printed in
    parts (:func:`column_widths` of the first part); ``show_header=False`` leaves out the
    header lines, for the parts after the first.
    """
    cells = [[str(c) for c in row] for row in rows]
    n = len(header)
    bad = [i for i, row in enumerate(cells) if len(row) != n]
    if bad:
        raise ValueError(f"row {bad[0]} has {len(cells[bad[0]])} cells; the header has {n}")
    if set(align) - {"l", "r"}:
        raise ValueError(f"align takes 'l' and 'r' per column, got {align!r}")
    right = [align[i:i + 1] == "r" for i in range(n)]
    if widths is None:
        widths = column_widths(header, cells)
    if markdown:
        widths = [max(w, 3) for w in widths]

    def line(row: Sequence[str]) -> str:
        padded = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right)]
        if markdown:
            return f"{indent}| {' | '.join(padded)} |"
        return (indent + "  ".join(padded)).rstrip()

    out = []
    if show_header:
        out.append(line(header))
        if markdown:
            out.append(indent + "|" + "|".join(
                "-" * (w + 1) + ":" if r else "-" * (w + 2) for w, r in zip(widths, right))
                + "|")
        elif rule:
            out.append(line(["-" * w for w in widths]))
    out += [line(row) for row in cells]
    return "\n".join(out)


def column_widths(header: Sequence[str], rows: Iterable[Sequence[object]]) -> list[int]:
    """The width :func:`format_table` gives each column: its longest cell or header."""
    cells = [[str(c) for c in row] for row in rows]
    return [max([len(h), *(len(row[i]) for row in cells if i < len(row))])
            for i, h in enumerate(header)]


__all__ = ["ECHO_LIMIT", "column_widths", "format_table", "printable"]
