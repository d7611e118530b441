"""The offline evaluation gate: a candidate must not be worse than the active version.

Both models are scored with their shipped ONNX models through
:class:`hybridml.edge.session.ModelSession` — the numbers are what devices will run — on two
slices, and the candidate is **blessed** only if it passes on both:

* ``holdout``: the active version's holdout (:func:`hybridml.cloud.labelled.holdout`; for a
  fine-tune line, the original retrain's test rows), which catches a fine-tune that forgot
  what it knew;
* ``recent``: the labelled rows that arrived since the active version was trained; with
  none, the candidate is judged on the holdout alone, and the report says so.

Rows the candidate was trained on are taken out of both slices first (compared by content:
:meth:`hybridml.cloud.labelled.Labelled.minus`): a retrain's data holds the old holdout and
the new rows, and a model scored on its own training rows proves nothing. The report counts
them (``trained``).

"Not worse" is the task's primary metric (:data:`hybridml.cloud.metrics.PRIMARY`) within a
margin: :data:`MARGIN_POINTS` (0.5 points) below the active version's for classification, or
:data:`MARGIN_RELATIVE` (1%) above its RMSE for regression.

The gate runs before the candidate is registered (``train(..., gate=gate_hook(...))``), so its
report is part of the candidate's manifest (``manifest["gate"]``), which is immutable once
registered: the numbers can never drift from the model they describe. A blessed candidate
still waits in the registry; the controller promotes it only under ``auto_promote``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from hybridml.edge.session import ModelSession
from hybridml.shared.errors import DataError
from hybridml.shared.schema import InputSchema

from . import metrics
from .labelled import Labelled, holdout
from .registry import Registry
from .train import Gate

log = logging.getLogger("hybridml.cloud.gate")

MARGIN_POINTS = 0.005  # classification: 0.5 points of the primary metric
MARGIN_RELATIVE = 0.01  # regression: 1% of the active version's RMSE
GATE_FORMAT = 1


@dataclass(frozen=True)
class Margin:
    """How much worse than the active version a candidate may be."""

    kind: str  # "points" (classification) or "relative" (regression)
    value: float

    @classmethod
    def for_task(cls, task: str, value: float | None = None) -> Margin:
        """The default margin of ``task``, or ``value`` in that task's unit."""
        if task == "regression":
            return cls("relative", MARGIN_RELATIVE if value is None else value)
        return cls("points", MARGIN_POINTS if value is None else value)

    def allows(self, candidate: float, active: float) -> bool:
        """True when ``candidate`` is not worse than ``active`` by more than the margin."""
        if self.kind == "relative":  # RMSE: lower is better
            return candidate <= active * (1 + self.value) + 1e-12
        return candidate >= active - self.value - 1e-12

    def to_json(self) -> dict[str, Any]:
        """JSON form for the gate report."""
        return {"kind": self.kind, "value": self.value}


@dataclass(frozen=True)
class Comparison:
    """Both models' primary metric on one slice of labelled rows."""

    rows: int
    candidate: float | None
    active: float | None
    passed: bool
    note: str = ""
    refused: int = 0  # rows either model's schema refuses (malformed cells)
    trained: int = 0  # rows left out because the candidate was trained on them

    def to_json(self) -> dict[str, Any]:
        """JSON form for the gate report."""
        out: dict[str, Any] = {"rows": self.rows, "candidate": self.candidate,
                               "active": self.active, "passed": self.passed}
        if self.refused:
            out["refused"] = self.refused
        if self.trained:
            out["trained"] = self.trained
        if self.note:
            out["note"] = self.note
        return out


@dataclass(frozen=True)
class GateReport:
    """The gate's verdict and its numbers (``manifest["gate"]``)."""

    against: int | None
    metric: str
    margin: Margin
    holdout: Comparison
    recent: Comparison
    blessed: bool
    reason: str

    def to_json(self) -> dict[str, Any]:
        """JSON form stored in the candidate's manifest."""
        return {"format": GATE_FORMAT, "against": self.against, "metric": self.metric,
                "margin": self.margin.to_json(), "holdout": self.holdout.to_json(),
                "recent": self.recent.to_json(), "blessed": self.blessed,
                "reason": self.reason}


def evaluate(registry: Registry, name: str, candidate: bytes | os.PathLike[str],
             manifest: Mapping[str, Any], *, against: int | None,
             recent: Labelled | None = None, trained: Labelled | None = None,
             margin: float | None = None) -> GateReport:
    """Gate ``candidate`` (its shipped ONNX model and manifest) against version ``against`` of
    ``name`` (None: nothing to compare with, blessed), leaving out the ``trained`` rows.
    ``margin`` overrides the default in the task's unit (points as a fraction, e.g. 0.005, or
    relative, e.g. 0.01)."""
    task = str(manifest["output"]["task"])
    metric, m = metrics.primary_of(manifest), Margin.for_task(task, margin)
    skipped = Comparison(0, None, None, True, "no active version")
    if against is None:
        return GateReport(None, metric, m, skipped, skipped, True,
                          "no active version to compare with")
    active_manifest = registry.manifest(name, against)
    if active_manifest["output"]["task"] != task:
        refused = Comparison(0, None, None, False, "the tasks differ")
        return GateReport(against, metric, m, refused, refused, False,
                          f"v{against} is {active_manifest['output']['task']}, the candidate "
                          f"is {task}: they cannot be compared")
    # The line's versions compare on the active version's primary metric (its --primary).
    metric = metrics.primary_of(active_manifest)
    active_model = registry.model_path(active_manifest)
    models = ((candidate, manifest), (active_model, active_manifest))
    held = holdout(registry, name, against)
    on_holdout = (_compare(models, held, trained, m, metric, required=True)
                  if held is not None and len(held) else
                  Comparison(0, None, None, False, f"the holdout of v{against} is unavailable"))
    on_recent = _compare(models, recent or Labelled(), trained, m, metric, required=False)
    slices = (("holdout", on_holdout), ("recent", on_recent))
    failed = [_why(k, c, m, against) for k, c in slices if not c.passed]
    judged = " and ".join(f"the {k} rows" for k, c in slices if c.rows)
    reason = "; ".join(failed) if failed else f"not worse than v{against} on {judged}"
    report = GateReport(against, metric, m, on_holdout, on_recent, not failed, reason)
    log.info("gate %s candidate vs v%d: %s (%s)", name, against,
             "blessed" if report.blessed else "refused", reason)
    return report


