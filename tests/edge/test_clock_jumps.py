"""Clocks that lie (docs/device.md §6): the wall clock jumps by years, both ways, and nothing
breaks or loses data.

A Pi has no real-time clock: it boots at 1970 and jumps to the true time when NTP answers, or
back again after a reboot. Every test injects a wall clock that jumps (``Wall``) and, where a
mechanism has one, its own monotonic clock (``Mono``), and drives the real component: real
SQLite spools, a real cloud (the Flask app on loopback, :class:`tests.edgekit.ThreadCloud`)
for sync and push, the real runtime and agent.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hybridml.edge.agent import Agent, AgentSettings
from hybridml.edge.client import CloudClient
from hybridml.edge.fallback import CircuitBreaker
from hybridml.edge.feedback import UNSURE_SPAN, PredictionIds
from hybridml.edge.freshness import Seen, describe
from hybridml.edge.push import push
from hybridml.edge.runtime import EdgeRuntime
from hybridml.edge.spool import SPOOL_FILE, Spool, SpoolSettings
from hybridml.edge.store import LocalStore
from hybridml.edge.sync import SyncOptions, sync
from hybridml.edge.telemetry import Telemetry, TelemetrySettings
from hybridml.edge.timebase import PLAUSIBLE_FROM, RunningClock, plausible
from hybridml.shared.clock import from_iso
from tests.edgekit import ThreadCloud, iris_registry, trusting

YEAR = 365 * 86400.0
BOOT = 60.0  # a Pi's clock a minute after boot, before NTP: 1970-01-01T00:01:00Z
ROW = [5.1, 3.5, 1.4, 0.2]


class Wall:
    """A wall clock the test sets and jumps."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Mono(Wall):
    """A monotonic clock the test advances (never back)."""


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """iris (logreg), signed."""
    return iris_registry(tmp_path_factory.mktemp("clocks") / "reg")


@pytest.fixture(scope="module")
def cloud(registry: Path) -> Iterator[ThreadCloud]:
    server = ThreadCloud(registry)
    yield server
    server.close()


def device(cloud: ThreadCloud, root: Path) -> tuple[LocalStore, CloudClient]:
    store = trusting(LocalStore(root), cloud.registry)
    return store, CloudClient(cloud.url, token=cloud.token)


def spool_at(root: Path, wall: Wall, mono: Mono, boot: str = "boot-1", **limits: float
             ) -> Spool:
    return Spool.open(root, SpoolSettings(**limits),  # type: ignore[arg-type]
                      clock=wall, running=RunningClock(monotonic=mono, boot=lambda: boot,
                                                     since_boot=True))


def seq(record_id: str) -> int:
    return int(record_id.rsplit(":", 1)[1])


# --------------------------------------------------------------------------------- spool
def test_spool_ids_and_order_follow_the_sequence_whatever_the_wall_clock(tmp_path: Path
                                                                        ) -> None:
    wall, mono = Wall(time.time()), Mono(0.0)
    spool = spool_at(tmp_path, wall, mono)
    ids: list[str] = []
    for jump in (0.0, -56 * YEAR, +120 * YEAR, -3 * YEAR):  # true, 1970, 2090, 2087
        wall.now += jump
        mono.now += 1
        ids.append(spool.add("summary", {"n": len(ids)}, model="m", version=1))
    assert [seq(i) for i in ids] == sorted({seq(i) for i in ids})  # unique and growing
    assert [e.id for e in spool.queue()] == ids  # upload order is the sequence, not created


def test_a_spool_made_again_under_a_1970_clock_never_reuses_accepted_ids(tmp_path: Path
                                                                          ) -> None:
    wall, mono = Wall(time.time()), Mono(0.0)
    spool = spool_at(tmp_path, wall, mono)
    accepted = [spool.add("summary", {"n": i}) for i in range(3)]
    spool.remove([e.seq for e in spool.queue()])  # the cloud has them
    spool.close()
    (tmp_path / SPOOL_FILE).unlink()  # the documented way to start an empty spool
    wall.now = BOOT  # and the next boot is before NTP
    again = spool_at(tmp_path, wall, mono, boot="boot-2")
    assert seq(again.add("summary", {"n": 9})) > max(seq(i) for i in accepted)


