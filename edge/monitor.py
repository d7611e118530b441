"""What a runtime reports about its model: counters, the spool, prediction ids, feedback.

:class:`Monitor` is the monitoring half of :class:`~hybridml.edge.runtime.EdgeRuntime`
(docs/monitoring.md §3–§5, the device side): it owns the runtime's
:class:`~hybridml.edge.telemetry.Telemetry`, attaches a tap to each loaded version's fast path,
hands out prediction ids, writes windows and feedback to the store's
:class:`~hybridml.edge.spool.Spool` and pushes them (:mod:`hybridml.edge.push`).

Windows end at every push, every ``HYBRIDML_TELEMETRY_WINDOW_S`` seconds (one daemon thread,
:class:`Flusher`, for all the process's monitors) and at exit (``atexit``). SQLite and the
cloud client load only when a window is written or pushed.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from hybridml.shared.errors import HybridMLError, InputError

from .feedback import PredictionIds, check_label, feedback_body
from .identity import store_id
from .store import LocalStore
from .telemetry import Telemetry, TelemetrySettings

if TYPE_CHECKING:
    from .client import CloudClient
    from .loaded import LoadedVersion
    from .push import PushLimits, PushResult
    from .spool import Spool

log = logging.getLogger("hybridml.edge.monitor")

UNSAVED_MAX = 256  # summaries kept in memory while the spool cannot take them
Records = list[tuple[str, dict[str, Any], str, int]]


class Monitor:
    """The monitoring of one runtime's model in ``store``.

    ``telemetry``: None reads :class:`~hybridml.edge.telemetry.TelemetrySettings` from the
    environment (on by default); False turns counting off; True or settings turn it on; a
    :class:`~hybridml.edge.telemetry.Telemetry` is used as it is (tests give it a clock).
    Prediction ids and feedback work either way.
    """

    def __init__(self, store: LocalStore, model: str,
                 telemetry: bool | TelemetrySettings | Telemetry | None = None) -> None:
        self.store = store
        self.model = model
        self.telemetry = telemetry_for(model, telemetry)
        self.store_id = _store_id(store)
        self.ids = PredictionIds(self.store_id, model)
        self._spool: Spool | None = None
        self._unsaved: Records = []
        self._lock = threading.Lock()
        # Other counters whose windows end with telemetry's (a rollout's shadow and
        # interleave records): each gives the records of the window it ends.
        self.sources: list[Callable[[], Records]] = []
        if self.telemetry is not None:
            FLUSHER.watch(self, self.telemetry.settings.window_s)

    @property
    def clock(self) -> Callable[[], float]:
        """What dates this device's records (POSIX seconds): telemetry's clock (tests and
        simulated fleets give their own), else the system's."""
        return time.time if self.telemetry is None else self.telemetry.clock

    def health(self, body: Mapping[str, Any], version: int | None) -> str | None:
        """Spool a ``health`` record now; its id, or None (logged) if the spool failed."""
        try:
            return self.spool.add("health", body, model=self.model, version=version)
        except HybridMLError as exc:
            log.warning("could not spool a health record of %s: %s", self.model, exc.message)
            return None

    # -------------------------------------------------------------------------- the versions
    def attach(self, v: LoadedVersion | None) -> None:
        """Let ``v``'s fast path report its answers to the counters."""
        tel = self.telemetry
        if tel is not None and v is not None and v.fast is not None:
            v.fast.attach(tel.tap(v))

    def detach(self, v: LoadedVersion | None) -> None:
        """``v`` is no longer loaded: count what its fast path gathered."""
        if v is not None and v.fast is not None and v.fast.tap is not None:
            v.fast.tap.drain()

    # ---------------------------------------------------------------------------- the spool
    @property
    def spool(self) -> Spool:
        """The store's spool (opened on first use)."""
        if self._spool is None:
            from .spool import Spool

            self._spool = Spool.open(self.store.root)
        return self._spool

    def flush(self) -> list[str]:
        """End the telemetry window: write its summaries (and samples), and what
        :attr:`sources` give, to the spool; returns their record ids. Records the spool
        cannot take (a full or read-only disk) stay in memory, up to :data:`UNSAVED_MAX`,
        for the next flush, and the error is raised."""
        tel = self.telemetry
        extra: Records = []
        for source in self.sources:
            try:
                extra.extend(source())
            except Exception as exc:  # counters are statistics: never fail a flush on them
                log.warning("records of %s not written: %s", self.model, exc)
        if tel is None and not extra:
            return []
        with self._lock:
            records = self._unsaved + extra + ([] if tel is None else
                                               tel.flush(stale=self.stale()))
            self._unsaved = []
            if not records:
                return []
            try:
                return self.spool.add_many(records)
            except HybridMLError:
                self._unsaved = records[-UNSAVED_MAX:]
                raise

    def feedback(self, v: LoadedVersion, prediction_id: str | None, label: Any, *,
                 features: Mapping[str, Any] | None = None) -> str:
        """Queue the true ``label`` of an answer of this device (``prediction_id``) or of a
        row (``features``) for ``v``'s model; returns the spool record id. A recent id's
        record also carries the prediction and version it judges."""
        label = check_label(v.manifest, label)
        prediction = version = None
        if prediction_id is not None:
            known = self.ids.recall(self.ids.check(prediction_id))
            if known is not None:
                prediction, version = known
                if isinstance(prediction, float) and prediction != prediction:
                    prediction = None  # a model that overflowed: NaN is not JSON
        elif features is None:
            raise InputError("feedback needs the prediction_id of the answer it judges, or "
                             "the row's features=", field="prediction_id")
        row = None
        if features is not None:
            v.schema.check_row(features)
            row = {n: features[n] for n in v.schema.names}
        body = feedback_body(self.model, label, prediction_id=prediction_id,
                             prediction=prediction, version=version, features=row,
                             created=self.clock())
        return self.spool.add("feedback", body, model=self.model, version=version)

    def drift(self, v: LoadedVersion | None) -> dict[str, Any] | None:
        """The drift report of ``v``'s version in the current window; None without
        telemetry, a version or a profile."""
        tel = self.telemetry
        if v is None or tel is None:
            return None
        profile = tel.binner(v).profile
        if profile is None:
            return None
        from hybridml.shared.drift import drift_report

        return drift_report(profile, tel.summary(v, stale=self.stale()))

    def push(self, client: CloudClient, limits: PushLimits | None = None) -> PushResult:
        """Flush, then upload this model's spooled records."""
        from .push import push

        self.flush()
        return push(self.spool, client, model=self.model, limits=limits)

    def close(self) -> None:
        """Flush, and close the spool (it opens again when needed)."""
        try:
            self.flush()
        finally:
            spool, self._spool = self._spool, None
            if spool is not None:
                spool.close()

    def stale(self) -> bool:
        """Whether the model is stale (:mod:`hybridml.edge.freshness`) now."""
        from . import freshness

        try:
            seen = freshness.Seen.load(self.store.sync_state(self.model),
                                       self.store.active(self.model),
                                       self.store.previous(self.model))
            fresh = freshness.describe(seen, time.time(), freshness.FreshnessSettings.from_env())
        except HybridMLError:
            return False
        return fresh["state"] == "stale"


