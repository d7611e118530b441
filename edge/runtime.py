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

Telemetry (:mod:`hybridml.edge.telemetry`, on unless ``telemetry=False`` or
``HYBRIDML_TELEMETRY=off``) counts every answer in memory: batches through the observer hook,
the fast path through its version's tap. :meth:`EdgeRuntime.flush` writes the window to the
spool (:mod:`hybridml.edge.spool`) — every ``HYBRIDML_TELEMETRY_WINDOW_S``, from a background
thread, and at exit — and the agent or ``hybridml-edge push`` uploads it. Each answer has a
``prediction_id`` (:mod:`hybridml.edge.feedback`) that :meth:`EdgeRuntime.feedback` refers to.

In a rollout (docs/rollouts.md §4) the loaded version comes with its companion
(:class:`~hybridml.edge.roles.Rollout`): roles ``shadow`` and ``canary`` hand sampled calls to
:attr:`EdgeRuntime.shadow`'s worker after the answer is made, and :meth:`EdgeRuntime.rank`
interleaves the two models' rankings in role ``interleave`` (:mod:`hybridml.edge.ranking`).
Their records go to the spool with each telemetry window.
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
    HybridMLError,
    InferenceError,
    InputError,
    ModelLoadError,
    NoModelError,
    TableError,
)
from hybridml.shared.manifest import Manifest
from hybridml.shared.rollout import load_failed_body
from hybridml.shared.schema import EncodedBatch
from hybridml.shared.table import Table

from .columnar import BatchPrediction, predict_arrays
from .fallback import REASONS, CircuitBreaker, Fallback, FallbackPolicy
from .loaded import CLOUD, SOURCES, LoadedVersion
from .monitor import Monitor
from .observe import Observation, Observer, Outcome
from .prediction import Prediction, maker
from .ranking import Ranker, Ranking
from .roles import Rollout, companion_changed, load_rollout
from .session import ModelSession
from .shadow import Shadow, ShadowPlan
from .store import LocalStore
from .telemetry import Telemetry, TelemetrySettings

if TYPE_CHECKING:  # the cloud side (requests, signature checks) and SQLite load when used
    from .client import CloudClient
    from .push import PushLimits, PushResult
    from .sync import SyncOptions, SyncResult

log = logging.getLogger("hybridml.edge.runtime")

Row = Mapping[str, Any] | Sequence[Any]
_clock = time.perf_counter_ns