def test_spool_ttl_counts_running_time_not_wall_time(tmp_path: Path) -> None:
    wall, mono = Wall(time.time()), Mono(1000.0)
    spool = spool_at(tmp_path, wall, mono, ttl_s=3600)
    old = spool.add("summary", {"n": 1})
    wall.now += 5 * YEAR  # NTP (or a bad RTC) jumps years ahead: nothing expires at once
    mono.now += 60
    assert spool.expire() == {}
    wall.now -= 10 * YEAR  # and years back: records still age on the running clock
    mono.now += 3000
    young = spool.add("feedback", {"n": 2})
    mono.now += 1000  # the summary has run 4060 s, the feedback 1000 s
    assert spool.expire() == {"summary": 1}
    assert spool.queue() == []  # made under a 2021 clock: it waits for a plausible one
    wall.now = time.time()
    assert [e.id for e in spool.queue()] == [young] and old != young
    spool.add("alert", {"n": 3})  # a write saves the running time (at most hourly)
    spool.close()
    # A reboot: the monotonic clock starts again at 0, the age goes on from what was saved.
    mono2 = Mono(0.0)
    after = spool_at(tmp_path, wall, mono2, boot="boot-2", ttl_s=3600)
    mono2.now += 2700  # 1000 + 2700 > 3600 s of running time for the feedback
    assert after.expire() == {"feedback": 1}


def test_records_made_before_ntp_wait_then_reach_a_real_cloud_redated(
        cloud: ThreadCloud, tmp_path: Path) -> None:
    store, client = device(cloud, tmp_path / "dev")
    sync(store, client, "iris", SyncOptions(clock=Wall(BOOT)))  # accepted at 1970 (module doc)
    wall, mono = Wall(BOOT), Mono(50.0)
    tel = Telemetry("iris", TelemetrySettings(window_s=0), clock=wall, monotonic=mono)
    rt = EdgeRuntime(store, "iris", telemetry=tel)
    for _ in range(20):
        rt.predict([ROW])
    mono.now += 600
    wall.now += 600  # the window is 1970-01-01 00:01 .. 00:11 on the device's clock
    spool = spool_at(store.root, wall, mono)
    spool.add_many(tel.flush())
    assert spool.queue() == []  # undatable yet: not offered to a cloud that refuses 1970
    true_now = time.time()
    wall.now = true_now  # NTP answers
    mono.now += 120
    record = spool.records([e.seq for e in spool.queue()])[0]
    window = record.to_json()["body"]["window"]
    start, end = from_iso(window["start"]), from_iso(window["end"])
    assert plausible(record.created) and abs(record.created - (true_now - 120)) < 2
    assert end - start == pytest.approx(600, abs=1) and abs(end - (true_now - 120)) < 2
    result = push(spool, client, model="iris")
    assert (result.accepted, result.quarantined, result.pending) == (1, 0, 0)
    rt.close()


def test_a_telemetry_window_across_a_jump_keeps_its_monotonic_length(
        cloud: ThreadCloud, tmp_path: Path) -> None:
    store, client = device(cloud, tmp_path / "dev")
    sync(store, client, "iris")
    wall, mono = Wall(BOOT), Mono(10.0)
    tel = Telemetry("iris", TelemetrySettings(window_s=0), clock=wall, monotonic=mono)
    rt = EdgeRuntime(store, "iris", telemetry=tel)
    for jump in (56 * YEAR, -56 * YEAR):  # NTP sets the clock; later it falls back to 1970
        rt.predict([ROW])
        mono.now += 300
        wall.now += 300 + jump
        (kind, body, _, _), = tel.flush()
        start, end = (from_iso(body["window"][k]) for k in ("start", "end"))
        assert (kind, end, end - start) == ("summary", wall.now, 300)
    rt.close()


