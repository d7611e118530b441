"""The monitor's HTML page: one self-contained file (PNG plots inlined as base64, no links).

``hybridml-cloud monitor eta --report drift.html`` writes it from the monitor's report
(:func:`hybridml.cloud.monitor.monitor`): the verdict, then drift per feature, performance over
time and traffic by source, each a plot and a table. It opens from a mail attachment or an
artifact store as well as from disk. Every text from devices (names, sources) is escaped.

matplotlib is imported only when a page is drawn, with the Agg backend (no display
needed), by :mod:`hybridml.cloud.htmlpage`, which the model card's page shares.
"""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any

from .htmlpage import figure, img, png, table, write

COLORS = {"ok": "#4c9a2a", "warn": "#e0a100", "alert": "#c62828", "insufficient": "#9e9e9e"}
WARN, ALERT = 0.1, 0.25  # the PSI lines drawn (hybridml.shared.drift.Thresholds' defaults)


def write_report(result: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write the page for ``result`` to ``path`` (atomically); return the path."""
    return write(render(result), path)


def render(result: dict[str, Any]) -> str:
    """The page as HTML text."""
    e = html.escape
    d = result["diagnosis"]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{e(result['model'])} v{result['version']} monitor</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1100px}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;"
        "padding:3px 8px;text-align:left}.alert{color:#c62828;font-weight:bold}"
        "img{max-width:100%}</style></head><body>",
        f"<h1>{e(result['model'])} v{result['version']}</h1>",
        f"<p>{e(result['window']['start'])} .. {e(result['window']['end'])}: "
        f"{result['rows']:,} rows from {len(result['devices'])} devices</p>",
        f"<h2>Verdict: <span class='{'alert' if d['verdict'] != 'stable' else ''}'>"
        f"{e(d['verdict'])}</span></h2><p>{e(d['rule'])}</p>",
        "<h2>Drift per feature</h2>", img(_drift_plot(result)),
        table(["feature", "kind", "rows", "psi", "status"],
              [[f["name"], f["kind"], f["rows"], f.get("psi"), f["status"]]
               for f in result["features"]]),
        f"<p>Dataset drift: <b>{'yes' if result['dataset_drift'] else 'no'}</b></p>",
        "<h2>Performance over time</h2>",
        img(_performance_plot(result)) if result["performance"] else "<p>No feedback yet.</p>",
        table(["version", "start", "labels", "metric", "value", "estimate"],
              [[p["version"], p["start"], p["labels"], p["metric"], p["value"],
                p["estimate"]] for p in result["performance"]]),
        "<h2>Traffic by source</h2>",
        img(_traffic_plot(result)) if result["traffic"] else "<p>No traffic.</p>",
        "<h2>Devices</h2>",
        table(["device", "last seen", "rows", "in period", "dataset drift", "alerts"],
              [[x["device"], x["last_seen"], x["rows"], x["period_rows"], x["dataset_drift"],
                ", ".join(x["alerts"])] for x in result["devices"]]),
        "</body></html>",
    ]
    return "\n".join(parts)


def _drift_plot(result: dict[str, Any]) -> bytes:
    feats = result["features"]
    fig, ax = figure(0.4 * len(feats) + 1.5)
    names = [f["name"] for f in feats]
    ax.barh(names, [f.get("psi") or 0.0 for f in feats],
            color=[COLORS.get(f["status"], "#9e9e9e") for f in feats])
    for x, style in ((WARN, ":"), (ALERT, "--")):
        ax.axvline(x, color="#555", linestyle=style, linewidth=1)
    ax.invert_yaxis()
    ax.set_xlabel("PSI against the training profile (dotted: warn, dashed: alert)")
    return png(fig)


def _performance_plot(result: dict[str, Any]) -> bytes:
    fig, ax = figure(3.5)
    for v in sorted({p["version"] for p in result["performance"]}):
        for estimate, style in ((False, "-o"), (True, "--x")):
            pts = [p for p in result["performance"] if p["version"] == v
                   and p["estimate"] is estimate]
            if pts:
                ax.plot([p["start"][:10] for p in pts], [p["value"] for p in pts], style,
                        label=f"v{v}" + (" (estimate)" if estimate else ""))
    ref = result["reference"]
    if ref["value"] is not None:
        ax.axhline(ref["value"], color="#555", linestyle=":", linewidth=1,
                   label=f"held-out {ref['metric']}")
    ax.set_ylabel(ref["metric"])
    ax.legend(fontsize="small")
    ax.tick_params(axis="x", rotation=30)
    return png(fig)


def _traffic_plot(result: dict[str, Any]) -> bytes:
    slots = result["traffic"]
    sources = sorted({s for slot in slots for s in slot["by_source"]})
    fig, ax = figure(3.5)
    labels = [slot["start"][5:16].replace("T", " ") for slot in slots]
    bottom = [0] * len(slots)
    for src in sources:
        heights = [slot["by_source"].get(src, 0) for slot in slots]
        ax.bar(labels, heights, bottom=bottom, label=src)
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_ylabel("rows")
    if sources:
        ax.legend(fontsize="small")
    ax.tick_params(axis="x", rotation=45, labelsize="small")
    return png(fig)
