"""When the edge asks the cloud, how, and how it avoids waiting on a dead one: one component.

The policy (:class:`FallbackPolicy`) sends a row to the cloud when

* there is no local model, or local inference failed;
* a numeric value lies outside the training range (``on_out_of_range``);
* a categorical value was never seen in training (``on_unseen``);
* a classifier's top probability is below ``min_confidence``.

:class:`Fallback` holds the policy, the :class:`CircuitBreaker` and the cloud client, and every
predict path goes through it: :meth:`Fallback.reasons` decides which rows go and why (the one
definition; the single-row fast path only skips rows it would flag), and :meth:`Fallback.ask`
sends them. It asks in chunks of at most ``max_batch`` rows (the cloud's batch limit; a 413
shrinks the chunks to what the cloud says it takes) under one deadline, ``timeout_ms``, for the
whole call. It sends the rows as the local model saw them (numbers after float32 rounding,
categories normalised) and asks for the device's own model version, so cloud and edge answer
the same input with the same model. An answer is read only up to a bound in proportion to the
rows asked, and checked (:class:`~hybridml.edge.answers.AnswerCheck`: one prediction per row,
the model's name, version, classes and probabilities) before any of it is used; one that does
not fit is refused. Rows without an answer keep their local answer, marked ``degraded``.

Only a cloud that cannot answer counts as a breaker failure: unreachable, timed out, 5xx
(503 included), an answer too large, or a malformed or forged one. A 4xx (rows the cloud
refuses, a batch too large, a bad token) means the cloud is up: it is recorded in
:attr:`Fallback.last_error` and the local answers stand. After ``failures`` consecutive
failures the breaker stops calling the cloud for ``cooldown_s`` seconds, then lets one trial
call through, so offline latency stays local.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from hybridml.shared.errors import (
    CloudTimeoutError,
    CloudUnavailableError,
    ConfigError,
    HybridMLError,
    RemoteError,
)
from hybridml.shared.manifest import Manifest
from hybridml.shared.schema import EncodedBatch, InputSchema
from hybridml.shared.settings import load_env

from .answers import AnswerCheck, CloudRow

if TYPE_CHECKING:  # requests loads only when a cloud is configured
    from .client import CloudClient

log = logging.getLogger("hybridml.edge.fallback")

# Reason codes, in priority order: the first that applies to a row is its reason.
NO_REASON, OUT_OF_RANGE, UNSEEN, LOW_CONFIDENCE, LOCAL_ERROR, NO_LOCAL_MODEL = range(6)
REASONS: tuple[str | None, ...] = (None, "out_of_range", "unseen_category", "low_confidence",
                                   "local_error", "no_local_model")
Clock = Callable[[], float]


@dataclass(frozen=True)
class FallbackPolicy:
    """Settings of the fallback policy; load overrides with :meth:`from_env`.

    ``max_batch`` is the most rows one cloud request carries (the cloud's
    ``HYBRIDML_MAX_BATCH``; a 413 from the cloud lowers it for the process).
    """

    enabled: bool = True
    on_out_of_range: bool = True
    on_unseen: bool = True
    min_confidence: float = 0.0
    timeout_ms: float = 250.0
    failures: int = 1
    cooldown_s: float = 30.0
    max_batch: int = 1000

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_confidence <= 1.0:
            raise ConfigError(f"min_confidence must be within 0..1, got {self.min_confidence}",
                              field="min_confidence")
        if self.timeout_ms <= 0:
            raise ConfigError(f"timeout_ms must be positive, got {self.timeout_ms}",
                              field="timeout_ms")
        if self.failures < 1:
            raise ConfigError(f"failures must be at least 1, got {self.failures}",
                              field="failures")
        if self.cooldown_s < 0:
            raise ConfigError(f"cooldown_s must be >= 0, got {self.cooldown_s}",
                              field="cooldown_s")
        if self.max_batch < 1:
            raise ConfigError(f"max_batch must be at least 1, got {self.max_batch}",
                              field="max_batch")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None,
                 prefix: str = "HYBRIDML_FALLBACK_") -> FallbackPolicy:
        """Read ``HYBRIDML_FALLBACK_<FIELD>`` variables (e.g. ``..._TIMEOUT_MS=500``), with
        the kit's one settings loader (:func:`hybridml.shared.settings.load_env`)."""
        return load_env(cls, prefix, env)


