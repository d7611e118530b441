"""``EdgeRuntime``: offline inference with a precomputed table and a cloud fallback.

Predict path for a batch: validate and encode with the shared schema -> exact-match lookup in
the memory-mapped table -> one onnxruntime run for the misses -> the fallback policy picks
rows for the cloud, which answers within the timeout or leaves the local answer (``degraded``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hybridml.shared.errors import (
    CloudUnavailableError,
    HybridMLError,
    InputError,
    NoModelError,
    RemoteError,
)
from hybridml.shared.manifest import Manifest
from hybridml.shared.schema import EncodedBatch
from hybridml.shared.table import Table

from .client import CloudClient
from .fallback import CircuitBreaker, FallbackPolicy
from .session import ModelSession, Outputs
from .store import LocalStore
from .sync import SyncResult, sync

log = logging.getLogger("hybridml.edge.runtime")

Row = Mapping[str, Any] | Sequence[Any]


@dataclass
class Prediction:
    """One row's answer. ``source`` is ``precomputed``, ``edge`` or ``cloud``."""

    prediction: Any
    source: str
    model_version: int | None
    probabilities: dict[str, float] | None = None
    degraded: bool = False
    reason: str | None = None
    error: dict[str, Any] | None = field(default=None)

    def to_json(self) -> dict[str, Any]:
        """JSON form printed by ``predict --json``."""
        out: dict[str, Any] = {"prediction": self.prediction, "source": self.source,
                               "model_version": self.model_version}
        if self.probabilities is not None:
            out["probabilities"] = self.probabilities
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
        self.store = store if isinstance(store, LocalStore) else LocalStore(store)
        self.name = model
        self.policy = policy or FallbackPolicy.from_env()
        self.client = CloudClient(cloud_url, token=token) if cloud_url else None
        self.breaker = CircuitBreaker(self.policy.failures, self.policy.cooldown_s)
        self.threads = threads
        self.manifest: Manifest | None = None
        self.session: ModelSession | None = None
        self.table: Table | None = None
        self.cloud_failures = 0
        self.last_cloud_error: str | None = None
        self.reload()

    # ------------------------------------------------------------------------------ lifecycle
    def reload(self) -> bool:
        """(Re)load the active version from the store; returns True if one is loaded."""
        manifest = self.store.active(self.name)
        if manifest is None:
            self.manifest = self.session = self.table = None
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
        old_table = self.table
        self.manifest, self.session, self.table = manifest, session, table
        if old_table is not None and old_table is not table:
            old_table.close()
        log.info("loaded %s v%s%s", self.name, manifest.version,
                 f" with a {len(table)}-row table" if table is not None else "")
        return True

    def sync(self) -> SyncResult:
        """Sync with the cloud, then load the new version if one was activated."""
        if self.client is None:
            raise CloudUnavailableError("no cloud URL configured; pass cloud_url to sync")
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
        rows = list(rows)
        if self.manifest is None or self.session is None:
            return self._cloud_only(rows)
        schema = self.manifest.schema
        if errors == "report":
            good, bad = self._split_bad(rows)
        else:
            good, bad = list(range(len(rows))), {}
        results: list[Prediction | None] = [None] * len(rows)
        for i, err in bad.items():
            results[i] = Prediction(None, "edge", self.version, error=err.to_json()["error"])
        if good:
            good_rows = [rows[i] for i in good] if bad else rows
            batch = schema.encode(good_rows)
            for i, pred in zip(good, self._predict_batch(good_rows, batch)):
                results[i] = pred
        return [r for r in results if r is not None]

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
        assert self.manifest is not None and self.session is not None
        n = len(batch)
        labels = np.zeros(n, dtype=np.int64)
        values = np.zeros(n, dtype=np.float32)
        is_clf = self.manifest.task != "regression"
        n_cls = len(self.manifest.classes or ())
        probs = np.zeros((n, n_cls), dtype=np.float32) if is_clf else None
        source = np.full(n, "edge", dtype=object)
        hit = np.full(n, -1, dtype=np.int64)
        if self.table is not None:
            keys = self.manifest.schema.keys(batch)
            hit = (np.array([self.table.lookup(keys[0].tobytes())]) if n == 1
                   else self.table.lookup_many(keys))
            for i in np.flatnonzero(hit >= 0):
                j = int(hit[i])
                source[i] = "precomputed"
                if is_clf:
                    labels[i] = self.table.label(j)
                    probs[i] = self.table.probabilities(j)  # type: ignore[index]
                else:
                    values[i] = self.table.value(j)
        miss = np.flatnonzero(hit < 0)
        local_failed = False
        if miss.size:
            try:
                out: Outputs = self.session.run(batch if miss.size == n else batch.take(miss))
                if is_clf:
                    labels[miss] = out.labels  # type: ignore[assignment]
                    probs[miss] = out.probabilities  # type: ignore[index]
                else:
                    values[miss] = out.values  # type: ignore[assignment]
            except Exception as exc:  # onnxruntime raises its own types; fall back below
                log.warning("local inference failed: %s", exc)
                local_failed = True
        results = [self._local(i, labels, values, probs, str(source[i])) for i in range(n)]
        self._apply_fallback(rows, batch, results, probs, local_failed)
        return results

    def _local(self, i: int, labels: np.ndarray, values: np.ndarray, probs: np.ndarray | None,
               source: str) -> Prediction:
        assert self.manifest is not None
        if probs is None:
            return Prediction(float(values[i]), source, self.manifest.version)
        classes = self.manifest.classes or ()
        return Prediction(classes[int(labels[i])], source, self.manifest.version,
                          {str(c): round(float(p), 6) for c, p in zip(classes, probs[i])})

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
        conf = probs.max(axis=1) if probs is not None and probs.size else None
        for i in range(n):
            if p.on_out_of_range and batch.out_of_range[i]:
                reasons[i] = "out_of_range"
            elif p.on_unseen and batch.unseen[i]:
                reasons[i] = "unseen_category"
            elif conf is not None and conf[i] < p.min_confidence:
                reasons[i] = "low_confidence"
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
