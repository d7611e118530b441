"""A simulated fleet: many real edge runtimes on one machine, on a clock the caller moves.

Each :class:`Device` is a real :class:`~hybridml.edge.runtime.EdgeRuntime` with its own store
and its own device token, talking to a real cloud over loopback HTTP: it syncs (and so gets
its rollout role from the manifest endpoint), predicts, sends feedback and pushes telemetry.
Only time is simulated: the devices' telemetry windows and feedback are dated by a
:class:`SimClock`, so a rollout's 24-hour dwell passes when the caller says so, not by sleeping.

Used by ``make demo-rollout`` (:mod:`hybridml.cloud.demo_rollout`) and the fleet tests.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hybridml.edge.runtime import EdgeRuntime
from hybridml.edge.telemetry import Telemetry, TelemetrySettings
from hybridml.edge.trust import TrustStore
from hybridml.shared.errors import HybridMLError
from hybridml.shared.rollout import RolloutBlock

from .signing import KeyRing
from .tokens import TokenStore

log = logging.getLogger("hybridml.cloud.fleetsim")

Labelled = list[tuple[dict[str, Any], Any]]  # (row, true label)


@dataclass
class SimClock:
    """POSIX seconds that move only when :meth:`advance` is called."""

    now: float

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        """Move the clock forward by ``seconds``; returns the new time."""
        self.now += seconds
        return self.now


@dataclass
class Device:
    """One simulated device: its token's name, its runtime, and what went wrong last."""

    name: str
    runtime: EdgeRuntime
    errors: list[str] = field(default_factory=list)

    @property
    def version(self) -> int | None:
        """The version it serves."""
        return self.runtime.version

    @property
    def role(self) -> str:
        """``stable`` outside a rollout, else the role its manifest gives it."""
        manifest = self.runtime.manifest
        block = None if manifest is None else RolloutBlock.of(manifest)
        return "stable" if block is None else block.role


class Fleet:
    """``size`` devices named ``<prefix>-000`` ... serving ``model`` from the cloud at ``url``.

    Each device gets a device token from the registry's token store and trusts its signing
    keys, as a provisioned device would. ``workers`` threads run the devices' steps.
    """

    def __init__(self, url: str, registry: Path, model: str, size: int, root: Path, *,
                 clock: SimClock, prefix: str = "dev", workers: int = 8, seed: int = 0) -> None:
        self.model, self.clock, self.workers = model, clock, workers
        self.rng = random.Random(seed)
        tokens = TokenStore(registry)
        keys = [k.public_path for k in KeyRing(registry).list()]
        self.devices: list[Device] = []
        for i in range(size):
            name = f"{prefix}-{i:03d}"
            _, secret = tokens.create("device", name)
            store = root / name
            trust = TrustStore(store)
            for key in keys:
                trust.add(key)
            telemetry = Telemetry(model, TelemetrySettings(window_s=0), clock=clock, seed=i)
            rt = EdgeRuntime(store, model, url, token=secret, allow_http=True,
                             telemetry=telemetry)
            self.devices.append(Device(name, rt))

    def __iter__(self) -> Iterator[Device]:
        return iter(self.devices)

    def __len__(self) -> int:
        return len(self.devices)

    def _each(self, step: Callable[[Device], None]) -> None:
        def run(d: Device) -> None:
            try:
                step(d)
            except HybridMLError as exc:
                d.errors.append(f"{exc.code}: {exc.message}")
                log.info("%s: %s", d.name, exc.message)
        with ThreadPoolExecutor(self.workers) as pool:
            list(pool.map(run, self.devices))

    def sync(self) -> Counter[int | None]:
        """Every device syncs once; returns how many serve each version."""
        self._each(lambda d: d.runtime.sync())
        return self.versions()

    def versions(self) -> Counter[int | None]:
        """How many devices serve each version."""
        return Counter(d.version for d in self.devices)

    def roles(self) -> Counter[str]:
        """How many devices have each role."""
        return Counter(d.role for d in self.devices)

    def serve(self, traffic: Callable[[int], Labelled], *, feedback: float = 1.0) -> None:
        """Each device answers its share of traffic (``traffic(device index)`` gives rows with
        their true labels), one request at a time, and sends the true label of ``feedback``
        of its answers.

        Devices serve one after another: they stand for separate machines, and answering
        side by side on this machine's cores would make their latencies (which a canary
        compares) measure each other, not their models. A device's requests are spread over
        its day, so its shadow worker has finished by the next one: each waits for it (a
        tight loop of calls, where shadowing does cost the caller, is measured by ``make
        bench``). Syncs and pushes, network-bound, run in parallel.
        """
        for i, d in enumerate(self.devices):
            rng = random.Random(i * 7919 + int(self.clock()))
            try:
                for row, label in traffic(i):
                    answer = d.runtime.predict([row])[0]
                    if rng.random() < feedback:
                        d.runtime.feedback(answer.prediction_id, label)
                    d.runtime.shadow.drain(30)
            except HybridMLError as exc:
                d.errors.append(f"{exc.code}: {exc.message}")

    def report(self) -> None:
        """Every device ends its telemetry window and pushes what it spooled."""
        self._each(lambda d: _push(d.runtime))

    def ever(self, version: int) -> list[str]:
        """Devices that have served ``version`` at some sync (active or previous pointer)."""
        out = []
        for d in self.devices:
            st = d.runtime.store
            held = {m.version for m in (st.active(self.model), st.previous(self.model)) if m}
            if version in held:
                out.append(d.name)
        return out

    def close(self) -> None:
        """Flush and close every device's telemetry."""
        for d in self.devices:
            d.runtime.close()


