"""Evidence for the triggers, from the registry and the telemetry store.

This is the one module of the training loop that knows the telemetry store
(:class:`hybridml.cloud.telemetry.TelemetryStore`): everything else takes the four queries
of :class:`Telemetry`, so the policy, the gate and the training code are tested without it,
and another store (the fleet-scale PostgreSQL one) plugs in here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from hybridml.shared.clock import from_iso

from . import metrics
from .labelled import Labelled
from .lineage import base_of
from .policy import DRIFT_WINDOWS, Evidence, Policy
from .registry import Registry

log = logging.getLogger("hybridml.cloud.evidence")


class Telemetry(Protocol):
    """What the training loop asks of the telemetry store (``since``: POSIX seconds)."""

    def performance(self, model: str, *, version: int | None = None,
                    window_s: float = 86400) -> list[dict[str, Any]]:
        """Realised (and estimated) metric windows: ``{"version", "start", "end",
        "labels", "metric", "value", "estimate"}``."""

    def labelled_rows(self, model: str, since: Any = None
                      ) -> tuple[list[dict[str, Any]], list[Any]]:
        """Labelled rows with features that arrived after ``since``, and their labels."""

    def labelled_count(self, model: str, since: Any = None) -> int:
        """How many labelled rows arrived after ``since``."""

    def device_drift(self, model: str, version: int, window_s: float, windows: int = 2
                     ) -> list[dict[str, Any]]:
        """Per device, the last ``windows`` windows: ``{"device", "windows": [{"rows",
        "dataset_drift", ...}]}``."""


def open_telemetry(registry: Registry, clock: Callable[[], float] = time.time) -> Telemetry:
    """The telemetry store of ``registry`` (``<registry>/telemetry.db``), on ``clock``."""
    from .telemetry import TelemetryStore

    return TelemetryStore(registry, clock=clock)


def gather(registry: Registry, telemetry: Telemetry, name: str, policy: Policy,
           now: float) -> Evidence:
    """Everything :func:`hybridml.cloud.policy.evaluate` needs about ``name`` at ``now``;
    the store is only asked what an enabled trigger looks at."""
    versions = registry.versions(name)
    latest = versions[-1]
    # The data trigger compares with the line's data: a fine-tune's own rows are few.
    base = base_of(versions, latest.version)
    active = registry.aliases(name).get("stable")
    trained = epoch(latest.created)
    on = set(policy.enabled)
    fired = registry.decisions(name, limit=1, fired_only=True)
    return Evidence(
        now=now, active=active, latest=latest.version, last_trained=trained,
        training_rows=int(registry.manifest(name, base).get("training", {}).get("rows", 0)),
        labelled_since=telemetry.labelled_count(name, since=trained) if "data" in on else 0,
        metric=metrics.PRIMARY[latest.task],
        performance=telemetry.performance(name, version=active)
        if "performance" in on and active else (),
        device_drift=telemetry.device_drift(name, active, policy.drift_window_s, DRIFT_WINDOWS)
        if "drift" in on and active else (),
        last_fired=epoch(fired[0]["time"]) if fired else None)


def labelled_since(telemetry: Telemetry, name: str, since: float | None) -> Labelled:
    """Labelled rows of ``name`` that arrived after ``since`` (all with None)."""
    rows, labels = telemetry.labelled_rows(name, since=since)
    return Labelled.of(rows, labels)


def epoch(iso: str) -> float:
    """POSIX seconds of a registry timestamp (``2026-11-27T19:01:07Z``)."""
    return from_iso(iso)


__all__ = ["Telemetry", "epoch", "gather", "labelled_since", "open_telemetry"]
