"""Can this machine run the hybridml edge? Asked before ``pip install`` (standard library only).

``scripts/install-edge.sh`` runs this file with the Python it will install into, before pip:
on a machine pip cannot serve, the user reads why and what to do instead of pip's
"Could not find a version that satisfies the requirement onnxruntime" or a half-hour build of
numpy from source that fails at the end. ``hybridml-edge doctor`` asks the same questions
(:func:`platform_problem`) on an installed device.

Two questions:

1. **The platform** (:func:`platform_problem`): CPython >= 3.10, a 64-bit interpreter, on
   x86_64 or aarch64. A 32-bit userland on a 64-bit kernel (Raspberry Pi OS 32-bit on a Pi
   4, where ``uname -m`` says ``aarch64`` but Python is ``armhf``) is 32-bit here:
   onnxruntime publishes no 32-bit ARM wheels.
2. **The wheels** (:func:`missing_wheels`): pip is asked, without installing anything, whether
   the index has a binary wheel of onnxruntime and numpy for this interpreter (``pip download
   --only-binary=:all: --no-deps``). A Python newer than onnxruntime's releases has none.

Exit status: 0 fit, 1 not fit (the reasons on stderr), 2 the check itself could not run.
"""

from __future__ import annotations

import argparse
import platform
import struct
import subprocess
import sys
import tempfile
from collections.abc import Sequence

MIN_PYTHON = (3, 10)
#: ``platform.machine()`` values onnxruntime publishes wheels for, by their wheel name.
MACHINES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}
#: The edge's binary dependencies as pyproject.toml requires them (tests/arm64/test_versions.py
#: checks that these are pyproject's words).
BINARY_REQUIREMENTS = ("onnxruntime>=1.21.1", "numpy>=1.24")
ARM = ("arm", "aarch64", "arm64")
HOW_TO_64 = ("install a 64-bit OS: on a Raspberry Pi 3, 4, 5 or Zero 2 W, 'Raspberry Pi OS "
             "(64-bit)' from Raspberry Pi Imager (a Pi 1, 2 or Zero has no 64-bit CPU and "
             "cannot run the edge)")


def platform_problem(machine: str | None = None, bits: int | None = None,
                     python: tuple[int, int] | None = None,
                     implementation: str | None = None) -> str | None:
    """Why this interpreter cannot run the edge, or None (arguments: for tests)."""
    machine = (machine or platform.machine()).lower()
    bits = bits or struct.calcsize("P") * 8
    python = python or (sys.version_info[0], sys.version_info[1])
    implementation = implementation or platform.python_implementation()
    shown = f"Python {python[0]}.{python[1]} ({implementation}, {bits}-bit) on {machine}"
    if python < MIN_PYTHON:
        return (f"{shown}: hybridml needs Python >= {MIN_PYTHON[0]}.{MIN_PYTHON[1]}; "
                "Raspberry Pi OS bookworm's /usr/bin/python3 is 3.11")
    if implementation != "CPython":
        return f"{shown}: onnxruntime publishes wheels for CPython only"
    if bits != 64:
        if machine.startswith(ARM):
            return (f"{shown} is a 32-bit Python: onnxruntime publishes no 32-bit ARM wheels, "
                    f"so pip would fail or build from source for hours; {HOW_TO_64}")
        return f"{shown} is a 32-bit Python: onnxruntime publishes 64-bit wheels only"
    if machine not in MACHINES:
        return (f"{shown}: onnxruntime publishes wheels for x86_64 and aarch64 only; "
                "nothing else is supported")
    return None


def missing_wheels(python_version: str | None = None, platforms: Sequence[str] = (),
                   pip: Sequence[str] | None = None) -> list[str] | None:
    """The binary requirements the index has no wheel of for this interpreter (or for
    ``python_version`` on ``platforms``: for tests); None when pip could not be asked."""
    pip = list(pip or [sys.executable, "-m", "pip"])
    target: list[str] = []
    if python_version:
        target = [f"--python-version={python_version}", "--implementation=cp",
                  *(f"--platform={p}" for p in platforms)]
    missing = []
    with tempfile.TemporaryDirectory(prefix="hybridml-preflight-") as tmp:
        for req in BINARY_REQUIREMENTS:
            try:
                done = subprocess.run(
                    [*pip, "download", "--quiet", "--disable-pip-version-check", "--no-deps",
                     "--only-binary=:all:", "--dest", tmp, *target, req],
                    capture_output=True, text=True, timeout=600)
            except (OSError, subprocess.TimeoutExpired):
                return None
            if done.returncode != 0:
                if "No matching distribution" not in done.stderr and \
                        "Could not find a version" not in done.stderr:
                    return None  # the index is unreachable, or pip failed otherwise
                missing.append(req)
    return missing


def main(argv: Sequence[str] | None = None) -> int:
    """Check this interpreter; print the verdict; 0 fit, 1 not fit, 2 unknown."""
    p = argparse.ArgumentParser(description="Can this Python run the hybridml edge?")
    p.add_argument("--no-index-check", action="store_true",
                   help="check the platform only, not the wheels on the package index")
    args = p.parse_args(argv)
    problem = platform_problem()
    if problem is not None:
        print(f"hybridml: cannot install the edge here. {problem}.", file=sys.stderr)
        return 1
    if not args.no_index_check:
        missing = missing_wheels()
        if missing is None:
            print("hybridml: could not ask the package index for wheels (offline?); "
                  "pip will say what it finds", file=sys.stderr)
            return 2
        if missing:
            py = platform.python_version()
            print(f"hybridml: cannot install the edge here. The package index has no binary "
                  f"wheel of {', '.join(missing)} for Python {py} on {platform.machine()}; "
                  "pip would try to build it from source, which fails or takes hours on a "
                  "Pi. Use a Python onnxruntime publishes wheels for (3.10-3.13 at least; "
                  "Raspberry Pi OS bookworm's /usr/bin/python3 is 3.11).", file=sys.stderr)
            return 1
    print(f"hybridml: Python {platform.python_version()} on {platform.machine()} can run the "
          "edge")
    return 0


if __name__ == "__main__":
    sys.exit(main())
