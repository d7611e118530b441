"""Fairness reports: group metrics per sensitive column, and the parity-gap gate
(docs/quality.md §4).

Computed with fairlearn's :class:`~fairlearn.metrics.MetricFrame` (imported lazily: only a
training run or a monitor report that asks for fairness pays for it) on the labels the shipped
ONNX model answers, so the report is about what devices actually say:

* **binary**: per group ``n``, ``selection_rate`` (share predicted the positive class: the
  version's ``manifest["metrics"]["positive"]``, the minority of its training rows;
  ``classes[1]`` for versions from before), ``tpr``, ``fpr`` (of that class) and the primary
  metric; ``demographic_parity_difference`` and
  ``equalized_odds_difference`` are fairlearn's functions of those names (between groups;
  equalized odds is the larger of the TPR and FPR differences).
* **multiclass**: ``tpr`` / ``fpr`` are one-vs-rest macro averages over the classes (a class
  absent from a group's rows is left out of its mean). A macro-averaged selection rate is
  always 1/K, so each group reports ``selection_rates`` per class instead, and both
  differences are the worst class's one-vs-rest difference (``worst_class`` names it).
* **regression**: ``n`` and the primary metric per group; no differences, no gate.

Groups with fewer than :data:`MIN_GROUP` rows are reported with ``"small": true`` and left out
of the differences (their rates are too uncertain to rank); a missing value is its own group,
:data:`MISSING_GROUP`. With fewer than two groups left, the differences are None.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from functools import partial
from typing import Any

import numpy as np

from hybridml.shared.cells import MISSING_TOKENS
from hybridml.shared.errors import ConfigError, FairnessError
from hybridml.shared.schema import EncodedBatch, InputSchema
from hybridml.shared.text import format_table

from . import metrics
from .data import Dataset
from .quality import QualityOptions

log = logging.getLogger("hybridml.cloud.fairness")

MIN_GROUP = 10
MISSING_GROUP = "(missing)"
DIGITS = 6
Metric = Callable[[np.ndarray, np.ndarray], float]


def check_request(quality: QualityOptions, target: str | None) -> None:
    """ConfigError when a sensitive column is the target (before any data is read)."""
    if target is not None and target in quality.sensitive:
        raise ConfigError(f"sensitive column {target!r} is the target; a fairness report "
                          "groups rows by an input or a column kept out of the model, so "
                          "name another --sensitive column", field="sensitive")


def sensitive_values(ds: Dataset, quality: QualityOptions) -> dict[str, np.ndarray]:
    """Each sensitive column's value per row of ``ds`` (raw text from a CSV; a bundled
    dataset's feature values); ConfigError for a column ``ds`` does not have, or a gate on a
    regression."""
    if quality.max_parity_gap is not None and quality.sensitive and ds.task == "regression":
        raise ConfigError("--max-parity-gap compares selection rates, which a regression has "
                          "not; drop it (the group report still shows the error per group)",
                          field="max_parity_gap")
    if quality.max_parity_gap is not None and not quality.sensitive:
        raise ConfigError("--max-parity-gap needs --sensitive COL naming the column whose "
                          "groups it compares", field="max_parity_gap")
    out: dict[str, np.ndarray] = {}
    names = ds.schema.names
    for col in quality.sensitive:
        if col in ds.extras:
            out[col] = ds.extras[col]
        elif col in names and col not in quality.sensitive_only:
            f = ds.schema.features[names.index(col)]
            block = ds.num if f.kind == "numeric" else ds.cat
            pos = (ds.schema.numeric_names if f.kind == "numeric"
                   else ds.schema.categorical_names).index(col)
            out[col] = block[:, pos]
        elif col in names:
            raise ConfigError(f"--sensitive-only {col}: built-in datasets keep every feature, "
                              "so the column cannot be taken out; export the data to a CSV "
                              "and use --data, or use --sensitive", field="sensitive_only")
        else:
            raise ConfigError(f"sensitive column {col!r} is not in {ds.source}; built-in "
                              "datasets have no sensitive columns (and keep every feature), "
                              "so use a CSV with --data", field="sensitive")
    return out


def retrain_options(quality: QualityOptions, inputs: Sequence[str]) -> QualityOptions:
    """The options a retrain on rows from feedback can honour: those rows carry only the
    model's ``inputs``, so ``--sensitive-only`` columns (and a parity gate left with no
    column) are dropped, with a warning."""
    lost = [c for c in quality.sensitive if c not in inputs]
    if not lost:
        return quality
    keep = tuple(c for c in quality.sensitive if c in inputs)
    log.warning("retraining without the fairness report on %s: feedback rows carry only the "
                "model's inputs%s", ", ".join(lost),
                "" if keep or quality.max_parity_gap is None else ", so the parity gate is off")
    return replace(quality, sensitive=keep, sensitive_only=(),
                   max_parity_gap=quality.max_parity_gap if keep else None)


def group_labels(values: Sequence[Any] | np.ndarray) -> np.ndarray:
    """Each value as its group's name: text, with every missing spelling as
    :data:`MISSING_GROUP`."""
    out = []
    for v in values:
        if v is None or (isinstance(v, (float, np.floating)) and math.isnan(v)):
            out.append(MISSING_GROUP)
            continue
        text = str(v).strip()
        out.append(MISSING_GROUP if text.lower() in MISSING_TOKENS else text)
    return np.array(out, dtype=object)


def column_report(task: str, y: np.ndarray, pred: np.ndarray, values: Sequence[Any] |
                  np.ndarray, primary: str, classes: Sequence[Any] | None = None,
                  positive: int = 1) -> dict[str, Any]:
    """The report of one sensitive column: ``groups`` and the two differences (see the module
    docstring). ``y``/``pred`` are class indices (classifiers) or numbers (regression);
    ``positive`` is a binary task's positive class index."""
    from fairlearn.metrics import MetricFrame

    groups = group_labels(values)
    y, pred = np.asarray(y), np.asarray(pred)
    fns: dict[str, Metric] = {}
    k = len(classes or ()) if task == "multiclass" else 0
    if task == "binary":
        fns.update(_binary_metrics(positive))
    elif task == "multiclass":
        fns.update(tpr=partial(_macro_rate, k=k, true=True),
                   fpr=partial(_macro_rate, k=k, true=False))
        for c in range(k):
            fns[f"selection_rate:{c}"] = partial(_share_of, c=c)
    fns[primary] = _primary(task, primary, positive)
    with warnings.catch_warnings():  # a group without positives has no TPR: NaN -> None
        warnings.simplefilter("ignore")
        frame = MetricFrame(metrics=fns, y_true=y, y_pred=pred, sensitive_features=groups)
        table = frame.by_group.to_dict(orient="index")
    names = sorted(table, key=str)
    out_groups: dict[str, Any] = {}
    for g in names:
        n = int(np.sum(groups == g))
        row: dict[str, Any] = {"n": n}
        rates = {}
        for key in fns:
            value = table[g][key]
            if key.startswith("selection_rate:"):
                rates[str((classes or [])[int(key.split(":")[1])])] = _num(value)
            else:
                row[key] = _num(value)
        if rates:
            row["selection_rates"] = rates
        if n < MIN_GROUP:
            row["small"] = True
        out_groups[str(g)] = row
    report: dict[str, Any] = {"groups": out_groups}
    if task != "regression":
        report.update(_differences(task, y, pred, groups, k, classes, positive))
    return report