# ----------------------------------------------------------------------- sync and freshness
def test_sync_and_freshness_survive_jumps_both_ways(cloud: ThreadCloud, tmp_path: Path
                                                   ) -> None:
    store, client = device(cloud, tmp_path / "dev")
    wall = Wall(BOOT)
    opts = SyncOptions(clock=wall)
    first = sync(store, client, "iris", opts)  # a manifest "from the future": accepted
    assert first.changed and store.active("iris") is not None

    def fresh() -> dict[str, object]:
        seen = Seen.load(store.sync_state("iris"), store.active("iris"))
        return describe(seen, wall.now)

    assert fresh()["state"] == "fresh" and fresh()["clock"] == "behind"
    wall.now = time.time()  # NTP: +56 years; the manifest is not 56 years stale
    assert not sync(store, client, "iris", opts).changed
    assert fresh()["state"] == "fresh" and "clock" not in fresh()
    wall.now = BOOT  # a reboot without NTP: back to 1970
    assert not sync(store, client, "iris", opts).changed
    assert fresh()["state"] == "fresh" and fresh()["clock"] == "behind"
    wall.now = time.time() + 3 * YEAR  # a clock years ahead: stale, the model keeps serving
    assert not sync(store, client, "iris", opts).changed
    assert fresh()["state"] == "stale"
    assert EdgeRuntime(store, "iris", telemetry=False).predict([ROW])[0].prediction is not None


# ------------------------------------------------------------------ agent, breaker, ids
def test_agent_delays_do_not_depend_on_the_wall_clock(cloud: ThreadCloud, tmp_path: Path
                                                      ) -> None:
    settings = AgentSettings(interval=300, min_backoff=1, max_backoff=600)

    def delays(name: str, jumps: list[float]) -> list[float]:
        store, client = device(cloud, tmp_path / f"{name}-{len(jumps)}-{jumps[:1]}")
        wall = Wall(time.time())
        agent = Agent(store, client, name, settings, seed=7, options=SyncOptions(clock=wall))
        out = []
        for jump in jumps:
            wall.now += jump
            out.append(agent.step())
        return out

    jumps = [0.0, -56 * YEAR, 56 * YEAR, 30 * YEAR, -30 * YEAR]
    steady = [0.0] * len(jumps)
    assert delays("iris", jumps) == delays("iris", steady)  # the interval
    backoff = delays("nope", jumps)  # the cloud has no such model: every step fails
    assert backoff == delays("nope", steady)
    assert backoff[0] < backoff[-1] <= 600 * 1.1


def test_the_breaker_cools_down_on_its_monotonic_clock() -> None:
    assert CircuitBreaker().clock is time.monotonic  # the default, so no wall-clock jump
    mono = Mono(0.0)
    breaker = CircuitBreaker(failures=1, cooldown_s=30, clock=mono)
    breaker.failure()
    assert breaker.state == "open"
    mono.now += 29
    assert breaker.state == "open"
    mono.now += 1
    assert breaker.state == "half_open"


def test_prediction_ids_of_runs_started_in_1970_do_not_meet() -> None:
    runs = [PredictionIds("abc", "iris", clock=Wall(BOOT + i)) for i in range(3)]
    firsts = [int(r.new(1, 1).rsplit(":", 1)[1]) for r in runs]
    assert len(set(firsts)) == 3
    low = int(PLAUSIBLE_FROM) * 1_000_000
    assert all(low <= f < low + UNSURE_SPAN for f in firsts)
    now = time.time()
    ids = PredictionIds("abc", "iris", clock=Wall(now))
    assert int(ids.new(1, 1).rsplit(":", 1)[1]) == int(now * 1_000_000)
