"""Pieces of the self-contained HTML pages (the monitor report, the model card).

A page is one file: plots are PNGs inlined as base64 data URIs, the style is inline, and
nothing links out, so it opens from a mail attachment or an artifact store as well as from
disk. Every text cell is escaped here; callers escape the text they write around them.

matplotlib is imported lazily, with the Agg backend (no display needed), by :func:`figure`.
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hybridml.shared.files import atomic_write

STYLE = ("<style>body{font-family:sans-serif;margin:2em;max-width:1100px}"
         "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;"
         "padding:3px 8px;text-align:left}.alert{color:#c62828;font-weight:bold}"
         ".muted{color:#777}img{max-width:100%}</style>")


def write(text: str, path: str | os.PathLike[str]) -> Path:
    """Write the page ``text`` to ``path`` atomically (UTF-8); return the path."""
    out = Path(path)
    atomic_write(out, text.encode("utf-8"))
    return out


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """An HTML table; None shows as ``-``, floats with 4 decimals, every cell escaped."""
    def cell(v: Any) -> str:
        text = "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)
        return html.escape(text)

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def img(png_bytes: bytes, alt: str = "plot") -> str:
    """An ``<img>`` with the PNG inlined as a base64 data URI."""
    data = base64.b64encode(png_bytes).decode()
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{data}'>"


def figure(height: float, width: float = 9.0, rows: int = 1) -> tuple[Any, Any]:
    """A new matplotlib ``(figure, axes)`` on the Agg backend (imported here, lazily); with
    ``rows`` > 1, the axes are an array of that many stacked plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(rows, 1, figsize=(width, height), squeeze=rows == 1)


def plain(text: object) -> str:
    """``text`` for a plot label: matplotlib would read ``$...$`` as mathematics."""
    return str(text).replace("$", r"\$")


def png(fig: Any) -> bytes:
    """The figure as PNG bytes; the figure is closed."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


__all__ = ["STYLE", "figure", "img", "plain", "png", "table"]