def assess(shipped: bytes, schema: InputSchema, task: str, batch: EncodedBatch,
           y: np.ndarray, values: Mapping[str, np.ndarray], quality: QualityOptions,
           primary: str, classes: Sequence[Any] | None, positive: int = 1) -> dict[str, Any]:
    """``manifest["fairness"]`` of a trained version, from the shipped model's answers on the
    test rows (``batch``, ``y``; ``values`` are the sensitive columns of those rows;
    ``positive``: a binary task's positive class index). Raises :class:`FairnessError` when a
    demographic parity difference exceeds ``quality.max_parity_gap``."""
    # onnxruntime is imported here, not with the module: `monitor` (and so the CLI that
    # gunicorn's master imports) loads this module, and onnxruntime must not be loaded
    # before the workers fork (tests/cloud/test_serve.py).
    from hybridml.edge.session import ModelSession

    out = ModelSession(shipped, schema, task).run(batch)
    pred = out.values if out.values is not None else out.labels
    assert pred is not None
    block = build_block(task, y, np.asarray(pred), values, primary, classes, quality, positive)
    enforce(block, classes)
    return block


def build_block(task: str, y: np.ndarray, pred: np.ndarray, values: Mapping[str, Any],
                primary: str, classes: Sequence[Any] | None, quality: QualityOptions,
                positive: int = 1) -> dict[str, Any]:
    """The fairness block (docs/quality.md §4) of these rows; ``passed`` is None without a
    gate. ``positive`` is a binary task's positive class index
    (:func:`hybridml.cloud.metrics.positive_index_of` of the version; 1 for versions from
    before the minority rule)."""
    by_column = {col: column_report(task, y, pred, vals, primary, classes, positive)
                 for col, vals in values.items()}
    gap = quality.max_parity_gap
    passed = None if gap is None else all(
        (r.get("demographic_parity_difference") or 0.0) <= gap for r in by_column.values())
    block: dict[str, Any] = {"columns": list(values), "excluded": list(quality.sensitive_only),
                             "max_parity_gap": gap, "passed": passed, "min_group": MIN_GROUP,
                             "by_column": by_column}
    if task == "binary" and classes:
        block["positive"] = classes[positive]
    return block


