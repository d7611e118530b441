"""``EdgeRuntime``: offline inference with a precomputed table and a cloud fallback.

Predict path for a batch: validate and encode with the shared schema -> exact-match lookup in
the memory-mapped table -> one onnxruntime run for the misses -> the fallback policy picks
rows for the cloud, which answers within the timeout or leaves the local answer (``degraded``).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from hybridml.shared.errors import (
    CloudUnavailableError,
    ConfigError,
    HybridMLError,
    InputError,
    NoModelError,
    RemoteError,
)
from hybridml.shared.manifest import Manifest
from hybridml.shared.schema import EncodedBatch
from hybridml.shared.table import Table

from .columnar import BatchPrediction, TableCost, predict_arrays
from .fallback import CircuitBreaker, FallbackPolicy
from .fastpath import RowPath
from .session import ModelSession, Outputs
from .store import LocalStore

if TYPE_CHECKING:  # the cloud side (requests, signature checks) loads only when used
    from .client import CloudClient
    from .sync import SyncResult

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

    ``store`` is a directory; ``model`` the model name; ``cloud_url`` enables sync and fallback.
    """

    def __init__(self, store: str | os.PathLike[str] | LocalStore, model: str,
                 cloud_url: str | None = None, *, policy: FallbackPolicy | None = None,
                 token: str | None = None, threads: int = 1) -> None:
        self._fast: RowPath | None = None
        self._fast_off = False  # the fast path failed to build for the current state
        self._table_cost = TableCost()
        self._state_lock = threading.Lock()  # reload vs compiling the fast path
        self.store = store if isinstance(store, LocalStore) else LocalStore(store)
        self.name = model
        self.policy = policy or FallbackPolicy.from_env()
        self.client: CloudClient | None = None
        if cloud_url:
            from .client import CloudClient

            self.client = CloudClient(cloud_url, token=token)
        self.breaker = CircuitBreaker(self.policy.failures, self.policy.cooldown_s)
        self.threads = threads
        self.manifest: Manifest | None = None
        self.session: ModelSession | None = None
        self._table: Table | None = None
        self.cloud_failures = 0
        self.last_cloud_error: str | None = None
        self.reload()

    # ------------------------------------------------------------------------------ lifecycle
    def reload(self) -> bool:
        """(Re)load the active version from the store; returns True if one is loaded."""
        manifest = self.store.active(self.name)
        if manifest is None:
            with self._state_lock:
                self.manifest = self.session = self._table = None
                self._fast, self._fast_off = None, False
            return False
        if self.manifest is not None and manifest.dumps() == self.manifest.dumps():
            return True
        model = manifest.artifact("model")
        assert model is not None
        session = ModelSession(self.store.artifact_path(model.sha256), manifest.schema,
                               manifest.task, threads=self.threads)
        session.warm()
        table = None
        tab = manifest.artifact("table")
        if tab is not None:
            table = Table.open(self.store.artifact_path(tab.sha256), model_sha256=model.sha256)
        old_table = self._table
        with self._state_lock:
            self.manifest, self.session, self._table = manifest, session, table
            self._fast, self._fast_off = None, False  # compiled on the next single-row call
        if old_table is not None and old_table is not table:
            old_table.close()
        log.info("loaded %s v%s%s", self.name, manifest.version,
                 f" with a {len(table)}-row table" if table is not None else "")
        return True

    def sync(self) -> SyncResult:
        """Sync with the cloud, then load the new version if one was activated."""
        if self.client is None:
            raise CloudUnavailableError("no cloud URL configured; pass cloud_url to sync")
        from .sync import sync

        result = sync(self.store, self.client, self.name)
        if result.changed or self.manifest is None:
            self.reload()
        return result

    def rollback(self) -> Manifest:
        """Go back to the previous version and load it."""
        with self.store.lock(self.name):
            manifest = self.store.rollback(self.name)
        self.reload()
        return manifest

    @property
    def table(self) -> Table | None:
        """The loaded precomputed table, or None."""
        return self._table

    @table.setter
    def table(self, value: Table | None) -> None:
        with self._state_lock:
            self._table, self._fast, self._fast_off = value, None, False

    @property
    def policy(self) -> FallbackPolicy:
        """The fallback policy (replace it to change behaviour; the fast path follows)."""
        return self._policy

    @policy.setter
    def policy(self, value: FallbackPolicy) -> None:
        with self._state_lock:
            self._policy, self._fast, self._fast_off = value, None, False

    @property
    def version(self) -> int | None:
        """Active version, or None."""
        return self.manifest.version if self.manifest else None

    # -------------------------------------------------------------------------------- predict
    def predict(self, rows: Iterable[Row], *, errors: str = "raise") -> list[Prediction]:
        """Predict a batch; see the module docstring for the path.

        ``errors="raise"`` (default) raises :class:`InputError` for the first bad row;
        ``errors="report"`` returns a :class:`Prediction` with ``error`` set for bad rows and
        predicts the good ones.
        """
        if type(rows) is list and len(rows) == 1:  # the single-row fast path, checked first
            fast = self._fast or (None if self._fast_off else self._compile_fast())
            if fast is not None and (errors == "raise" or errors == "report"):
                answer = fast.predict(rows[0])
                if answer is not None:
                    return [answer]
        if errors != "raise" and errors != "report":
            raise ConfigError(f"errors={errors!r}: use 'raise' or 'report'", field="errors")
        if type(rows) is not list:
            rows = list(rows)
            if len(rows) == 1:
                return self.predict(rows, errors=errors)
        if not rows:
            return []
        if self.manifest is None or self.session is None:
            return self._cloud_only(rows)
        schema = self.manifest.schema
        try:
            batch = schema.encode(rows)
        except InputError:
            if errors == "raise":
                raise
        else:
            return self._predict_batch(rows, batch)
        # Report mode with a bad row among them: find the bad ones row by row.
        good, bad = self._split_bad(rows)
        results: list[Prediction | None] = [None] * len(rows)
        for i, err in bad.items():
            results[i] = Prediction(None, "edge", self.version, error=err.to_json()["error"])
        if good:
            good_rows = [rows[i] for i in good]
            for i, pred in zip(good, self._predict_batch(good_rows, schema.encode(good_rows))):
                results[i] = pred
        return [r for r in results if r is not None]

    def predict_arrays(self, num: Any = None, cat: Any = None) -> BatchPrediction:
        """Predict a batch given as arrays: ``num`` float ``[N, n_numeric]`` and ``cat`` str
        ``[N, n_categorical]``, each in schema order (see :mod:`hybridml.edge.columnar`).
        """
        return predict_arrays(self, num, cat, self._table_cost)

    def _compile_fast(self) -> RowPath | None:
        """Build the single-row fast path for the loaded version (None if it cannot apply)."""
        with self._state_lock:
            manifest, session = self.manifest, self.session
            if manifest is None or session is None:
                return None
            try:
                self._fast = RowPath(manifest, session, self._table, self._policy,
                                     Prediction.deferred)
            except Exception as exc:  # e.g. an onnxruntime without IO binding: stay correct
                log.warning("single-row fast path unavailable: %s", exc)
                self._fast, self._fast_off = None, True
            return self._fast

    def predict_one(self, row: Row) -> Prediction:
        """Predict a single row."""
        return self.predict([row])[0]

    def _split_bad(self, rows: list[Row]) -> tuple[list[int], dict[int, InputError]]:
        assert self.manifest is not None
        good: list[int] = []
        bad: dict[int, InputError] = {}
        for i, row in enumerate(rows):
            try:
                self.manifest.schema.encode([row])
                good.append(i)
            except InputError as exc:
                exc.row = i
                exc.details["row"] = i
                exc.message = exc.message.replace("row 0", f"row {i}", 1)
                bad[i] = exc
        return good, bad

    def _predict_batch(self, rows: list[Row], batch: EncodedBatch) -> list[Prediction]:
        manifest, session, table = self.manifest, self.session, self.table
        assert manifest is not None and session is not None
        n = len(batch)
        is_clf = manifest.task != "regression"
        classes = tuple(manifest.classes or ())
        labels = np.zeros(n, dtype=np.int64)
        values = np.zeros(n, dtype=np.float32)
        probs = np.zeros((n, len(classes)), dtype=np.float32) if is_clf else None
        hit = np.full(n, -1, dtype=np.int64)
        if table is not None:
            keys = manifest.schema.keys(batch)
            hit = (np.array([table.lookup(keys[0].tobytes())]) if n == 1
                   else table.lookup_many(keys))
            found = np.flatnonzero(hit >= 0)
            if found.size:
                t_labels, t_probs, t_values = table.take(hit[found])
                if is_clf:
                    labels[found] = t_labels
                    probs[found] = t_probs  # type: ignore[index]
                else:
                    values[found] = t_values
        miss = np.flatnonzero(hit < 0)
        local_failed = False
        if miss.size:
            try:
                out: Outputs = session.run(batch if miss.size == n else batch.take(miss))
                if is_clf:
                    labels[miss] = out.labels  # type: ignore[assignment]
                    probs[miss] = out.probabilities  # type: ignore[index]
                else:
                    values[miss] = out.values  # type: ignore[assignment]
            except Exception as exc:  # onnxruntime raises its own types; fall back below
                log.warning("local inference failed: %s", exc)
                local_failed = True
        version = manifest.version
        sources = ["precomputed" if h else "edge" for h in (hit >= 0).tolist()]
        make = Prediction.deferred
        if is_clf:
            assert probs is not None
            results = [make(classes[label], src, version, row, classes)
                       for label, src, row in zip(labels.tolist(), sources, probs)]
        else:
            results = [Prediction(v, src, version) for v, src in zip(values.tolist(), sources)]
        self._apply_fallback(rows, batch, results, probs, local_failed)
        return results

    # ------------------------------------------------------------------------------- fallback
    def _reasons(self, batch: EncodedBatch, probs: np.ndarray | None,
                 local_failed: bool) -> list[str | None]:
        p = self.policy
        n = len(batch)
        if local_failed:
            return ["local_error"] * n
        reasons: list[str | None] = [None] * n
        if not p.enabled:
            return reasons
        oor = batch.out_of_range if p.on_out_of_range else np.zeros(n, dtype=bool)
        unseen = batch.unseen if p.on_unseen else np.zeros(n, dtype=bool)
        low = (probs.max(axis=1) < p.min_confidence if probs is not None and probs.size
               else np.zeros(n, dtype=bool))
        # The first matching reason wins, in this order.
        for i in np.flatnonzero(oor | unseen | low).tolist():
            reasons[i] = ("out_of_range" if oor[i] else
                          "unseen_category" if unseen[i] else "low_confidence")
        return reasons

    def _apply_fallback(self, rows: list[Row], batch: EncodedBatch, results: list[Prediction],
                        probs: np.ndarray | None, local_failed: bool) -> None:
        reasons = self._reasons(batch, probs, local_failed)
        ask = [i for i, r in enumerate(reasons) if r is not None]
        if not ask:
            return
        answer = self._ask_cloud([rows[i] for i in ask])
        for k, i in enumerate(ask):
            if answer is not None:
                results[i] = _cloud_prediction(answer, k, reasons[i])
            else:
                results[i].degraded = True
                results[i].reason = reasons[i]
        if local_failed and answer is None:
            raise NoModelError("local inference failed and the cloud did not answer: "
                               f"{self.last_cloud_error}")

    def _ask_cloud(self, rows: list[Row]) -> dict[str, Any] | None:
        if self.client is None or not self.breaker.allow():
            return None
        try:
            answer = self.client.predict(self.name, rows, self.policy.timeout_ms / 1000.0)
        except (RemoteError, CloudUnavailableError) as exc:
            self.breaker.failure()
            self.cloud_failures += 1
            self.last_cloud_error = exc.message
            log.info("cloud fallback failed: %s", exc.message)
            return None
        except HybridMLError as exc:  # the cloud rejected the rows: keep the local answer
            self.last_cloud_error = exc.message
            return None
        self.breaker.success()
        return answer

    def _cloud_only(self, rows: list[Row]) -> list[Prediction]:
        if self.client is None:
            raise NoModelError(
                f"no model {self.name!r} in the store {self.store.root} and no cloud to ask; "
                f"run 'hybridml-edge sync --cloud URL --name {self.name} --store "
                f"{self.store.root}' first", name=self.name)
        if not self.breaker.allow():
            raise CloudUnavailableError(
                f"no local model {self.name!r} and the cloud is marked down (circuit open); "
                "run sync when the cloud is back")
        try:
            answer = self.client.predict(self.name, rows, self.policy.timeout_ms / 1000.0)
        except (RemoteError, CloudUnavailableError):
            self.breaker.failure()
            raise
        self.breaker.success()
        return [_cloud_prediction(answer, k, "no_local_model") for k in range(len(rows))]


def _cloud_prediction(answer: Mapping[str, Any], k: int, reason: str | None) -> Prediction:
    probs = answer.get("probabilities")
    return Prediction(answer["predictions"][k], "cloud", answer.get("model_version"),
                      probs[k] if isinstance(probs, list) else None, reason=reason)
