"""The edge's install preflight (hybridml/preflight.py): a machine pip cannot serve is told
why and what to do, before pip runs."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from hybridml import preflight
from tests.arm64 import rootfs
from tests.arm64.test_versions import edge_requirements

PREFLIGHT = Path(preflight.__file__).resolve()
AARCH64 = ("manylinux_2_17_aarch64", "manylinux2014_aarch64", "manylinux_2_28_aarch64")


@pytest.mark.parametrize("machine,bits,python,impl,says", [
    ("aarch64", 32, (3, 11), "CPython", "32-bit Python: onnxruntime publishes no 32-bit ARM"),
    ("armv7l", 32, (3, 11), "CPython", "Raspberry Pi OS (64-bit)"),
    ("i686", 32, (3, 11), "CPython", "64-bit wheels only"),
    ("aarch64", 64, (3, 9), "CPython", "needs Python >= 3.10"),
    ("aarch64", 64, (3, 11), "PyPy", "CPython only"),
    ("riscv64", 64, (3, 11), "CPython", "x86_64 and aarch64 only"),
])
def test_a_platform_without_wheels_is_refused_with_what_to_do(
        machine: str, bits: int, python: tuple[int, int], impl: str, says: str) -> None:
    problem = preflight.platform_problem(machine, bits, python, impl)
    assert problem is not None and says in problem


@pytest.mark.parametrize("machine", ["x86_64", "aarch64", "arm64", "AMD64"])
def test_a_64_bit_cpython_on_a_supported_cpu_passes(machine: str) -> None:
    assert preflight.platform_problem(machine, 64, (3, 11), "CPython") is None


def test_the_preflight_asks_for_pyprojects_ranges() -> None:
    reqs = edge_requirements()
    for text in preflight.BINARY_REQUIREMENTS:
        req = Requirement(text)
        assert req.specifier == reqs[req.name].specifier, \
            f"preflight.py says {text}; pyproject.toml {reqs[req.name]}"


@pytest.mark.arm64
def test_a_32_bit_raspberry_pi_os_python_is_told_to_install_the_64_bit_os() -> None:
    """A real armhf (32-bit Raspberry Pi OS userland) Python 3.11 under qemu-arm."""
    qemu_arm = shutil.which("qemu-arm-static")
    assert qemu_arm, "qemu-user-static ships qemu-arm-static"
    root = rootfs.debian_root(rootfs.cache_dir(), "armhf")
    done = subprocess.run([qemu_arm, "-L", str(root), str(root / "usr/bin/python3.11"),
                           str(PREFLIGHT)], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin"})
    print(done.stderr)
    assert done.returncode == 1
    assert "32-bit Python" in done.stderr and "Raspberry Pi OS (64-bit)" in done.stderr


@pytest.mark.arm64
def test_a_python_with_no_onnxruntime_wheel_is_refused_before_pip_builds() -> None:
    """Asks the real package index (the arm64 target needs it anyway)."""
    assert preflight.missing_wheels("3.11", AARCH64) == []
    missing = preflight.missing_wheels("3.99", AARCH64)
    assert missing is not None and any(m.startswith("onnxruntime") for m in missing)