def telemetry_for(model: str, option: bool | TelemetrySettings | Telemetry | None
                  ) -> Telemetry | None:
    """The telemetry a ``telemetry=`` argument asks for (see :class:`Monitor`)."""
    if isinstance(option, Telemetry):
        return option
    if isinstance(option, TelemetrySettings):
        settings = option
    else:
        settings = TelemetrySettings.from_env()
        if option is not None:
            settings = dataclasses.replace(settings, enabled=bool(option))
    return Telemetry(model, settings) if settings.enabled else None


def _store_id(store: LocalStore) -> str:
    """The store's id; a process-local one (logged) when the store cannot hold one."""
    try:
        return store_id(store.root)
    except (OSError, HybridMLError) as exc:
        sid = os.urandom(5).hex()
        log.warning("no store id in %s (%s); prediction ids use %s for this process, and "
                    "telemetry cannot be spooled until that is fixed", store.root,
                    getattr(exc, "message", exc), sid)
        return sid


class Flusher:
    """One daemon thread that flushes every live monitor each window, and all of them at
    exit. It holds monitors weakly: a runtime nobody uses goes away as before."""

    def __init__(self) -> None:
        self._due: weakref.WeakKeyDictionary[Monitor, tuple[float, float]] = \
            weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._exit_hooked = False

    def watch(self, monitor: Monitor, every_s: float) -> None:
        """Flush ``monitor`` every ``every_s`` seconds (0: only at exit)."""
        with self._lock:
            self._due[monitor] = (every_s, time.monotonic() + every_s)
            if not self._exit_hooked:
                atexit.register(self.flush_all)
                self._exit_hooked = True
            if every_s > 0 and self._thread is None:
                self._thread = threading.Thread(target=self._run, name="hybridml-telemetry",
                                                daemon=True)
                self._thread.start()
        self._wake.set()

    def flush_all(self) -> None:
        """Flush every live monitor (at exit); failures are logged."""
        with self._lock:
            monitors = list(self._due.keys())
        for m in monitors:
            _flush_quietly(m)

    def _run(self) -> None:
        while True:
            wait = self._flush_due()  # holds no monitor while it waits
            self._wake.wait(max(wait, 0.05))
            self._wake.clear()

    def _flush_due(self) -> float:
        """Flush the monitors whose window is over; seconds until the next one is."""
        now = time.monotonic()
        due: list[Monitor] = []
        wait = 3600.0
        with self._lock:
            for m, (every, at) in list(self._due.items()):
                if every <= 0:
                    continue
                if at <= now:
                    due.append(m)
                    at = now + every
                    self._due[m] = (every, at)
                wait = min(wait, at - now)
        for m in due:
            _flush_quietly(m)
        return wait


def _flush_quietly(monitor: Monitor) -> None:
    try:
        monitor.flush()
    except Exception as exc:  # a background flush must not die, nor kill the process
        log.warning("telemetry flush of %s failed: %s", monitor.model,
                    getattr(exc, "message", exc))


FLUSHER = Flusher()

__all__ = ["FLUSHER", "UNSAVED_MAX", "Flusher", "Monitor", "telemetry_for"]