class EdgeRuntime:
    """Serve one model from a local store, offline first.

    ``store`` is a directory; ``model`` the model name; ``cloud_url`` enables sync and fallback:
    one URL, or several replicas (``"https://a,https://b"`` or a list) that sync, fallback and
    pushes fail over between (``token``, ``ca_bundle`` and ``allow_http`` as
    :class:`~hybridml.edge.client.CloudClient` takes them; or pass a ready ``client``).
    ``observers`` are called after every prediction call, whichever door it came in by, with
    an :class:`~hybridml.edge.observe.Observation` (they run in the caller's thread: keep
    them fast, and they must not raise). ``clock`` (monotonic seconds) drives the fallback's
    deadline and circuit breaker; tests pass their own.

    ``telemetry``: None reads :class:`~hybridml.edge.telemetry.TelemetrySettings` from the
    environment (on by default); False turns it off; True or settings turn it on; a
    :class:`~hybridml.edge.telemetry.Telemetry` is used as it is (tests give it a clock).
    """

    def __init__(self, store: str | os.PathLike[str] | LocalStore, model: str,
                 cloud_url: str | Sequence[str] | None = None, *,
                 policy: FallbackPolicy | None = None,
                 token: str | None = None, threads: int = 1,
                 observers: Iterable[Observer] = (),
                 clock: Callable[[], float] = time.monotonic,
                 ca_bundle: str | os.PathLike[str] | None = None, allow_http: bool = False,
                 client: CloudClient | None = None,
                 telemetry: bool | TelemetrySettings | Telemetry | None = None) -> None:
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
        self.monitor = Monitor(self.store, model, telemetry)
        self.ids = self.monitor.ids
        self._make = maker(self.ids)
        self.shadow = Shadow(model, clock=self.monitor.clock)
        self.ranker = Ranker(self.monitor.store_id, model, clock=self.monitor.clock)
        self.monitor.sources += [self.shadow.records, self.ranker.records]
        self._loaded: LoadedVersion | None = None
        self._rollout: Rollout | None = None  # used by a call only if its served is the call's
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
                    self._swap(None)
                    return False
                current = self._loaded
                if current is not None and manifest.dumps() == current.manifest.dumps():
                    if not companion_changed(self.store, self.name, current, self._rollout):
                        return True
                    self._rollout = self._load_rollout(current)  # the version stays
                    return True
                try:
                    loaded = self._load(manifest)
                except (ModelLoadError, TableError):
                    # Another process may have activated a newer version (and cleaned this
                    # one up) between reading the pointer and opening its files: look again.
                    if attempt == 2 or self.store.active(self.name) == manifest:
                        raise
                    continue
                self._swap(loaded, self._load_rollout(loaded))
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
            self._make, self.threads)

    def _swap(self, v: LoadedVersion | None, rollout: Rollout | bool | None = False) -> None:
        """Make ``v`` the loaded version (under the reload lock), its fast path reporting to
        telemetry; what the old one's fast path gathered is counted first. ``rollout``: its
        rollout (False: the current one, moved to ``v``, a new snapshot of the same version).

        The rollout is set first: a call that still reads the old version sees a rollout
        whose ``served`` is not its version, and skips it."""
        self.monitor.attach(v)
        if rollout is False:
            r = self._rollout
            rollout = None if r is None or v is None else r.on(v)
        assert rollout is not True
        self._rollout = rollout
        old, self._loaded = self._loaded, v
        self.monitor.detach(old)

    def _load_rollout(self, v: LoadedVersion) -> Rollout | None:
        """``v``'s rollout with its companion loaded; a companion that fails to load is
        logged and spooled as a ``health`` record, and ``v`` serves alone."""
        rollout, err = load_rollout(self.store, self.name, v, self.shadow, self.threads)
        if err is not None and rollout is not None:
            version = rollout.block.companion_version
            self.monitor.health(load_failed_body(self.name, version, rollout.block.id,
                                                 err.code, err.message), version)
        return rollout

    def sync(self, options: SyncOptions | None = None) -> SyncResult:
        """Sync with the cloud (:func:`hybridml.edge.sync.sync`, with ``options``), then load
        the new version if one was activated."""
        if self.client is None:
            raise ConfigError("no cloud URL configured; pass cloud_url to sync",
                              field="cloud_url")
        from .sync import load_failed, sync

        try:
            result = sync(self.store, self.client, self.name, options)
        except HybridMLError as exc:  # a rollout's served version that fails counts there
            body = load_failed(self.name, exc)
            if body is not None:
                self.monitor.health(body, body["version"])
            raise
        health = result.health()
        if health is not None:  # the companion failed: served alone, and the cloud is told
            self.monitor.health(health, health["version"])
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
            self._swap(v.replace(table=value, make=self._make))

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
                self._swap(v.replace(policy=value, make=self._make))

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

    @property
    def rollout(self) -> Rollout | None:
        """The rollout the loaded version takes part in (its block, the loaded companion),
        or None."""
        return self._rollout_of(self._loaded)

    def _rollout_of(self, v: LoadedVersion | None) -> Rollout | None:
        """The rollout of ``v``, the version a call read: None when the current rollout
        belongs to another version (a reload swapped in between)."""
        r = self._rollout
        return r if r is not None and r.served is v else None

    def _shadow_plan(self, v: LoadedVersion) -> ShadowPlan | None:
        """The shadow plan of ``v`` when this call is to be shadowed (the plan counted it)."""
        r = self._rollout_of(v)
        plan = None if r is None else r.plan
        return plan if plan is not None and plan.pick() else None

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
                answer = fast.predict(rows[0])  # telemetry: it reports to its tap itself
                if answer is not None:
                    if self.observers:
                        self._observe(Observation("row", v, [answer], rows=rows))
                    if self._rollout is not None:  # one read when there is no rollout
                        plan = self._shadow_plan(v)
                        if plan is not None:
                            plan.row(rows[0])  # the worker encodes it
                    return [answer]
        t0 = _clock() if self.telemetry is not None else 0
        _check_errors(errors)
        if type(rows) is not list:
            rows = list(rows)
        if not rows:
            return []
        if v is None:
            return self._cloud_only(rows)
        if errors == "raise":
            return self._answer(v, "rows", v.schema.encode(rows), t0)
        try:
            batch = v.schema.encode(rows)
        except InputError:
            good, bad = v.schema.split_bad(rows)
            return self._merge(v, "rows", len(rows), good, bad,
                               lambda: v.schema.encode([rows[i] for i in good]), t0)
        return self._answer(v, "rows", batch, t0)

    def predict_text(self, columns: Mapping[str, Sequence[str]], *,
                     errors: str = "raise") -> list[Prediction]:
        """Predict rows given as text columns by name (a CSV file's cells: numbers as text,
        the missing spellings of :data:`hybridml.shared.cells.MISSING_TOKENS`); extra
        columns are ignored. ``errors`` as in :meth:`predict`."""
        t0 = _clock() if self.telemetry is not None else 0
        _check_errors(errors)
        v = self._require()
        if errors == "raise":
            return self._answer(v, "text", v.schema.encode_text(columns), t0)
        try:
            batch = v.schema.encode_text(columns)
        except InputError as exc:
            if exc.row is None:  # the columns themselves are wrong: no row can be answered
                raise
            good, bad = v.schema.split_bad_text(columns)
            return self._merge(v, "text", len(good) + len(bad), good, bad,
                               lambda: v.schema.encode_text(
                                   {n: [columns[n][i] for i in good] for n in v.schema.names}),
                               t0)
        return self._answer(v, "text", batch, t0)

    def predict_arrays(self, num: Any = None, cat: Any = None) -> BatchPrediction:
        """Predict a batch given as arrays: ``num`` float ``[N, n_numeric]`` and ``cat`` str
        ``[N, n_categorical]``, each in schema order (see :mod:`hybridml.edge.columnar`).
        """
        tel = self.telemetry
        t0 = _clock() if tel is not None else 0
        v = self._require()
        result, batch = predict_arrays(v, self.fallback, num, cat)
        if tel is not None or self.observers:
            obs = Observation("arrays", v, result, batch=batch,
                              elapsed=(_clock() - t0) / 1e9 if t0 else None,
                              outcome=result.outcome())
            if tel is not None:
                tel(obs)
            self._observe(obs)
        plan = self._shadow_plan(v)
        if plan is not None:
            plan.batch(batch, result.outcome(), copy=True)  # the arrays may be the caller's
        return result

    # ---------------------------------------------------------------------------- ranking
    def rank(self, items: Sequence[Row], k: int = 10, *, positive: Any = None) -> Ranking:
        """Rank ``items`` (rows, by the rules of :meth:`predict`) by the served model's score
        — the probability of class ``positive`` (default: a binary model's positive class, a
        multiclass model's top class), or a regression's value — and return the top ``k``; in
        an ``interleave`` rollout, a team-draft interleaving of the served and the candidate
        model's rankings (:mod:`hybridml.edge.ranking`)."""
        v = self._require()
        return self.ranker.rank(v, self._rollout_of(v), items, k, positive)

    def click(self, ranking_id: str, item: Any) -> None:
        """Record a click on ``item`` (one of ``ranking.items``, or its position) of the
        ranking ``ranking_id``; :class:`InputError` for an unknown id."""
        self.ranker.click(ranking_id, item)

    def predict_one(self, row: Row) -> Prediction:
        """Predict a single row."""
        return self.predict([row])[0]

    def explain(self, rows: Iterable[Row] | Mapping[str, Sequence[str]]) -> list[dict[str, Any]]:
        """Attributions per raw column for typed rows (or text columns by name, as
        :meth:`predict_text` takes them) from the loaded version's device explainer
        (:mod:`hybridml.edge.explain`); :class:`NoModelError` when it has none."""
        from .explain import explain_version

        return explain_version(self._require(), self.store.artifact_path, rows)

    # ----------------------------------------------------------------------------- monitoring
    @property
    def telemetry(self) -> Telemetry | None:
        """The in-memory counters (None when telemetry is off)."""
        return self.monitor.telemetry

    @property
    def store_id(self) -> str:
        """The store's id, the first part of record and prediction ids."""
        return self.monitor.store_id

    def flush(self) -> list[str]:
        """End the telemetry window and write it to the spool (:meth:`Monitor.flush
        <hybridml.edge.monitor.Monitor.flush>`), with a rollout's ``shadow`` and
        ``interleave`` records; returns the record ids."""
        return self.monitor.flush()

    def feedback(self, prediction_id: str | None, label: Any, *,
                 features: Mapping[str, Any] | None = None) -> str:
        """Queue the true ``label`` of an answer (its ``prediction_id``) or of a row
        (``features`` by column name, with ``prediction_id`` None) in the spool; the next
        push sends it to the cloud. Returns the record id.

        The label must be one of the model's classes, or a finite number for regression;
        :class:`InputError` names ``label``, ``prediction_id`` or the bad feature otherwise.
        """
        return self.monitor.feedback(self._require(), prediction_id, label, features=features)

    def drift(self) -> dict[str, Any] | None:
        """The drift report (docs/monitoring.md §2) of the current telemetry window — what
        was answered since the last flush — against the loaded version's profile; None without
        telemetry, a loaded model or a profile (a model trained before profiles)."""
        return self.monitor.drift(self._loaded)

    def push(self, limits: PushLimits | None = None) -> PushResult:
        """Flush, then upload this model's spooled records (:func:`hybridml.edge.push.push`)."""
        client = self.client
        if client is None:
            raise ConfigError("no cloud URL configured; pass cloud_url to push telemetry",
                              field="cloud_url")
        return self.monitor.push(client, limits)

    def close(self) -> None:
        """Flush telemetry and close the spool (the runtime can still predict)."""
        self.monitor.close()

    # ------------------------------------------------------------------------- the one path
    def _require(self) -> LoadedVersion:
        v = self._loaded
        if v is None:
            raise NoModelError(
                f"no model {self.name!r} in the store {self.store.root}; run 'hybridml-edge "
                f"sync --cloud URL --name {self.name} --store {self.store.root}' first",
                name=self.name)
        return v

    def _answer(self, v: LoadedVersion, route: str, batch: EncodedBatch, t0: int = 0
                ) -> list[Prediction]:
        """Infer, ask the cloud for the rows the policy flags, tell the observers (and
        telemetry: ``t0`` is when the call came in, ``perf_counter_ns``)."""
        inf = v.infer(batch)
        plan = self._shadow_plan(v)
        make = self._make
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
            results = [make(val, src, version, None, None)
                       for val, src in zip(inf.values.tolist(), sources)]
        reasons = self.fallback.reasons(batch, inf.probabilities, inf.local_failed)
        ask = np.flatnonzero(reasons)
        tel = self.telemetry
        track = tel is not None or plan is not None  # the answers as arrays are wanted
        degraded = cloud = None
        if ask.size:
            unanswered = 0
            answers = self.fallback.ask(v.manifest, batch.take(ask))
            for i, a in zip(ask.tolist(), answers):
                reason = REASONS[reasons[i]]
                if a is None:
                    results[i].degraded, results[i].reason = True, reason
                    unanswered += 1
                    if track:
                        degraded = degraded if degraded is not None else \
                            np.zeros(len(results), dtype=bool)
                        degraded[i] = True
                else:
                    p = results[i] = Prediction(a.prediction, "cloud", a.model_version,
                                                a.probabilities, reason=reason)
                    p._ids = self.ids
                    if track:
                        cloud = cloud if cloud is not None else {}
                        cloud[i] = a
            if inf.local_failed and unanswered:
                raise InferenceError(
                    f"local inference failed and the cloud did not answer {unanswered} of "
                    f"{len(results)} row(s): {self.fallback.last_error or 'no cloud'}")
        outcome = _outcome(v, inf, reasons, degraded, cloud) if track else None
        if tel is not None or self.observers:
            obs = Observation(route, v, results, batch=batch,
                              elapsed=(_clock() - t0) / 1e9 if t0 else None, outcome=outcome)
            if tel is not None:
                tel(obs)
            self._observe(obs)
        if plan is not None:
            plan.batch(batch, outcome)
        return results

    def _merge(self, v: LoadedVersion, route: str, n: int, good: list[int],
               bad: Mapping[int, InputError], encode_good: Callable[[], EncodedBatch],
               t0: int = 0) -> list[Prediction]:
        """Report mode: an error answer for each bad row, predictions for the good ones."""
        results: list[Prediction | None] = [None] * n
        for i, err in bad.items():
            results[i] = Prediction(None, "edge", v.version, error=err.to_json()["error"])
        if good:
            for i, pred in zip(good, self._answer(v, route, encode_good(), t0)):
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
        out = [Prediction(a.prediction, "cloud", a.model_version, a.probabilities,
                          reason=reason) for a in answers if a is not None]
        for p in out:
            p._ids = self.ids
        return out


def _outcome(v: LoadedVersion, inf: Any, reasons: np.ndarray, degraded: np.ndarray | None,
             cloud: Mapping[int, Any] | None) -> Outcome:
    """The observers' arrays for the general path's answers: the local inference, with the
    rows the cloud answered replaced by its answers."""
    source = inf.source
    labels, values, probs = inf.labels, inf.values, inf.probabilities
    if cloud:
        source = source.copy()
        source[list(cloud)] = CLOUD
        if v.is_clf:
            assert labels is not None and probs is not None
            index = {str(c): j for j, c in enumerate(v.classes)}
            labels, probs = labels.copy(), probs.copy()
            for i, a in cloud.items():
                labels[i] = index.get(str(a.prediction), -1)
                got = a.probabilities or {}
                probs[i] = [got.get(str(c), 0.0) for c in v.classes]
        else:
            assert values is not None
            values = values.astype(np.float64)
            for i, a in cloud.items():
                values[i] = np.nan if a.prediction is None else a.prediction
    return Outcome(source, reasons, degraded, labels, values, probs)


def _check_errors(errors: str) -> None:
    if errors != "raise" and errors != "report":
        raise ConfigError(f"errors={errors!r}: use 'raise' or 'report'", field="errors")