def gate_hook(registry: Registry, name: str, *, against: int | None,
              recent: Labelled | None = None, margin: float | None = None) -> Gate:
    """The ``gate`` argument of :func:`hybridml.cloud.train.train`: gate the candidate before
    it is registered, so the report lands in its manifest."""
    def run(model: bytes, manifest: Mapping[str, Any], trained: Labelled) -> Mapping[str, Any]:
        return evaluate(registry, name, model, manifest, against=against, recent=recent,
                        trained=trained, margin=margin).to_json()
    return run


def score(model: bytes | os.PathLike[str], manifest: Mapping[str, Any], rows: Labelled
          ) -> float:
    """The primary metric of one shipped model on the labelled rows its schema accepts."""
    values, kept, _ = _scores(((model, manifest),), rows, metrics.primary_of(manifest))
    if not kept:
        raise DataError("none of the labelled rows can be encoded for this model",
                        field="rows")
    return values[0]


# -------------------------------------------------------------------------------- internals
Model = tuple[bytes | os.PathLike[str], Mapping[str, Any]]


def _compare(models: tuple[Model, Model], rows: Labelled, trained: Labelled | None,
             margin: Margin, metric: str, *, required: bool) -> Comparison:
    """Compare on the rows the candidate did not train on; with none left, a ``required``
    slice fails and another passes (the verdict then rests on the other slice)."""
    unseen = rows.minus(trained) if trained is not None and len(rows) else rows
    seen = len(rows) - len(unseen)
    if not len(unseen):
        note = f"the candidate trained on all {seen} rows" if seen else "no rows"
        if not required:
            note = ("no recent labelled rows" if not seen else note) + \
                ": judged on the holdout alone"
        return Comparison(0, None, None, not required, note, trained=seen)
    (cand, active), kept, refused = _scores(models, unseen, metric)
    if not kept:
        return Comparison(0, None, None, False, "every row was refused", refused, seen)
    return Comparison(kept, cand, active, margin.allows(cand, active), refused=refused,
                      trained=seen)


def _scores(models: tuple[Model, ...], rows: Labelled, metric: str
            ) -> tuple[list[float], int, int]:
    """Each model's ``metric`` on the rows every model's schema accepts."""
    schemas = [InputSchema.from_json(m["schema"]) for _, m in models]
    good = set(range(len(rows)))
    for schema in schemas:
        good &= set(schema.split_bad([_by_name(r, schema) for r in rows.rows])[0])
    keep = sorted(good)
    task = str(models[0][1]["output"]["task"])
    truth = [rows.labels[i] for i in keep]
    # A binary F1 is of one class for every model: the line's (the last model's) positive.
    line_positive = metrics.positive_of(models[-1][1])
    out: list[float] = []
    if not keep:
        return [0.0] * len(models), 0, len(rows)
    for (model, manifest), schema in zip(models, schemas):
        batch = schema.encode([_by_name(rows.rows[i], schema) for i in keep])
        res = ModelSession(model if isinstance(model, bytes) else os.fspath(model), schema,
                           task).run(batch)
        positive = 1
        if task == "regression":
            assert res.values is not None
            y = np.asarray(truth, dtype=np.float64)
            pred = res.values.astype(np.float64)
        else:
            assert res.labels is not None
            names = [str(c) for c in manifest["output"]["classes"]]
            answers = [names[int(i)] for i in res.labels]
            y, pred = _class_indices([str(t) for t in truth], answers)
            seen = sorted({str(t) for t in truth} | set(answers))  # _class_indices' order
            # No row is or is answered the positive class: an index no row has (F1 0).
            positive = seen.index(line_positive) if line_positive in seen else len(seen)
        out.append(metrics.primary(task, y, pred, metric, positive))
    return out, len(keep), len(rows) - len(keep)


def _class_indices(truth: list[str], predicted: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Both label lists as indices into one class list (the models' classes may differ)."""
    index = {c: i for i, c in enumerate(sorted(set(truth) | set(predicted)))}
    return (np.array([index[t] for t in truth], dtype=np.int64),
            np.array([index[p] for p in predicted], dtype=np.int64))


def _by_name(row: Mapping[str, Any], schema: InputSchema) -> dict[str, Any]:
    return {n: row.get(n) for n in schema.names}


def _why(slice_name: str, c: Comparison, m: Margin, against: int) -> str:
    if c.candidate is None or c.active is None:
        return f"{slice_name}: {c.note}"
    limit = (f"{m.value:.0%} above" if m.kind == "relative" else f"{100 * m.value:g} points "
             "below")
    return (f"{slice_name}: {c.candidate:.4f} vs v{against}'s {c.active:.4f} on {c.rows} rows "
            f"(more than {limit})")


__all__ = ["GATE_FORMAT", "MARGIN_POINTS", "MARGIN_RELATIVE", "Comparison", "GateReport",
           "Margin", "evaluate", "gate_hook", "score"]