@dataclass(frozen=True)
class Day:
    """One simulated day of a rollout: what the fleet served and what the look decided."""

    day: int
    versions: dict[int | None, int]
    roles: dict[str, int]
    action: str | None
    state: str
    step: int | None
    reasons: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        """JSON-ready (version keys as text)."""
        return {"day": self.day, "versions": {str(k): v for k, v in self.versions.items()},
                "roles": dict(self.roles), "action": self.action, "state": self.state,
                "step": self.step, "reasons": list(self.reasons)}


Look = Callable[[float], tuple[str | None, str, int | None, Sequence[str]]]


def drive(fleet: Fleet, look: Look, traffic: Callable[[int], Labelled], *, days: int,
          day_s: float = 86400.0, feedback: float = 0.5) -> list[Day]:
    """Run the fleet day by day until the rollout ends or ``days`` pass.

    Each day: an hour in, every device syncs (taking its role for the day), serves its
    traffic with ``feedback`` of the labels, and reports; at the end of the day ``look(now)``
    — the controller's tick — returns ``(action, state, step, reasons)``. After the last day
    every device syncs once more, so it follows the rollout's end.
    """
    timeline = []
    for day in range(1, days + 1):
        fleet.clock.advance(3600)
        versions = fleet.sync()
        roles = fleet.roles()
        fleet.serve(traffic, feedback=feedback)
        fleet.report()
        fleet.clock.advance(day_s - 3600)
        action, state, step, reasons = look(fleet.clock())
        timeline.append(Day(day, dict(versions), dict(roles), action, state, step,
                            tuple(reasons)))
        log.info("day %d: %s -> %s (%s)", day, dict(versions), action, state)
        if state != "running":
            break
    fleet.clock.advance(3600)
    fleet.sync()
    return timeline


def _push(rt: EdgeRuntime) -> None:
    result = rt.push()
    if result.error:
        log.info("push stopped early: %s", result.error)


def shuffled(rows: Sequence[dict[str, Any]], target: str, seed: int = 5
             ) -> list[dict[str, Any]]:
    """``rows`` with their ``target`` values shuffled among them: the data of a model that
    learned nothing (the bad candidate of the rollout demo and tests)."""
    out = [dict(r) for r in rows]
    values = [r[target] for r in out]
    random.Random(seed).shuffle(values)
    for r, value in zip(out, values):
        r[target] = value
    return out


def labelled(rows: Sequence[dict[str, Any]], target: str) -> Labelled:
    """Rows with their target split off: ``[(features, label), ...]``."""
    return [({k: v for k, v in r.items() if k != target}, r[target]) for r in rows]


__all__ = ["Day", "Device", "Fleet", "Labelled", "Look", "SimClock", "drive", "labelled",
           "shuffled"]
