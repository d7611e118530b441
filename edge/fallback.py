"""When the edge asks the cloud, and how it avoids waiting on a dead one.

The policy (:class:`FallbackPolicy`) sends a row to the cloud when

* there is no local model, or local inference failed;
* a numeric value lies outside the training range (``on_out_of_range``);
* a categorical value was never seen in training (``on_unseen``);
* a classifier's top probability is below ``min_confidence``.

The cloud's answer is used when it arrives within ``timeout_ms``; otherwise the local answer is
returned marked ``degraded``. A :class:`CircuitBreaker` stops calling a cloud that failed
``failures`` times in a row for ``cooldown_s`` seconds, so offline latency stays local.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from hybridml.shared.errors import ConfigError


@dataclass(frozen=True)
class FallbackPolicy:
    """Settings of the fallback policy; load overrides with :meth:`from_env`."""

    enabled: bool = True
    on_out_of_range: bool = True
    on_unseen: bool = True
    min_confidence: float = 0.0
    timeout_ms: float = 250.0
    failures: int = 1
    cooldown_s: float = 30.0

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

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None,
                 prefix: str = "HYBRIDML_FALLBACK_") -> FallbackPolicy:
        """Read ``HYBRIDML_FALLBACK_<FIELD>`` variables (e.g. ``..._TIMEOUT_MS=500``)."""
        env = os.environ if env is None else env
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(prefix + f.name.upper())
            if raw is None:
                continue
            try:
                if f.type in ("bool", bool):
                    kwargs[f.name] = raw.strip().lower() in ("1", "true", "yes", "on")
                elif f.type in ("int", int):
                    kwargs[f.name] = int(raw)
                else:
                    kwargs[f.name] = float(raw)
            except ValueError:
                raise ConfigError(f"{prefix + f.name.upper()}={raw!r} is not a valid "
                                  f"{f.type}", field=f.name) from None
        return cls(**kwargs)


class CircuitBreaker:
    """Closed -> open after N consecutive failures -> half-open after a cooldown -> closed.

    Thread-safe; ``allow()`` lets exactly one trial call through when half-open.
    """

    def __init__(self, failures: int = 1, cooldown_s: float = 30.0) -> None:
        self.threshold = failures
        self.cooldown_s = cooldown_s
        self._failures = 0
        self._opened_at: float | None = None
        self._trial = False
        self._lock = threading.Lock()

    @property
    def state(self) -> str:
        """``closed``, ``open`` or ``half_open``."""
        with self._lock:
            return self._state(time.monotonic())

    def _state(self, now: float) -> str:
        if self._opened_at is None:
            return "closed"
        return "half_open" if now - self._opened_at >= self.cooldown_s else "open"

    def allow(self) -> bool:
        """True if a call may be made now."""
        with self._lock:
            state = self._state(time.monotonic())
            if state == "closed":
                return True
            if state == "half_open" and not self._trial:
                self._trial = True
                return True
            return False

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
                self._opened_at = time.monotonic()
            self._trial = False