def enforce(block: Mapping[str, Any], classes: Sequence[Any] | None = None) -> None:
    """Raise :class:`FairnessError` with the numbers when the block did not pass its gate."""
    gap = block.get("max_parity_gap")
    if gap is None or block.get("passed") is not False:
        return
    parts = []
    over: dict[str, float] = {}
    for col, r in block["by_column"].items():
        dpd = r.get("demographic_parity_difference")
        if dpd is None or dpd <= gap:
            continue
        over[col] = dpd
        worst = r.get("worst_class")
        rates = ", ".join(
            f"{g} {_rate_of(row, worst):.2f}" for g, row in r["groups"].items()
            if not row.get("small") and _rate_of(row, worst) is not None)
        of = f" of class {worst}" if worst is not None else ""
        parts.append(f"demographic parity difference on {col} is {dpd:.2f} > {gap:.2f} "
                     f"(selection rate{of} {rates})")
    raise FairnessError("; ".join(parts) + "; retrain with other features (drop proxies of "
                        "the column), another --threshold or model, or more representative "
                        "data — or raise --max-parity-gap", field="max_parity_gap",
                        max_parity_gap=gap, differences=over)


def worst_gap(block: Mapping[str, Any] | None) -> str:
    """One cell for ``models``: ``0.21 (sex)``, the largest demographic parity difference,
    or ``-`` without a report (or for a regression)."""
    if not isinstance(block, Mapping):
        return "-"
    found = [(r.get("demographic_parity_difference"), col)
             for col, r in (block.get("by_column") or {}).items()]
    found = [(d, c) for d, c in found if d is not None]
    if not found:
        return "-"
    d, col = max(found)
    mark = " FAIL" if block.get("passed") is False else ""
    return f"{d:.2f} ({col}){mark}"


def table(block: Mapping[str, Any]) -> str:
    """The group table for a terminal, one row per column and group."""
    cols = block.get("by_column") or {}
    rows: list[list[str]] = []
    metric_names: list[str] = []
    for r in cols.values():
        for row in r["groups"].values():
            metric_names += [k for k in row if k not in ("n", "small", "selection_rates")
                             and k not in metric_names]
    first = ("selection_rate", "tpr", "fpr")  # then the primary metric (stored JSON is sorted)
    metric_names.sort(key=lambda k: (first.index(k) if k in first else len(first), k))
    lines = []
    if block.get("positive") is not None:
        lines.append(f"positive class: {block['positive']} (selection rate: share of rows "
                     "the shipped model answers it)")
    for col, r in cols.items():
        for g, row in r["groups"].items():
            rates = row.get("selection_rates")
            cells = [col, g + (" (small)" if row.get("small") else ""), str(row["n"])]
            cells += [_cell(row.get(m)) for m in metric_names]
            if any("selection_rates" in x for x in r["groups"].values()):
                cells.append(" ".join(f"{c}:{v:.3f}" for c, v in (rates or {}).items()
                                      if v is not None))
            rows.append(cells)
    multiclass = any("selection_rates" in row for r in cols.values()
                     for row in r["groups"].values())
    header = ["column", "group", "n", *metric_names, *(["selection rates"] if multiclass
                                                      else [])]
    lines.append(format_table(header, rows, align="llr" + "r" * len(metric_names)))
    for col, r in cols.items():
        if "demographic_parity_difference" in r:
            worst = f" (worst class {r['worst_class']})" if r.get("worst_class") else ""
            lines.append(f"{col}: demographic parity difference "
                         f"{_cell(r['demographic_parity_difference'])}, equalized odds "
                         f"difference {_cell(r['equalized_odds_difference'])}{worst}")
    gap = block.get("max_parity_gap")
    if gap is not None:
        lines.append(f"max parity gap {gap}: {'passed' if block.get('passed') else 'FAILED'}")
    small = any(row.get("small") for r in cols.values() for row in r["groups"].values())
    if small:
        lines.append(f"(small): under {block.get('min_group', MIN_GROUP)} rows, left out of "
                     "the differences")
    return "\n".join(lines)