class CircuitBreaker:
    """Closed -> open after N consecutive failures -> half-open after a cooldown -> closed.

    Thread-safe; ``allow()`` lets exactly one trial call through when half-open. ``clock``
    (seconds, monotonic) is injectable so tests set the time instead of sleeping.
    """

    def __init__(self, failures: int = 1, cooldown_s: float = 30.0,
                 clock: Clock = time.monotonic) -> None:
        self.threshold = failures
        self.cooldown_s = cooldown_s
        self.clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._trial = False
        self._lock = threading.Lock()

    @property
    def state(self) -> str:
        """``closed``, ``open`` or ``half_open``."""
        with self._lock:
            return self._state(self.clock())

    def _state(self, now: float) -> str:
        if self._opened_at is None:
            return "closed"
        return "half_open" if now - self._opened_at >= self.cooldown_s else "open"

    def allow(self) -> bool:
        """True if a call may be made now."""
        with self._lock:
            state = self._state(self.clock())
            if state == "closed":
                return True
            if state == "half_open" and not self._trial:
                self._trial = True
                return True
            return False

    def allow_soon(self) -> bool:
        """True unless the breaker is open (a call would be refused now); claims nothing."""
        with self._lock:
            return self._state(self.clock()) != "open"

    def success(self) -> None:
        """Record a successful call: closes the breaker."""
        with self._lock:
            self._failures = 0
            self._opened_at = None
            self._trial = False

    def failure(self) -> None:
        """Record a failed call: opens the breaker at the threshold (or on a failed trial)."""
        with self._lock:
            self._failures += 1
            if self._trial or self._failures >= self.threshold:
                self._opened_at = self.clock()
            self._trial = False


