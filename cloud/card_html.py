"""The model card as one self-contained HTML page (``hybridml-cloud card ... --html FILE``).

The page is drawn from a card (:func:`hybridml.cloud.card.build`): the same sections as the
text, with the metrics' intervals, the top features and the reliability curve as PNG plots
inlined (:mod:`hybridml.cloud.htmlpage`). Every string from a manifest, its metadata or a
rollout (model, column and group names, reasons) is escaped.
"""

from __future__ import annotations

import html
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .card import NOT_RECORDED, fairness_gaps, fairness_rows, metric_rows
from .htmlpage import STYLE, figure, img, plain, png, table, write


def write_html(card: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write the page of ``card`` to ``path`` (atomically); return the path."""
    return write(render(card), path)


def render(card: Mapping[str, Any]) -> str:
    """The page as HTML text."""
    e = html.escape
    d, m = card["data"], card["model"]
    split = d.get("split") or {}
    title = f"{card['name']} {card['label']} (version {card['version']})"
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{e(title)}: model card</title>", STYLE, "</head><body>",
        f"<h1>{e(title)}</h1>",
        f"<p>{e(str(card['task']))}, {e(str(m['family']))} ({e(str(m['variant']))}); "
        f"created {e(str(card['created']))}"
        + (f"; aliases {e(', '.join(card['aliases']))}" if card["aliases"] else "") + "</p>",
        "<h2>Data</h2>",
        table(["source", "target", "rows", "dropped", "train", "validation", "test",
               "split seed"],
              [[d["source"], d["target"], d["rows"], d["dropped_rows"], split.get("train"),
                split.get("validation"), split.get("test"), split.get("seed")]]),
        f"<p>Fingerprint (sha256): <code>{e(str(d['sha256']))}</code></p>",
        _imbalance(d.get("imbalance")),
        "<h2>Model</h2>",
        table(["parameter", "value"], [[k, v] for k, v in sorted(m["params"].items())]),
        f"<p>Shipped: {e(str(card['quantization']))}</p>",
        table(["artifact", "variant", "bytes", "sha256"],
              [[a["role"], a["variant"], f"{a['size']:,}", a["sha256"]]
               for a in card["artifacts"]]),
        "<h2>Metrics</h2>", *_metrics(card),
        "<h2>Decision threshold</h2>", _decision(card["decision"]),
        "<h2>Calibration</h2>", *_calibration(card["calibration"]),
        "<h2>Confusion matrix</h2>", _confusion(card["confusion"]),
        "<h2>Top features</h2>", *_features(card["features"]),
        "<h2>Fairness</h2>", *_fairness(card["fairness"]),
        "<h2>Lineage</h2>", _lineage(card),
        "<h2>Rollouts</h2>", _rollouts(card["rollouts"]),
        "</body></html>",
    ]
    return "\n".join(parts)


# -------------------------------------------------------------------------------- sections
def _absent() -> str:
    return f"<p class='muted'>{NOT_RECORDED}.</p>"


def _imbalance(imb: Mapping[str, Any] | None) -> str:
    if not imb:
        return ""
    rows = [[k, v] for k, v in (imb.get("counts") or {}).items()]
    return (table(["class (training rows)", "rows"], rows)
            + table(["smallest share", "imbalanced", "class weight", "how", "requested"],
                    [[imb.get("minority_share"), imb.get("imbalanced"),
                      imb.get("class_weight"), imb.get("how"), imb.get("requested")]]))


def _metrics(card: Mapping[str, Any]) -> list[str]:
    mt = card["metrics"]
    h = mt["holdout"]
    rows = metric_rows(card)
    if h:
        note = (f"On the stored holdout ({h['rows']} rows"
                + (f", {h['refused']} refused" if h["refused"] else "")
                + f"), the shipped model; {int(h['confidence'] * 100)}% intervals from "
                f"{h['resamples']} bootstrap resamples (seed {h['seed']}). Last column: the "
                "test split at training.")
    else:
        note = f"Holdout: {mt['note'] or NOT_RECORDED}. Recorded at training only."
    out = [f"<p>{html.escape(note)}</p>",
           table(["metric", "holdout", "95% low", "95% high", "training test"], rows)]
    if h and any(r[2] is not None for r in rows):
        out.insert(1, img(_interval_plot(rows), "metrics with 95% intervals"))
    return out


def _decision(dec: Mapping[str, Any] | None) -> str:
    if not dec:
        return _absent()
    return table(["threshold", "positive class", "source", "tuned for"],
                 [[dec.get("threshold"), dec.get("positive"), dec.get("source"),
                   dec.get("tuned_for")]])


def _calibration(cal: Mapping[str, Any] | None) -> list[str]:
    if not cal:
        return [_absent()]
    out = [table(["method", "requested", "Brier", "Brier uncalibrated", "why"],
                 [[cal.get("method"), cal.get("requested"), cal.get("brier"),
                   cal.get("brier_uncalibrated"), cal.get("reason")]])]
    curve = cal.get("curve") or {}
    if curve.get("mean_predicted"):
        out.append(img(_reliability_plot(curve), "reliability curve"))
    return out


def _confusion(conf: Mapping[str, Any] | None) -> str:
    if not conf or not conf.get("matrix"):
        return _absent()
    labels = [str(x) for x in conf.get("labels", [])]
    return table(["true \\ predicted", *labels],
                 [[lab, *row] for lab, row in zip(labels, conf["matrix"])])


def _features(feats: Mapping[str, Any] | None) -> list[str]:
    if not feats or not feats.get("features"):
        return [_absent()]
    rows = [[f["name"], f["importance"], f["std"]] for f in feats["features"]]
    e = html.escape
    return [f"<p>{e(feats['method'])} importance: how much worse {e(feats['metric'])} gets "
            f"when the column is shuffled (mean of {feats['repeats']} shuffles).</p>",
            img(_feature_plot(feats["features"], str(feats["metric"])), "top features"),
            table(["column", "importance", "spread (std)"], rows)]


def _fairness(fair: Mapping[str, Any] | None) -> list[str]:
    if not fair:
        return [_absent()]
    excluded = fair.get("excluded") or []
    positive = fair.get("positive")
    return [f"<p>Positive class: {html.escape(str(positive))}</p>" if positive else "",
            table(["column", "group", "n", "selection rate", "TPR", "FPR", "metric"],
                  fairness_rows(fair)),
            *(f"<p>{html.escape(line)}</p>" for line in fairness_gaps(fair)),
            f"<p>Not inputs of the model: {html.escape(', '.join(map(str, excluded)))}</p>"
            if excluded else ""]


def _lineage(card: Mapping[str, Any]) -> str:
    lin = card["lineage"]
    gate = card["gate_summary"] if card["gate"] else NOT_RECORDED
    return table(["lineage", "parent", "training mode", "fine-tune", "why", "gate"],
                 [[lin.get("lineage"), lin.get("parent"), lin.get("mode"), lin.get("finetune"),
                   lin.get("reason"), gate]])


def _rollouts(rollouts: list[dict[str, Any]]) -> str:
    if not rollouts:
        return "<p class='muted'>This version took part in no rollout.</p>"
    return table(["rollout", "strategy", "role", "state", "started", "ended", "outcome",
                  "forced"],
                 [[r["id"], r["strategy"], r["role"], r["state"], r["started"], r["ended"],
                   r["outcome"], r["forced"]] for r in rollouts])


# -------------------------------------------------------------------------------- plots
def _interval_plot(rows: list[list[Any]]) -> bytes:
    """One strip per metric (their scales differ: an RMSE beside an R²)."""
    shown = [r for r in rows if r[1] is not None and r[2] is not None]
    fig, axes = figure(0.75 * len(shown) + 0.6, 7.0, rows=len(shown))
    for ax, (name, value, low, high, _) in zip(axes.reshape(-1), shown):
        ax.errorbar([value], [0], xerr=[[value - low], [high - value]], fmt="o",
                    color="#1f5fa8", capsize=4)
        ax.set_yticks([0], [plain(name)])
        ax.set_xlim(min(low, value) - 0.05 * (abs(high - low) or 1.0),
                    max(high, value) + 0.05 * (abs(high - low) or 1.0))
    axes.reshape(-1)[-1].set_xlabel("holdout value and its 95% bootstrap interval")
    return png(fig)


def _reliability_plot(curve: Mapping[str, Any]) -> bytes:
    fig, ax = figure(4.0, 4.6)
    pts = [(p, f) for p, f in zip(curve.get("mean_predicted", []),
                                  curve.get("fraction_positive", []))
           if p is not None and f is not None]
    ax.plot([0, 1], [0, 1], linestyle=":", color="#555", linewidth=1, label="perfect")
    ax.plot([p for p, _ in pts], [f for _, f in pts], "-o", color="#1f5fa8", label="model")
    ax.set_xlabel("mean predicted probability")
    ax.set_ylabel("observed fraction positive")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(fontsize="small")
    return png(fig)


def _feature_plot(feats: list[dict[str, Any]], metric: str) -> bytes:
    fig, ax = figure(0.4 * len(feats) + 1.2, 7.0)
    ax.barh([plain(f["name"]) for f in feats], [f["importance"] for f in feats],
            xerr=[f["std"] for f in feats], color="#4c9a2a")
    ax.invert_yaxis()
    ax.set_xlabel(plain(f"how much worse {metric} gets when the column is shuffled"))
    return png(fig)


__all__ = ["render", "write_html"]
