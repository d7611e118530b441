"""Run ``hybridml-edge`` under a hard memory limit and report its peak (docs/device.md §3).

The limit is a cgroup v2 ``memory.max`` (swap off) where this process can make a cgroup with
the memory controller, otherwise ``RLIMIT_DATA`` set in the child before it starts.

Why ``RLIMIT_DATA`` and not ``RLIMIT_AS``: the address space counts what is reserved, not what
is used. A bare ``import numpy, onnxruntime`` takes 192 MB of it for 47 MB resident; glibc
reserves 64 MB per thread arena, every thread its 8 MB stack, and the memory-mapped table its
whole file: the edge scoring 300,000 rows peaked at 681 MB of address space for 112 MB
resident. ``RLIMIT_DATA`` (Linux >= 4.7) counts the private writable mappings — heap, anonymous
mmaps, stacks — which hold all of the process's anonymous resident memory, so the child can
never have more than the limit of it; a refused allocation is a ``MemoryError`` (or an
onnxruntime allocation failure), and the child exits non-zero. File-backed pages (libraries,
the table) are not in it: :func:`run_limited` also reads the child's whole peak RSS
(``VmHWM``, as the child reports it at exit) for the test to compare with the limit.
"""

from __future__ import annotations

import contextlib
import os
import resource
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

_CHILD = """
import sys
from hybridml.edge.cli import main
code = main(sys.argv[1:])
with open('/proc/self/status') as fh:
    hwm = next(line.split()[1] for line in fh if line.startswith('VmHWM:'))
print('VmHWM_KB=' + hwm, file=sys.stderr)
sys.exit(code)
"""


@dataclass(frozen=True)
class LimitedRun:
    """What the child did under the limit."""

    returncode: int
    peak_mb: float | None  # the child's VmHWM at exit; None when it died before reporting
    enforced: str  # how the limit was enforced, for the test's output
    stderr: str


def _cgroup(limit_mb: int) -> Path | None:
    """A fresh cgroup v2 with ``memory.max`` set, or None where none can be made here."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
        own = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    path = next((line[3:] for line in own if line.startswith("0::")), None)
    for line in mounts:
        fields = line.split()
        if len(fields) < 3 or fields[2] != "cgroup2" or path is None:
            continue
        base = Path(fields[1]) / path.lstrip("/")
        try:
            if "memory" not in (base / "cgroup.subtree_control").read_text().split():
                continue
            group = base / f"hybridml-test-{os.getpid()}"
            group.mkdir(exist_ok=True)
            (group / "memory.max").write_text(str(limit_mb << 20))
            with contextlib.suppress(OSError):
                (group / "memory.swap.max").write_text("0")
            return group
        except OSError:
            continue
    return None


def run_limited(args: list[str], limit_mb: int, *, stdout: Path, timeout: float = 300
                ) -> LimitedRun:
    """``hybridml-edge ARGS`` (its ``main``, in a fresh interpreter) under ``limit_mb``,
    its output written to ``stdout``."""
    group = _cgroup(limit_mb)
    if group is not None:
        procs = group / "cgroup.procs"
        enforced = f"cgroup v2 memory.max = {limit_mb} MB ({group})"

        def limit() -> None:
            procs.write_text("0")
    else:
        enforced = (f"RLIMIT_DATA = {limit_mb} MB (no cgroup v2 with the memory controller "
                    "here; see tests/integration/memlimit.py for why not RLIMIT_AS)")

        def limit() -> None:
            resource.setrlimit(resource.RLIMIT_DATA, (limit_mb << 20, limit_mb << 20))
    try:
        with open(stdout, "wb") as out:
            proc = subprocess.run([sys.executable, "-c", _CHILD, *args], stdout=out,
                                  stderr=subprocess.PIPE, preexec_fn=limit, timeout=timeout,
                                  check=False)
    finally:
        if group is not None:
            with contextlib.suppress(OSError):
                group.rmdir()
    err = proc.stderr.decode(errors="replace")
    peak = next((int(line.split("=")[1]) / 1024 for line in err.splitlines()
                 if line.startswith("VmHWM_KB=")), None)
    return LimitedRun(proc.returncode, peak, enforced, err)
