"""Prediction ids and feedback: how a label finds the prediction it judges.

Each answer carries a ``prediction_id``, ``<store id>:<model>:<counter>`` (docs/monitoring.md
§3). Ids are handed out when first read (:attr:`Prediction.prediction_id
<hybridml.edge.runtime.Prediction.prediction_id>`, ``to_json``), so a caller that never reads
one pays nothing for it; the counter starts at the process's start time in microseconds, so
the ids of two runs of a program never meet (unless one hands out a million a second). A
process started while the wall clock is implausible (a Pi before NTP: every boot says 1970
and a few seconds, so two boots would repeat ids) starts at a random point of the
:data:`UNSURE_SPAN` microseconds after :data:`~hybridml.edge.timebase.PLAUSIBLE_FROM`
instead: two such runs meet with a chance of about (ids per run / 2**44). The
last :data:`RECENT` ids read are remembered with their prediction and version, which the
feedback record then carries to the cloud (it judges what this device answered).

A label is checked as the cloud checks it: a class of the model as the manifest spells it
(``"1"`` for the class ``1`` too), or a finite number for regression.
"""

from __future__ import annotations

import itertools
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

from hybridml.shared.clock import utc_iso
from hybridml.shared.errors import InputError
from hybridml.shared.labels import as_label
from hybridml.shared.manifest import Manifest
from hybridml.shared.text import printable

from .timebase import PLAUSIBLE_FROM, plausible

FORMAT = 1
RECENT = 10_000  # ids remembered with their prediction, for feedback
UNSURE_SPAN = 1 << 44  # µs (~200 days) a run under an implausible clock starts at random in


class PredictionIds:
    """Hands out the prediction ids of one store and model; thread-safe."""

    def __init__(self, store_id: str, model: str, *, start: int | None = None,
                 recent: int = RECENT, clock: Callable[[], float] = time.time) -> None:
        self.store_id = store_id
        self.model = model
        self.prefix = f"{store_id}:{model}:"
        first = _first(clock()) if start is None else start
        self._next = itertools.count(first).__next__
        self._recent: OrderedDict[str, tuple[Any, int | None]] = OrderedDict()
        self._keep = recent
        self._lock = threading.Lock()

    def new(self, prediction: Any, version: int | None) -> str:
        """A new id for ``prediction`` (answered by ``version``), remembered for feedback."""
        pid = self.prefix + str(self._next())
        with self._lock:
            self._recent[pid] = (prediction, version)
            if len(self._recent) > self._keep:
                self._recent.popitem(last=False)
        return pid

    def recall(self, pid: str) -> tuple[Any, int | None] | None:
        """The prediction and version of a recent id, or None."""
        with self._lock:
            return self._recent.get(pid)

    def check(self, pid: Any) -> str:
        """``pid`` if it is an id of this store and model; :class:`InputError` naming
        ``prediction_id`` otherwise."""
        if not isinstance(pid, str) or not pid.startswith(self.prefix) or \
                not pid[len(self.prefix):].isdigit():
            raise InputError(f"prediction_id {printable(repr(pid), 80)} is not an id this "
                             f"device gave a prediction of {self.model!r} (they look like "
                             f"'{self.prefix}1234'); pass the prediction's prediction_id, or "
                             "features= for a labelled row", field="prediction_id")
        return pid


def _first(now: float) -> int:
    """Where a run's counter starts: the wall clock in µs, or, when it is implausible, a
    random point just past :data:`~hybridml.edge.timebase.PLAUSIBLE_FROM` (module docstring)."""
    if plausible(now):
        return int(now * 1_000_000)
    return int(PLAUSIBLE_FROM) * 1_000_000 + secrets.randbelow(UNSURE_SPAN)


def check_label(manifest: Manifest, label: Any) -> Any:
    """``label`` as a label of ``manifest``'s model (:func:`hybridml.shared.labels.as_label`,
    the cloud's rule too); :class:`InputError` naming ``label`` otherwise."""
    return as_label(label, task=manifest.task, classes=manifest.classes or (),
                    model=manifest.name, version=manifest.version)


def feedback_body(model: str, label: Any, *, prediction_id: str | None = None,
                  prediction: Any = None, version: int | None = None,
                  features: Mapping[str, Any] | None = None,
                  created: float | None = None) -> dict[str, Any]:
    """A feedback body (docs/monitoring.md §4, format 1)."""
    body: dict[str, Any] = {"format": FORMAT, "model": model}
    if prediction_id is not None:
        body["prediction_id"] = prediction_id
    if prediction is not None:
        body["prediction"] = prediction
    if version is not None:
        body["version"] = version
    if features is not None:
        body["features"] = dict(features)
    body["label"] = label
    body["created"] = utc_iso(created)
    return body


__all__ = ["FORMAT", "RECENT", "UNSURE_SPAN", "PredictionIds", "check_label", "feedback_body"]
