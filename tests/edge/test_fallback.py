"""edge.fallback and edge.agent timing: policy settings, circuit breaker, backoff."""

from __future__ import annotations

import random

import pytest

from hybridml.edge.agent import AgentSettings
from hybridml.edge.fallback import CircuitBreaker, Fallback, FallbackPolicy
from hybridml.shared.errors import ConfigError


def test_policy_reads_prefixed_environment_variables() -> None:
    p = FallbackPolicy.from_env({"HYBRIDML_FALLBACK_TIMEOUT_MS": "500",
                                 "HYBRIDML_FALLBACK_ON_UNSEEN": "false",
                                 "HYBRIDML_FALLBACK_MIN_CONFIDENCE": "0.6"})
    assert p.timeout_ms == 500 and p.on_unseen is False and p.min_confidence == 0.6
    assert FallbackPolicy.from_env({}) == FallbackPolicy()


@pytest.mark.parametrize(
    ("env", "field"),
    [({"HYBRIDML_FALLBACK_TIMEOUT_MS": "soon"}, "timeout_ms"),
     ({"HYBRIDML_FALLBACK_MIN_CONFIDENCE": "2"}, "min_confidence"),
     ({"HYBRIDML_FALLBACK_FAILURES": "0"}, "failures")],
)
def test_bad_policy_settings_name_the_field(env: dict[str, str], field: str) -> None:
    with pytest.raises(ConfigError) as err:
        FallbackPolicy.from_env(env)
    assert err.value.details["field"] == field


class FakeClock:
    """Monotonic seconds that move only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_threshold_and_half_opens_after_cooldown() -> None:
    clock = FakeClock()
    b = CircuitBreaker(failures=2, cooldown_s=30, clock=clock)
    assert b.allow()
    b.failure()
    assert b.state == "closed" and b.allow()
    b.failure()
    assert b.state == "open" and not b.allow()
    clock.now += 29.9
    assert b.state == "open" and not b.allow()
    clock.now += 0.1
    assert b.state == "half_open"
    assert b.allow() and not b.allow()  # exactly one trial call
    b.failure()
    assert b.state == "open"
    clock.now += 30
    assert b.allow()
    b.success()
    assert b.state == "closed" and b.allow()


def test_policy_change_keeps_the_breaker_state_under_the_new_thresholds() -> None:
    clock = FakeClock()
    fb = Fallback("m", FallbackPolicy(failures=3, cooldown_s=60), clock=clock)
    fb.breaker.failure()
    fb.breaker.failure()
    assert fb.breaker.state == "closed"
    fb.policy = FallbackPolicy(failures=2, cooldown_s=5)
    fb.breaker.failure()
    assert fb.breaker.state == "open"
    clock.now += 5
    assert fb.breaker.state == "half_open"


def test_fallback_without_a_cloud_or_when_disabled_asks_nobody() -> None:
    assert not Fallback("m", FallbackPolicy()).can_ask
    assert Fallback("m", FallbackPolicy()).ask_rows([{"a": 1}]) == [None]


@pytest.mark.parametrize("max_batch", [0, -1])
def test_max_batch_must_be_positive(max_batch: int) -> None:
    with pytest.raises(ConfigError) as err:
        FallbackPolicy(max_batch=max_batch)
    assert err.value.details["field"] == "max_batch"


def test_agent_backs_off_exponentially_with_jitter_and_a_cap() -> None:
    s = AgentSettings(interval=300, jitter=0.1, min_backoff=1, max_backoff=60)
    rng = random.Random(0)
    delays = [s.next_delay(f, rng) for f in range(1, 10)]
    assert 0.9 <= delays[0] <= 1.1 and 1.8 <= delays[1] <= 2.2 and 3.6 <= delays[2] <= 4.4
    assert all(d <= 66 for d in delays) and delays[-1] >= 54
    normal = [s.next_delay(0, rng) for _ in range(50)]
    assert all(270 <= d <= 330 for d in normal) and len(set(normal)) > 1


def test_agent_settings_are_validated() -> None:
    with pytest.raises(ConfigError, match="interval"):
        AgentSettings(interval=0)
    with pytest.raises(ConfigError, match="jitter"):
        AgentSettings(jitter=1.5)
