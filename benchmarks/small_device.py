"""Item 8: the small-device profile — latency and memory pinned to one core, one thread,
and peak RSS per model family against the 256 MB device budget (:mod:`benchmarks.budget`).

Our stand-in for a Raspberry Pi: the latency suite (single row and batch) and the memory suite
run again in a child process started with ``taskset -c 0`` (its probes inherit the affinity),
with onnxruntime on one intra-op thread and ``OMP_NUM_THREADS=1``. Without ``taskset`` the
child runs unpinned and the result says so.

On a real Pi, see :data:`PI_HOWTO` (it is also printed in the report).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .common import PY, ROOT, child_env, which

PI_HOWTO = """\
Use a 64-bit OS (Raspberry Pi OS 64-bit or Ubuntu arm64): onnxruntime ships no 32-bit ARM
wheels. If `import onnxruntime` dies with "Illegal instruction" (seen with 1.21.0's aarch64
wheel on a Pi 4), pin the previous release, e.g. `pip install 'onnxruntime==1.20.*'`.

```sh
sudo apt-get install -y python3-venv wrk   # wrk is optional
git clone <repo> hybridml && cd hybridml
make bench-quick ARGS="--only latency,memory,coldstart,small_device,fallback"
```

Training the workspace models takes a few minutes on a Pi 4; the results land in
`benchmarks/results/` as on any machine. The cloud-side suites (serving, fleet) measure the
cloud: run them on the cloud machine, with the Pi as one of the devices
(`hybridml-edge sync --cloud URL ...`) if you want the fleet to include real hardware. On the
Pi itself, `small_device` is redundant with `latency`/`memory` (it pins to one core)."""


def run(settings: Any, workdir: Path) -> dict[str, Any]:
    """Run the pinned child with ``settings`` (a :class:`benchmarks.run.Settings`)."""
    pinned = bool(which("taskset"))
    # The child gets the settings as JSON rather than importing benchmarks.run for them:
    # run imports this module, and the report imports it for PI_HOWTO.
    cmd = [*(["taskset", "-c", "0"] if pinned else []), PY, "-m", "benchmarks.small_device",
           json.dumps({"settings": asdict(settings), "workdir": str(workdir)})]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False,
                          env=child_env(OMP_NUM_THREADS="1"), timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"small-device child failed: {proc.stderr[-3000:]}")
    doc = dict(json.loads(proc.stdout.strip().splitlines()[-1]))
    doc["pinned"] = "taskset -c 0" if pinned else "no taskset: unpinned"
    return doc


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    import os

    from . import budget, latency, memory
    from .workspace import Workspace, model_specs

    s = spec["settings"]
    mode = s["mode"]
    ws = Workspace(Path(spec["workdir"]), model_specs(mode),
                   orders_rows=1500 if mode == "tiny" else 4000)
    models = ws.models()
    lat = latency.run(models, calls=max(s["calls"] // 2, 30), sklearn_calls=s["sklearn_calls"],
                      batch_repeats=s["batch_repeats"], threads=1)
    orders = [m for m in models if m.spec.dataset == "orders"] or models[:1]
    mem = memory.run(orders, ws.root / "scratch", repeats=s["mem_repeats"], table_rows=0,
                     table_model=None)
    fits = budget.run(models, ws.root / "scratch", repeats=s["mem_repeats"],
                      rows=min(s["table_rows"], 300_000))
    affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {"cores": affinity, "latency": lat, "memory": mem, "budget": fits}


if __name__ == "__main__":
    print(json.dumps(_child(json.loads(sys.argv[1]))))
