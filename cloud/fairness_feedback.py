"""The fairness report of a version from feedback: ``monitor``'s ``fairness`` section.

The same group metrics as training's report (:func:`hybridml.cloud.fairness.build_block`, one
rule), over the labelled rows devices sent back (feedback with ``features``) in the monitor's
period, for each sensitive column of the version that is one of its inputs:

* the prediction judged is the one the device answered when the feedback carries it for this
  version; otherwise (a labelled row from ``hybridml-cloud feedback``, or one that judged
  another version) the version's shipped model answers the row's features, on the cloud;
* a ``--sensitive-only`` column is **not** reported: feedback rows carry exactly the model's
  inputs (:func:`hybridml.cloud.ingest.check_feedback` refuses other columns and stores
  ``features`` by schema name), so its values never reach the cloud. Such columns are listed
  in ``unavailable`` with that reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from hybridml.shared.schema import InputSchema

from . import metrics
from .fairness import build_block
from .quality import QualityOptions
from .telemetry import FeedbackRow, TelemetryStore

NOT_AN_INPUT = ("kept out of the model's inputs (--sensitive-only): feedback rows carry only "
                "the inputs, so the cloud never sees this column")


def feedback_fairness(store: TelemetryStore, model: str, version: int, since: float,
                      until: float) -> dict[str, Any] | None:
    """The fairness block of ``model`` v``version`` from the labelled feedback created in
    (since, until], plus ``rows``, ``device_answers`` (rows judged on the device's own
    answer) and ``unavailable``; None when the version has no fairness report."""
    manifest = store.registry.manifest(model, version)
    trained = manifest.get("fairness")
    if not isinstance(trained, Mapping) or not trained.get("columns"):
        return None
    schema = InputSchema.from_json(manifest["schema"])
    task = str(manifest["output"]["task"])
    classes = manifest["output"].get("classes")
    columns = [c for c in trained["columns"] if c in schema.names]
    unavailable = {c: NOT_AN_INPUT for c in trained["columns"] if c not in schema.names}
    rows = [r for r in store.feedback_at(model, since=since, until=until)
            if r.features is not None]
    y, pred, own, kept = _scored(rows, version, task, classes, schema,
                                 _shipped(store, manifest))
    quality = QualityOptions(sensitive=tuple(columns),
                             max_parity_gap=trained.get("max_parity_gap")
                             if task != "regression" else None)
    values = {c: [(kept[i].features or {}).get(c) for i in range(len(kept))] for c in columns}
    block = build_block(task, y, pred, values, str(manifest["metrics"]["primary"]), classes,
                        quality, _positive(manifest)) if kept and columns else \
        {"columns": columns, "by_column": {}, "passed": None, "max_parity_gap": None}
    block.update(rows=len(kept), device_answers=own, unavailable=unavailable)
    return block


def _positive(manifest: Mapping[str, Any]) -> int:
    """The version's positive class index (binary; 1, unused, for other tasks)."""
    found = metrics.positive_index_of(manifest)
    return 1 if found is None else found


def _shipped(store: TelemetryStore, manifest: Mapping[str, Any]) -> bytes:
    return store.registry.model_path(manifest).read_bytes()


def _scored(rows: list[FeedbackRow], version: int, task: str, classes: Any,
            schema: InputSchema, shipped: bytes
            ) -> tuple[np.ndarray, np.ndarray, int, list[FeedbackRow]]:
    """Labels and predictions as the report takes them (class indices, or numbers); rows
    whose label (or device answer) is not a class of the version are left out."""
    index = {str(c): i for i, c in enumerate(classes or [])}

    def code(value: Any) -> Any:
        if task == "regression":
            return None if value is None else float(value)
        return index.get(str(value))

    answered = [r.prediction is not None and r.version == version for r in rows]
    need = [r for r, a in zip(rows, answered) if not a]
    model_answers: list[Any] = []
    if need:
        from hybridml.edge.session import ModelSession  # not at import: see fairness.py

        out = ModelSession(shipped, schema, task).run(
            schema.encode([r.features or {} for r in need]))
        got = out.values if out.values is not None else out.labels
        assert got is not None
        model_answers = [float(v) if task == "regression" else int(v) for v in got]
    ys: list[Any] = []
    ps: list[Any] = []
    kept: list[FeedbackRow] = []
    own = 0
    answers = iter(model_answers)
    for r, a in zip(rows, answered):
        p = code(r.prediction) if a else next(answers)
        label = code(r.label)
        if label is None or p is None:
            continue
        own += int(a)
        ys.append(label)
        ps.append(p)
        kept.append(r)
    dtype = np.float64 if task == "regression" else np.int64
    return np.array(ys, dtype=dtype), np.array(ps, dtype=dtype), own, kept


__all__ = ["NOT_AN_INPUT", "feedback_fairness"]
