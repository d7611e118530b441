"""Peak memory of one edge call, measured in a child process.

The pytest process has loaded models, servers and bombs of its own, so its high-water mark
hides what one call costs. :func:`run_device` runs the call in a fresh interpreter
(``python -m tests.integration.rss JOB``): the child imports the edge, warms up (a clean
sync or prediction through the real cloud, so lazy imports and pools are counted before),
resets its peak (``/proc/self/clear_refs``), reads ``VmHWM`` from ``/proc/self/status``,
makes the attacked call, reads ``VmHWM`` again, waits ``linger_s`` (a call abandoned by its
timeout may still be reading in a thread) and reads it a third time. It prints one JSON line:
what the call returned or raised, and the three readings.

The parent watches the child and kills it past ``cap_mb`` of RSS, so an unbounded read cannot
take the machine down; the result then says it was killed, with the last peak seen.

Jobs (JSON)::

    {"op": "sync", "store", "url", "name", "warmup_url"?, "linger_s"?}
    {"op": "predict", "store", "url", "name", "rows", "timeout_ms", "warmup_url"?,
     "warmup_rows"?, "linger_s"?}
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
ABANDONED_THREAD = "hybridml-cloud-call"  # hybridml.edge.client._within's worker threads


def vm_kb(key: str, pid: int | str = "self") -> int:
    """``VmHWM``, ``VmRSS``... of process ``pid`` in kB (0 if it is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def reset_peak() -> None:
    """Set this process's VmHWM to its current RSS (Linux >= 4.0; ignored if refused)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


@dataclass(frozen=True)
class DeviceRun:
    """What the child reported (or what the watchdog saw, if it had to kill it)."""

    ok: bool
    error: dict[str, Any] | None
    result: Any
    hwm_kb: tuple[int, int, int]  # before the call, after it, after lingering
    linger_s: float
    threads: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    killed: str | None = None  # why the watchdog killed the child

    @property
    def growth_mb(self) -> float:
        """Peak growth during the call, MB."""
        return (self.hwm_kb[1] - self.hwm_kb[0]) / 1024

    @property
    def linger_growth_mb(self) -> float:
        """Peak growth from before the call to the end of the linger, MB."""
        return (self.hwm_kb[2] - self.hwm_kb[0]) / 1024

    @property
    def error_type(self) -> str | None:
        """The class name of what the call raised, or None."""
        return None if self.error is None else str(self.error["type"])

    def summary(self) -> str:
        """One line for assertion messages and the release note."""
        if self.killed:
            return f"VmHWM reached {self.hwm_kb[1] / 1024:.0f} MB; child killed: {self.killed}"
        mem = f"VmHWM grew {self.growth_mb:.0f} MB during the call"
        if self.linger_s:
            mem += f", {self.linger_growth_mb:.0f} MB by {self.linger_s:g} s after it"
        if self.error is not None:
            what = f"raised {self.error['type']}: {self.error['message'][:160]}"
        else:
            what = f"returned {json.dumps(self.result)[:300]}"
        return f"{mem}; {what} ({self.wall_s:.1f} s)"


def run_device(job: Mapping[str, Any], *, cap_mb: int = 6000,
               timeout_s: float = 120.0) -> DeviceRun:
    """Run ``job`` in a child interpreter and return its report (see the module docstring)."""
    cmd = [sys.executable, "-m", "tests.integration.rss", json.dumps(dict(job))]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    out: list[bytes] = []
    err: list[bytes] = []
    readers = [threading.Thread(target=lambda s=s, b=b: b.append(s.read()), daemon=True)
               for s, b in ((proc.stdout, out), (proc.stderr, err))]
    for r in readers:
        r.start()
    killed, peak = None, 0
    while proc.poll() is None:
        peak = max(peak, vm_kb("VmHWM", proc.pid))
        if vm_kb("VmRSS", proc.pid) > cap_mb * 1024:
            killed = f"RSS passed the {cap_mb} MB cap after {time.monotonic() - t0:.1f} s"
        elif time.monotonic() - t0 > timeout_s:
            killed = f"still running after {timeout_s:g} s"
        if killed:
            peak = max(peak, vm_kb("VmHWM", proc.pid))
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            break
        time.sleep(0.02)
    for r in readers:
        r.join(10)
    if killed:
        return DeviceRun(False, None, None, (0, peak, peak), float(job.get("linger_s", 0)),
                         wall_s=time.monotonic() - t0, killed=killed)
    lines = b"".join(out).decode(errors="replace").strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"the device child exited with {proc.returncode}:\n"
                           f"{b''.join(err).decode(errors='replace')[-3000:]}")
    report = json.loads(lines[-1])
    return DeviceRun(report["ok"], report["error"], report["result"], tuple(report["hwm_kb"]),
                     report["linger_s"], report["threads"], report["wall_s"])


# ------------------------------------------------------------------------------ the child
def _describe(exc: BaseException) -> dict[str, Any]:
    from hybridml.shared.errors import HybridMLError, RemoteError

    message = exc.message if isinstance(exc, HybridMLError) else str(exc)
    return {"type": type(exc).__name__, "code": getattr(exc, "code", None),
            "hybrid": isinstance(exc, HybridMLError), "remote": isinstance(exc, RemoteError),
            "message": message[:400]}  # an attacker's message may be a gigabyte long


def _sync_job(job: Mapping[str, Any]) -> Any:
    from hybridml.edge.client import CloudClient
    from hybridml.edge.store import LocalStore
    from hybridml.edge.sync import sync
    from hybridml.edge.trust import check_manifest
    from hybridml.shared.manifest import Manifest

    store = LocalStore(job["store"])
    if job.get("warmup_url"):
        body = CloudClient(job["warmup_url"]).manifest(job["name"]).body
        assert body is not None
        check_manifest(store.root, Manifest.loads(body))
    client = CloudClient(job["url"])
    return _measured(job, lambda: sync(store, client, job["name"]).to_json())


def _predict_job(job: Mapping[str, Any]) -> Any:
    from hybridml.edge import EdgeRuntime, FallbackPolicy

    policy = FallbackPolicy(timeout_ms=float(job["timeout_ms"]), cooldown_s=60)
    if job.get("warmup_url"):
        warm = EdgeRuntime(job["store"], job["name"], job["warmup_url"], policy=policy)
        warm.predict(job.get("warmup_rows") or job["rows"])
    rt = EdgeRuntime(job["store"], job["name"], job["url"], policy=policy)

    def call() -> Any:
        preds = rt.predict(job["rows"])
        return {"predictions": [{"prediction": str(p.prediction)[:80], "source": p.source,
                                 "degraded": p.degraded, "model_version": p.model_version}
                                for p in preds],
                "cloud_failures": rt.cloud_failures, "breaker": rt.breaker.state,
                "last_cloud_error": (rt.last_cloud_error or "")[:300]}
    return _measured(job, call)


def _measured(job: Mapping[str, Any], call: Callable[[], Any]) -> dict[str, Any]:
    reset_peak()
    before = vm_kb("VmHWM")
    t0 = time.monotonic()
    ok, error, result = True, None, None
    try:
        result = call()
    except Exception as exc:  # reported, typed or not: the parent judges
        ok, error = False, _describe(exc)
    wall = time.monotonic() - t0
    after = vm_kb("VmHWM")
    linger = float(job.get("linger_s", 0))
    time.sleep(linger)
    end = vm_kb("VmHWM")
    return {"ok": ok, "error": error, "result": result, "hwm_kb": [before, after, end],
            "linger_s": linger, "wall_s": wall,
            "threads": [t.name for t in threading.enumerate() if t.name == ABANDONED_THREAD]}


def main(argv: list[str]) -> int:
    """The child: run the job in ``argv[0]`` and print its report as one JSON line."""
    job = json.loads(argv[0])
    runner = {"sync": _sync_job, "predict": _predict_job}[job["op"]]
    print(json.dumps(runner(job)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
