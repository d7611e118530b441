"""Helpers of the rollout tests: a registry with blessed and unblessed candidates, a clock."""

from __future__ import annotations

from pathlib import Path

from hybridml.cloud.registry import Registry

BASE = 1_800_000_000.0


class Clock:
    """A clock the test moves by hand (POSIX seconds)."""

    def __init__(self, now: float = BASE) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass."""
        self.now += seconds


def with_candidates(root: Path) -> Registry:
    """The iris registry at ``root`` (v1 stable, v2 not blessed) plus v3 and v4, copies of v2
    whose manifests carry a blessed gate block."""
    reg = Registry(root)
    manifest, metadata = reg.manifest("iris", 2), reg.metadata("iris", 2)
    for _ in range(2):
        blessed = {**manifest, "gate": {"blessed": True, "against": 1, "reason": "test"}}
        reg.create_version("iris", blessed, metadata, parent=1)
    return reg
