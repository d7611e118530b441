"""pyproject.toml's version ranges are the ones the arm64 target checks.

The floors of the edge's dependencies are :data:`tests.arm64.matrix.LOWEST` (the set the
emulated boards run), and each version known to fail on a Pi is excluded by the range: the
arm64 test shows it failing as stated, on the board that shows it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from tests.arm64 import rootfs
from tests.arm64.matrix import KNOWN_BAD, LOWEST

if sys.version_info >= (3, 11):
    import tomllib
else:  # pytest needs tomli below 3.11
    import tomli as tomllib

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def edge_requirements() -> dict[str, Requirement]:
    """The base install's requirements (the edge's), by distribution name."""
    doc = tomllib.loads(PYPROJECT.read_text())
    reqs = (Requirement(r) for r in doc["project"]["dependencies"])
    return {r.name: r for r in reqs}


def test_the_lowest_set_is_exactly_the_floor_of_every_edge_dependency() -> None:
    reqs = edge_requirements()
    assert set(reqs) == set(LOWEST) == set(rootfs.EDGE_DISTRIBUTIONS)
    for dist, lowest in LOWEST.items():
        floors = [Version(s.version) for s in reqs[dist].specifier if s.operator == ">="]
        assert len(floors) == 1, f"{dist} needs one >= floor"
        low = Version(lowest)
        assert low in reqs[dist].specifier, f"{dist} {lowest} is outside {reqs[dist]}"
        assert (low.major, low.minor) == (floors[0].major, floors[0].minor), \
            f"the arm64 target tests {dist} {lowest}; pyproject's floor is {floors[0]}"


def test_every_known_bad_version_is_outside_the_range() -> None:
    reqs = edge_requirements()
    for pins, _cpu, _fails in KNOWN_BAD:
        bad = Requirement(pins[0])
        (spec,) = bad.specifier
        assert Version(spec.version) not in reqs[bad.name].specifier, pins[0]


@pytest.mark.arm64
@pytest.mark.parametrize("pins,cpu,fails", KNOWN_BAD, ids=[p[0][0] for p in KNOWN_BAD])
def test_a_known_bad_version_fails_on_the_board_as_stated(pins: tuple[str, ...], cpu: str,
                                                           fails: str) -> None:
    cache = rootfs.cache_dir()
    target = rootfs.site(cache, rootfs.VersionSet(
        "bad-" + "-".join(p.replace("==", "") for p in pins),
        tuple((d, v) for d, _, v in (p.partition("==") for p in pins))))
    root = rootfs.cpu_root(cache, rootfs.CPUS[cpu])
    dev = rootfs.Device(rootfs.CPUS[cpu], root, target, target)
    done = subprocess.run(dev.command("-c", "import numpy, onnxruntime"), env=dev.env(),
                          capture_output=True, text=True, timeout=120)
    print(done.returncode, done.stderr[-500:])
    if fails == "SIGILL":
        assert done.returncode != 0 and "Illegal instruction" in done.stderr
    else:
        assert done.returncode == 1 and fails in done.stderr
    assert shutil.which(dev.command()[0])