class Fallback:
    """The fallback component: policy, breaker and client, shared by every predict path."""

    def __init__(self, name: str, policy: FallbackPolicy | None = None,
                 client: CloudClient | None = None, *, clock: Clock = time.monotonic) -> None:
        self.name = name
        self.client = client
        self.clock = clock
        self._policy = policy or FallbackPolicy.from_env()
        self.max_batch = self._policy.max_batch
        self.breaker = CircuitBreaker(self._policy.failures, self._policy.cooldown_s, clock)
        self.failures = 0  # failed cloud calls (the breaker's count resets on success)
        self.last_error: str | None = None
        self._any_version = AnswerCheck(name)  # no local model: the cloud's own classes
        self._check: tuple[Manifest, AnswerCheck] | None = None  # the last version asked for

    @property
    def policy(self) -> FallbackPolicy:
        """The policy; replacing it keeps the breaker's state under the new thresholds."""
        return self._policy

    @policy.setter
    def policy(self, value: FallbackPolicy) -> None:
        self._policy = value
        self.max_batch = value.max_batch
        self.breaker.threshold, self.breaker.cooldown_s = value.failures, value.cooldown_s

    @property
    def can_ask(self) -> bool:
        """True when the policy is on and a cloud is configured."""
        return self._policy.enabled and self.client is not None

    # --------------------------------------------------------------------------- decide
    def reasons(self, batch: EncodedBatch, probs: np.ndarray | None,
                local_failed: bool = False) -> np.ndarray:
        """Why each row goes to the cloud: uint8 reason codes (:data:`REASONS`), 0 for none.

        Local failure sends every row; otherwise the first of out of range, unseen category
        and low confidence that the policy enables and the row has.
        """
        n = len(batch)
        p = self._policy
        out = np.zeros(n, dtype=np.uint8)
        if local_failed:
            out[:] = LOCAL_ERROR
            return out
        low_conf = bool(p.min_confidence and probs is not None and probs.size)
        if not p.enabled or (batch.clean and not low_conf):
            return out
        if low_conf:
            assert probs is not None
            out[probs.max(axis=1) < p.min_confidence] = LOW_CONFIDENCE
        if p.on_unseen:
            out[batch.unseen] = UNSEEN
        if p.on_out_of_range:
            out[batch.out_of_range] = OUT_OF_RANGE
        return out

    # ------------------------------------------------------------------------------ ask
    def ask(self, manifest: Manifest, batch: EncodedBatch) -> list[CloudRow | None]:
        """The cloud's answers for the rows of ``batch``, encoded for the version
        ``manifest`` describes, from that same version (None where it gave none)."""
        if not self.can_ask or not self.breaker.allow_soon():
            return [None] * len(batch)  # offline: no request to build
        return self.ask_rows(payload_rows(manifest.schema, batch),
                             expect=self.check_for(manifest))

    def check_for(self, manifest: Manifest) -> AnswerCheck:
        """The rules the cloud's answers about ``manifest``'s version must pass (kept for
        the last version asked about)."""
        cached = self._check
        if cached is not None and cached[0] is manifest:
            return cached[1]
        check = AnswerCheck.of(manifest)
        self._check = (manifest, check)
        return check

    def ask_rows(self, rows: Sequence[Mapping[str, Any] | Sequence[Any]], *,
                 strict: bool = False, expect: AnswerCheck | None = None
                 ) -> list[CloudRow | None]:
        """The cloud's answers for ``rows`` (JSON-ready), in chunks, within one deadline.

        ``expect`` says which answers to accept, and pins the version asked for; without it
        (no local model) the cloud's default version answers, checked against itself. Rows
        without an answer are None; with ``strict`` (no local answer to fall back on) the
        first failure is raised instead: the cloud's own error, a refused answer
        (:class:`RemoteError`), a :class:`CloudUnavailableError` while the breaker is open,
        or a :class:`CloudTimeoutError` when the deadline passes between chunks.
        """
        out: list[CloudRow | None] = [None] * len(rows)
        if not self.can_ask or not rows:
            return out
        assert self.client is not None
        check = expect or self._any_version
        deadline = self.clock() + self._policy.timeout_ms / 1000.0
        start = 0
        size = self.max_batch
        while start < len(rows):
            left = deadline - self.clock()
            if left <= 0:
                if strict:
                    raise CloudTimeoutError(f"the cloud answered {start} of {len(rows)} rows "
                                            f"within {self._policy.timeout_ms:g} ms")
                break
            if not self.breaker.allow():
                if strict:
                    raise CloudUnavailableError(
                        f"no local model {self.name!r} and the cloud is marked down (circuit "
                        f"open after: {self.last_error}); run sync when the cloud is back")
                break
            chunk = rows[start:start + size]
            try:
                answer = self.client.predict(
                    self.name, chunk, left, version=check.version,
                    max_bytes=check.max_bytes(len(chunk), self.client.limits))
                got = check.rows(answer, len(chunk))
            except HybridMLError as exc:
                if exc.status >= 500 or isinstance(exc, RemoteError):
                    self._failed(exc)
                    if strict:
                        raise
                    break  # a cloud that cannot answer: no point asking the next chunk
                self.breaker.success()  # a 4xx: the cloud is up; it refused these rows
                self.last_error = f"{exc.code}: {exc.message}"
                if exc.status == 413 and size > 1:
                    size = self._smaller(exc, size)
                    continue  # the same rows again, in smaller chunks
                log.info("the cloud refused %d row(s): %s", len(chunk), exc.message)
                if strict:
                    raise
                start += len(chunk)
                continue
            self.breaker.success()
            out[start:start + len(chunk)] = got
            start += len(chunk)
        return out

    def _failed(self, exc: HybridMLError) -> None:
        self.breaker.failure()
        self.failures += 1
        self.last_error = exc.message
        log.info("cloud fallback failed: %s", exc.message)

    def _smaller(self, exc: HybridMLError, size: int) -> int:
        """The chunk size after a 413: the cloud's stated limit, else half."""
        limit = exc.details.get("max_batch")
        new = limit if isinstance(limit, int) and 0 < limit < size else max(1, size // 2)
        self.max_batch = min(self.max_batch, new)
        log.info("the cloud refused %d rows in one request (%s); sending chunks of %d", size,
                 exc.message, new)
        return new


def payload_rows(schema: InputSchema, batch: EncodedBatch) -> list[dict[str, Any]]:
    """The rows of ``batch`` as the cloud's ``/predict`` takes them: by column name, numbers as
    the float32 values the local model saw (null for missing), categories normalised."""
    names = schema.names
    num_at = [names.index(n) for n in schema.numeric_names]
    cat_at = [names.index(n) for n in schema.categorical_names]
    rows: list[dict[str, Any]] = []
    for nums, cats in zip(batch.num.tolist(), batch.cat.tolist()):
        values: list[Any] = [None] * len(names)
        for j, v in zip(num_at, nums):
            values[j] = None if v != v else v
        for j, c in zip(cat_at, cats):
            values[j] = c or None
        rows.append(dict(zip(names, values)))
    return rows
