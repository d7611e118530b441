"""``EdgeRuntime``: offline inference with a precomputed table and a cloud fallback.

The runtime's public methods are doors: they parse what the caller sent and dispatch; every
one of them then takes the same path::

    predict(rows) / predict_text(columns) / predict_arrays(num, cat)      the doors
      -> LoadedVersion (immutable; read once per call)  manifest + session + table + fast path
      -> InputSchema.encode / encode_text / encode_arrays  the cell rules of shared.cells
      -> LoadedVersion.infer                             table lookup, then onnxruntime
      -> Fallback (policy, breaker, client)              which rows go to the cloud, and ask
      -> observers                                       the one hook for every route

A single row first tries the fast path compiled for the loaded version
(:class:`~hybridml.edge.fastpath.RowPath`), which answers plain rows in microseconds and hands
anything else to the general path above.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from hybridml.shared.errors import (
    ConfigError,
    InferenceError,
    InputError,
    ModelLoadError,
    NoModelError,
    TableError,
)
from hybridml.shared.manifest import Manifest
from hybridml.shared.schema import EncodedBatch
from hybridml.shared.table import Table

from .columnar import BatchPrediction, predict_arrays
from .fallback import REASONS, CircuitBreaker, Fallback, FallbackPolicy
from .loaded import SOURCES, LoadedVersion
from .observe import Observation, Observer
from .session import ModelSession
from .store import LocalStore

if TYPE_CHECKING:  # the cloud side (requests, signature checks) loads only when used
    from .client import CloudClient
    from .sync import SyncOptions, SyncResult

log = logging.getLogger("hybridml.edge.runtime")

Row = Mapping[str, Any] | Sequence[Any]


class Prediction:
    """One row's answer. ``source`` is ``precomputed``, ``edge`` or ``cloud``.

    ``probabilities`` (classifiers) maps each class to its probability rounded to 6 digits; it
    is built on first access, so callers that only read ``prediction`` never pay for it.
    """

    __slots__ = ("_classes", "_probs", "_raw", "degraded", "error", "model_version",
                 "prediction", "reason", "source")

    def __init__(self, prediction: Any, source: str, model_version: int | None,
                 probabilities: dict[str, float] | None = None, degraded: bool = False,
                 reason: str | None = None, error: dict[str, Any] | None = None) -> None:
        self.prediction = prediction
        self.source = source
        self.model_version = model_version
        self.degraded = degraded
        self.reason = reason
        self.error = error
        self._probs = probabilities
        self._raw: Any = None
        self._classes: Sequence[Any] | None = None

    @classmethod
    def deferred(cls, prediction: Any, source: str, model_version: int | None, raw: Any,
                 classes: Sequence[Any] | None) -> Prediction:
        """A local answer whose probabilities dict is built from ``raw`` on first access.

        ``raw`` is a row of class probabilities (built into a dict of ``classes``), a shared
        dict (copied on access) or None.
        """
        p = cls.__new__(cls)
        p.prediction, p.source, p.model_version = prediction, source, model_version
        p.degraded, p.reason, p.error = False, None, None
        p._probs, p._raw, p._classes = None, raw, classes
        return p

    @property
    def probabilities(self) -> dict[str, float] | None:
        """Class -> probability (classifiers), else None."""
        raw = self._raw
        if raw is not None:
            self._raw = None
            if isinstance(raw, dict):
                self._probs = dict(raw)
            else:
                self._probs = {str(c): round(float(p), 6)
                               for c, p in zip(self._classes or (), raw)}
        return self._probs

    @probabilities.setter
    def probabilities(self, value: dict[str, float] | None) -> None:
        self._probs, self._raw = value, None

    def _fields(self) -> tuple[Any, ...]:
        return (self.prediction, self.source, self.model_version, self.probabilities,
                self.degraded, self.reason, self.error)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Prediction):
            return NotImplemented
        return self._fields() == other._fields()

    __hash__ = None  # type: ignore[assignment]  # mutable, like the dataclass it replaced

    def __repr__(self) -> str:
        names = ("prediction", "source", "model_version", "probabilities", "degraded", "reason",
                 "error")
        return "Prediction(" + ", ".join(f"{k}={v!r}" for k, v in zip(names, self._fields())) \
            + ")"

    def to_json(self) -> dict[str, Any]:
        """JSON form printed by ``predict --json``."""
        pred = self.prediction
        out: dict[str, Any] = {"prediction": None if pred != pred else pred,
                               "source": self.source,
                               "model_version": self.model_version}
        probabilities = self.probabilities
        if probabilities is not None:  # NaN (a model overflowing) is not JSON: null
            out["probabilities"] = {k: None if v != v else v for k, v in probabilities.items()}
        if self.degraded:
            out["degraded"] = True
        if self.reason:
            out["reason"] = self.reason
        if self.error is not None:
            out["error"] = self.error
        return out


class EdgeRuntime:
    """Serve one model from a local store, offline first.

    ``store`` is a directory; ``model`` the model name; ``cloud_url`` enables sync and fallback
    (``token``, ``ca_bundle`` and ``allow_http`` as :class:`~hybridml.edge.client.CloudClient`
    takes them; or pass a ready ``client``).
    ``observers`` are called after every prediction call, whichever door it came in by, with
    an :class:`~hybridml.edge.observe.Observation` (they run in the caller's thread: keep
    them fast, and they must not raise). ``clock`` (monotonic seconds) drives the fallback's
    deadline and circuit breaker; tests pass their own.
    """

    def __init__(self, store: str | os.PathLike[str] | LocalStore, model: str,
                 cloud_url: str | None = None, *, policy: FallbackPolicy | None = None,
                 token: str | None = None, threads: int = 1,
                 observers: Iterable[Observer] = (),
                 clock: Callable[[], float] = time.monotonic,
                 ca_bundle: str | os.PathLike[str] | None = None, allow_http: bool = False,
                 client: CloudClient | None = None) -> None:
        self.store = store if isinstance(store, LocalStore) else LocalStore(store)
        self.name = model
        if client is None and cloud_url:
            from .client import CloudClient

            client = CloudClient(cloud_url, token=token, ca_bundle=ca_bundle,
                                 allow_http=allow_http)
        self.fallback = Fallback(model, policy or FallbackPolicy.from_env(), client,
                                 clock=clock)
        self.threads = threads
        self.observers: list[Observer] = list(observers)
        self._loaded: LoadedVersion | None = None
        self._reload_lock = threading.Lock()  # one reload at a time; readers never wait
        self.reload()

    # ------------------------------------------------------------------------------ lifecycle
    def reload(self) -> bool:
        """(Re)load the active version from the store; returns True if one is loaded.

        The new version is built beside the old one and swapped in with one assignment:
        predictions running meanwhile finish on the version they started with.
        """
        with self._reload_lock:
            for attempt in range(3):
                manifest = self.store.active(self.name)
                if manifest is None:
                    self._loaded = None
                    return False
                current = self._loaded
                if current is not None and manifest.dumps() == current.manifest.dumps():
                    return True
                try:
                    loaded = self._load(manifest)
                except (ModelLoadError, TableError):
                    # Another process may have activated a newer version (and cleaned this
                    # one up) between reading the pointer and opening its files: look again.
                    if attempt == 2 or self.store.active(self.name) == manifest:
                        raise
                    continue
                self._loaded = loaded
                log.info("loaded %s v%s%s", self.name, manifest.version,
                         f" with a {len(loaded.table)}-row table" if loaded.table else "")
                return True
        return False  # unreachable: the loop returns or raises

    def _load(self, manifest: Manifest) -> LoadedVersion:
        model = manifest.artifact("model")
        assert model is not None
        tab = manifest.artifact("table")
        return LoadedVersion.load(
            manifest, self.store.artifact_path(model.sha256),
            None if tab is None else self.store.artifact_path(tab.sha256), self.policy,
            Prediction.deferred, self.threads)

    def sync(self, options: SyncOptions | None = None) -> SyncResult:
        """Sync with the cloud (:func:`hybridml.edge.sync.sync`, with ``options``), then load
        the new version if one was activated."""
        if self.client is None:
            raise ConfigError("no cloud URL configured; pass cloud_url to sync",
                              field="cloud_url")
        from .sync import sync

        result = sync(self.store, self.client, self.name, options)
        if result.changed or self._loaded is None:
            self.reload()
        return result

    def rollback(self) -> Manifest:
        """Go back to the previous version and load it."""
        with self.store.lock(self.name):
            manifest = self.store.rollback(self.name)
        self.reload()
        return manifest

    # ----------------------------------------------------------------------------- properties
    @property
    def loaded(self) -> LoadedVersion | None:
        """The loaded version (an immutable snapshot), or None."""
        return self._loaded

    @property
    def manifest(self) -> Manifest | None:
        """The loaded version's manifest, or None."""
        v = self._loaded
        return None if v is None else v.manifest

    @property
    def session(self) -> ModelSession | None:
        """The loaded version's onnxruntime session, or None."""
        v = self._loaded
        return None if v is None else v.session

    @property
    def table(self) -> Table | None:
        """The loaded precomputed table, or None."""
        v = self._loaded
        return None if v is None else v.table

    @table.setter
    def table(self, value: Table | None) -> None:
        with self._reload_lock:
            v = self._loaded
            if v is None:
                raise NoModelError(f"no model {self.name!r} loaded; run sync first",
                                   name=self.name)
            self._loaded = v.replace(table=value, make=Prediction.deferred)

    @property
    def policy(self) -> FallbackPolicy:
        """The fallback policy (replace it to change behaviour; the fast path follows)."""
        return self.fallback.policy

    @policy.setter
    def policy(self, value: FallbackPolicy) -> None:
        with self._reload_lock:
            self.fallback.policy = value
            v = self._loaded
            if v is not None:
                self._loaded = v.replace(policy=value, make=Prediction.deferred)

    @property
    def client(self) -> CloudClient | None:
        """The cloud client, or None when no cloud is configured."""
        return self.fallback.client

    @property
    def breaker(self) -> CircuitBreaker:
        """The fallback's circuit breaker."""
        return self.fallback.breaker

    @property
    def cloud_failures(self) -> int:
        """Cloud calls that failed (unreachable, timed out, 5xx) since start."""
        return self.fallback.failures

    @property
    def last_cloud_error(self) -> str | None:
        """What the cloud said or failed with last, or None."""
        return self.fallback.last_error

    @property
    def version(self) -> int | None:
        """Active version, or None."""
        v = self._loaded
        return None if v is None else v.version

    # ---------------------------------------------------------------------------------- doors
    def predict(self, rows: Iterable[Row], *, errors: str = "raise") -> list[Prediction]:
        """Predict typed rows: dicts by column name or lists in schema order.

        ``errors="raise"`` (default) raises :class:`InputError` for the first bad row;
        ``errors="report"`` returns a :class:`Prediction` with ``error`` set for bad rows and
        predicts the good ones.
        """
        v = self._loaded  # read once: this call uses this version and no other
        if v is not None and type(rows) is list and len(rows) == 1:
            fast = v.fast  # the single-row fast path, checked first
            if fast is not None and (errors == "raise" or errors == "report"):
                answer = fast.predict(rows[0])
                if answer is not None:
                    if self.observers:
                        self._observe(Observation("row", v, [answer], rows=rows))
                    return [answer]
        _check_errors(errors)
        if type(rows) is not list:
            rows = list(rows)
        if not rows:
            return []
        if v is None:
            return self._cloud_only(rows)
        if errors == "raise":
            return self._answer(v, "rows", v.schema.encode(rows))
        try:
            batch = v.schema.encode(rows)
        except InputError:
            good, bad = v.schema.split_bad(rows)
            return self._merge(v, "rows", len(rows), good, bad,
                               lambda: v.schema.encode([rows[i] for i in good]))
        return self._answer(v, "rows", batch)

    def predict_text(self, columns: Mapping[str, Sequence[str]], *,
                     errors: str = "raise") -> list[Prediction]:
        """Predict rows given as text columns by name (a CSV file's cells: numbers as text,
        the missing spellings of :data:`hybridml.shared.cells.MISSING_TOKENS`); extra
        columns are ignored. ``errors`` as in :meth:`predict`."""
        _check_errors(errors)
        v = self._require()
        if errors == "raise":
            return self._answer(v, "text", v.schema.encode_text(columns))
        try:
            batch = v.schema.encode_text(columns)
        except InputError as exc:
            if exc.row is None:  # the columns themselves are wrong: no row can be answered
                raise
            good, bad = v.schema.split_bad_text(columns)
            return self._merge(v, "text", len(good) + len(bad), good, bad,
                               lambda: v.schema.encode_text(
                                   {n: [columns[n][i] for i in good] for n in v.schema.names}))
        return self._answer(v, "text", batch)

    def predict_arrays(self, num: Any = None, cat: Any = None) -> BatchPrediction:
        """Predict a batch given as arrays: ``num`` float ``[N, n_numeric]`` and ``cat`` str
        ``[N, n_categorical]``, each in schema order (see :mod:`hybridml.edge.columnar`).
        """
        v = self._require()
        result, batch = predict_arrays(v, self.fallback, num, cat)
        if self.observers:
            self._observe(Observation("arrays", v, result, batch=batch))
        return result

    def predict_one(self, row: Row) -> Prediction:
        """Predict a single row."""
        return self.predict([row])[0]

    # ------------------------------------------------------------------------- the one path
    def _require(self) -> LoadedVersion:
        v = self._loaded
        if v is None:
            raise NoModelError(
                f"no model {self.name!r} in the store {self.store.root}; run 'hybridml-edge "
                f"sync --cloud URL --name {self.name} --store {self.store.root}' first",
                name=self.name)
        return v

    def _answer(self, v: LoadedVersion, route: str, batch: EncodedBatch) -> list[Prediction]:
        """Infer, ask the cloud for the rows the policy flags, tell the observers."""
        inf = v.infer(batch)
        make = Prediction.deferred
        version = v.version
        sources = [SOURCES[s] for s in inf.source.tolist()]
        if v.is_clf:
            assert inf.labels is not None and inf.probabilities is not None
            classes = v.classes
            results = [make(classes[label], src, version, row, classes)
                       for label, src, row in zip(inf.labels.tolist(), sources,
                                                  inf.probabilities)]
        else:
            assert inf.values is not None
            results = [Prediction(val, src, version)
                       for val, src in zip(inf.values.tolist(), sources)]
        reasons = self.fallback.reasons(batch, inf.probabilities, inf.local_failed)
        ask = np.flatnonzero(reasons)
        if ask.size:
            unanswered = 0
            answers = self.fallback.ask(v.manifest, batch.take(ask))
            for i, a in zip(ask.tolist(), answers):
                reason = REASONS[reasons[i]]
                if a is None:
                    results[i].degraded, results[i].reason = True, reason
                    unanswered += 1
                else:
                    results[i] = Prediction(a.prediction, "cloud", a.model_version,
                                            a.probabilities, reason=reason)
            if inf.local_failed and unanswered:
                raise InferenceError(
                    f"local inference failed and the cloud did not answer {unanswered} of "
                    f"{len(results)} row(s): {self.fallback.last_error or 'no cloud'}")
        if self.observers:
            self._observe(Observation(route, v, results, batch=batch))
        return results

    def _merge(self, v: LoadedVersion, route: str, n: int, good: list[int],
               bad: Mapping[int, InputError], encode_good: Callable[[], EncodedBatch]
               ) -> list[Prediction]:
        """Report mode: an error answer for each bad row, predictions for the good ones."""
        results: list[Prediction | None] = [None] * n
        for i, err in bad.items():
            results[i] = Prediction(None, "edge", v.version, error=err.to_json()["error"])
        if good:
            for i, pred in zip(good, self._answer(v, route, encode_good())):
                results[i] = pred
        return [r for r in results if r is not None]

    def _observe(self, observation: Observation) -> None:
        for observer in self.observers:
            observer(observation)

    def _cloud_only(self, rows: list[Row]) -> list[Prediction]:
        """No local model: the cloud answers every row, or the call fails with its error."""
        if not self.fallback.can_ask:
            raise NoModelError(
                f"no model {self.name!r} in the store {self.store.root} and no cloud to ask; "
                f"run 'hybridml-edge sync --cloud URL --name {self.name} --store "
                f"{self.store.root}' first", name=self.name)
        answers = self.fallback.ask_rows(rows, strict=True)
        reason = REASONS[-1]
        return [Prediction(a.prediction, "cloud", a.model_version, a.probabilities,
                           reason=reason) for a in answers if a is not None]


def _check_errors(errors: str) -> None:
    if errors != "raise" and errors != "report":
        raise ConfigError(f"errors={errors!r}: use 'raise' or 'report'", field="errors")