# -------------------------------------------------------------------------------- internals
def _binary_metrics(positive: int = 1) -> dict[str, Metric]:
    from fairlearn.metrics import false_positive_rate, selection_rate, true_positive_rate

    return {"selection_rate": partial(selection_rate, pos_label=positive),
            "tpr": partial(true_positive_rate, pos_label=positive),
            "fpr": partial(false_positive_rate, pos_label=positive)}


def _differences(task: str, y: np.ndarray, pred: np.ndarray, groups: np.ndarray, k: int,
                 classes: Sequence[Any] | None, positive: int = 1) -> dict[str, Any]:
    """fairlearn's two differences over the groups with at least :data:`MIN_GROUP` rows."""
    from fairlearn.metrics import demographic_parity_difference, equalized_odds_difference

    names, counts = np.unique(groups.astype(str), return_counts=True)
    big = set(names[counts >= MIN_GROUP].tolist())
    keep = np.array([str(g) in big for g in groups], dtype=bool)
    out: dict[str, Any] = {"demographic_parity_difference": None,
                           "equalized_odds_difference": None}
    if len(big) < 2:
        return out
    y, pred, g = y[keep], pred[keep], groups[keep].astype(str)
    # fairlearn's differences rate label 1: the positive class (binary) or each class in turn.
    pairs = [(None, (y == positive).astype(int), (pred == positive).astype(int))] \
        if task == "binary" else [
        (c, (y == c).astype(int), (pred == c).astype(int)) for c in range(k)]
    dpd: list[tuple[float, Any]] = []
    eod: list[float] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for c, yt, yp in pairs:
            dpd.append((float(demographic_parity_difference(yt, yp, sensitive_features=g)), c))
            eod.append(float(equalized_odds_difference(yt, yp, sensitive_features=g)))
    d, worst = max(dpd, key=lambda t: (-1.0 if math.isnan(t[0]) else t[0]))
    out["demographic_parity_difference"] = _num(d)
    finite = [e for e in eod if not math.isnan(e)]
    out["equalized_odds_difference"] = _num(max(finite)) if finite else None
    if task == "multiclass":
        out["worst_class"] = None if worst is None else (classes or [])[worst]
    return out


def _primary(task: str, name: str, positive: int = 1) -> Metric:
    """The version's primary metric as the metric block computes it (one definition)."""
    return lambda y, p: metrics.scores(task, y, p, positive=positive)[name]


def _share_of(y: np.ndarray, pred: np.ndarray, c: int) -> float:
    return float(np.mean(np.asarray(pred) == c)) if len(pred) else math.nan


def _macro_rate(y: np.ndarray, pred: np.ndarray, k: int, true: bool) -> float:
    """One-vs-rest TPR (``true``) or FPR averaged over the classes that have rows to rate."""
    y, pred = np.asarray(y), np.asarray(pred)
    rates = []
    for c in range(k):
        base = (y == c) if true else (y != c)
        if base.any():
            rates.append(float(np.mean(pred[base] == c)))
    return float(np.mean(rates)) if rates else math.nan


def _rate_of(row: Mapping[str, Any], worst: Any) -> float | None:
    if worst is None:
        value = row.get("selection_rate")
    else:
        value = (row.get("selection_rates") or {}).get(str(worst))
    return None if value is None else float(value)


def _num(value: Any) -> float | None:
    v = float(value)
    return None if math.isnan(v) else round(v, DIGITS)


def _cell(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


__all__ = ["MIN_GROUP", "MISSING_GROUP", "assess", "build_block", "check_request",
           "column_report", "enforce", "group_labels", "retrain_options", "sensitive_values",
           "table", "worst_gap"]
