"""Cloud fallback under faults: unreachable, slow, trickling, dropping or failing with 500s.

Rows that need the cloud (here: out of the training range) still get a local answer marked
``degraded`` when the cloud fails, the circuit breaker then keeps later calls local, and no
prediction call outlives its timeout. Wall times are measured with generous bounds: they show
the call is bounded by the timeout, not by the cloud (which here holds answers for 3-20 s).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hybridml.edge import EdgeRuntime, FallbackPolicy
from hybridml.edge.runtime import Prediction
from hybridml.shared.errors import CloudTimeoutError
from tests.conftest import CloudServer
from tests.integration.proxy import Fault, FaultProxy

PREDICT = "/v1/models/late/predict"
ROW = {"restaurant": "r001", "hour": 12, "distance_km": 3.0, "rain": "no", "items": 2}
ODD = dict(ROW, distance_km=500.0)  # out of range: the policy asks the cloud
TIMEOUT_MS = 300.0
BOUND_S = TIMEOUT_MS / 1000 + 1.5  # generous: the timeout plus local work on a busy machine


@pytest.fixture(scope="module")
def synced(cloud: CloudServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store with ``late`` v1 synced from the shared cloud."""
    store = tmp_path_factory.mktemp("fallback") / "s"
    EdgeRuntime(cloud.trust(store), "late", cloud.url).sync()
    return store


@pytest.fixture
def proxy(cloud: CloudServer) -> Iterator[FaultProxy]:
    """A fault proxy in front of the shared cloud."""
    with FaultProxy(cloud.url) as p:
        yield p


def runtime(store: Path, url: str, cooldown_s: float = 60.0) -> EdgeRuntime:
    """A runtime with a short fallback timeout."""
    return EdgeRuntime(store, "late", url,
                       policy=FallbackPolicy(timeout_ms=TIMEOUT_MS, cooldown_s=cooldown_s))


def timed_predict(rt: EdgeRuntime, row: dict[str, object]) -> tuple[Prediction, float]:
    """(prediction, wall seconds)."""
    t0 = time.monotonic()
    pred = rt.predict([row])[0]
    return pred, time.monotonic() - t0


SLOW_FAULTS = {
    "unreachable": None,  # the proxy is stopped: connection refused
    "slow": Fault(path=PREDICT, delay_s=3.0),
    "trickling": Fault(path=PREDICT, drip_s=0.05),  # each byte in time, the answer in ~15 s
    "dropped": Fault(path=PREDICT, drop=True),
    "http 500": Fault(path=PREDICT, status=500),
    "http 503 after 2 s": Fault(path=PREDICT, status=503, delay_s=2.0),
}


@pytest.mark.parametrize("case", list(SLOW_FAULTS))
def test_failing_cloud_leaves_degraded_local_answers_within_the_timeout(
        synced: Path, proxy: FaultProxy, case: str) -> None:
    fault = SLOW_FAULTS[case]
    if fault is None:
        url = proxy.url
        proxy.stop()
    else:
        proxy.add(Fault(**{k: v for k, v in vars(fault).items() if k != "hits"}))
        url = proxy.url
    rt = runtime(synced, url)
    pred, wall = timed_predict(rt, ODD)
    assert pred.source == "edge" and pred.degraded and pred.reason == "out_of_range"
    assert pred.model_version == 1
    assert wall < BOUND_S, f"{case}: a prediction took {wall:.2f} s"
    assert rt.breaker.state == "open"
    # The breaker keeps the next calls local: no request reaches the cloud, no waiting.
    calls = len(proxy.requests_to(PREDICT))
    for _ in range(5):
        pred, wall = timed_predict(rt, ODD)
        assert pred.degraded and wall < BOUND_S
    assert len(proxy.requests_to(PREDICT)) == calls
    # Rows that need no cloud never wait for it.
    local, _ = timed_predict(rt, ROW)
    assert local.source == "edge" and not local.degraded


class StepClock:
    """The breaker's clock: real time plus what the test adds (no sleeping to let time pass)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset


def test_breaker_retries_after_cooldown_and_recovers_when_500s_stop(
        synced: Path, proxy: FaultProxy) -> None:
    proxy.add(Fault(path=PREDICT, status=500))
    clock = StepClock()
    rt = EdgeRuntime(synced, "late", proxy.url, clock=clock,
                     policy=FallbackPolicy(timeout_ms=TIMEOUT_MS, cooldown_s=30))
    assert rt.predict([ODD])[0].degraded
    assert rt.breaker.state == "open"
    clock.offset += 30
    assert rt.breaker.state == "half_open"
    assert rt.predict([ODD])[0].degraded  # the one trial call fails: open again
    assert rt.breaker.state == "open" and len(proxy.requests_to(PREDICT)) == 2
    proxy.clear()
    assert rt.predict([ODD])[0].degraded  # still open: nobody asked the cloud
    assert len(proxy.requests_to(PREDICT)) == 2
    clock.offset += 30
    pred = rt.predict([ODD])[0]
    assert pred.source == "cloud" and not pred.degraded and pred.reason == "out_of_range"
    assert rt.breaker.state == "closed"


def test_no_local_model_and_slow_cloud_raises_timeout_within_bound(
        proxy: FaultProxy, tmp_path: Path) -> None:
    proxy.add(Fault(path=PREDICT, drip_s=0.05))
    rt = runtime(tmp_path / "empty", proxy.url)
    t0 = time.monotonic()
    with pytest.raises(CloudTimeoutError, match="did not answer"):
        rt.predict([ROW])
    assert time.monotonic() - t0 < BOUND_S
    assert rt.breaker.state == "open"
