"""Timing, statistics, environment and process helpers shared by every benchmark.

Timings are per call with ``perf_counter_ns`` and the garbage collector paused (as ``timeit``
does); the timer's own cost, measured on an empty call, is subtracted. Every comparison in a
suite is measured in the same process, interleaved round by round, so drift on a shared
machine hits all contenders alike.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_WORKDIR = Path(tempfile.gettempdir()) / "hybridml-bench"  # the suites' scratch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PY = sys.executable


@dataclass(frozen=True)
class Stats:
    """Summary of repeated measurements (microseconds, or whatever unit they were taken in)."""

    median: float
    p99: float
    mean: float
    min: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float] | np.ndarray) -> Stats:
        """Summarise ``values``."""
        a = np.asarray(values, dtype=np.float64)
        if not a.size:
            return cls(float("nan"), float("nan"), float("nan"), float("nan"), 0)
        return cls(float(np.median(a)), float(np.percentile(a, 99)), float(a.mean()),
                   float(a.min()), int(a.size))

    def to_json(self) -> dict[str, Any]:
        """Rounded JSON form."""
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def ratio(a: float, b: float) -> float:
    """``a / b`` rounded, NaN when ``b`` is zero."""
    return round(a / b, 3) if b else float("nan")


def _timer_overhead_ns() -> float:
    noop = _noop
    samples = []
    for _ in range(2000):
        t0 = time.perf_counter_ns()
        noop()
        samples.append(time.perf_counter_ns() - t0)
    return float(np.median(samples))


def _noop() -> None:
    return None


_OVERHEAD_NS: float | None = None


def timer_overhead_ns() -> float:
    """Cost of timing an empty call, subtracted from every sample."""
    global _OVERHEAD_NS
    if _OVERHEAD_NS is None:
        _OVERHEAD_NS = _timer_overhead_ns()
    return _OVERHEAD_NS


def time_calls(contenders: dict[str, Callable[[], object]], *, calls: int, rounds: int = 5,
               warmup: int = 50) -> dict[str, Stats]:
    """Per-call latency in µs of each contender, interleaved over ``rounds`` rounds."""
    overhead = timer_overhead_ns()
    samples: dict[str, list[float]] = {k: [] for k in contenders}
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    per_round = max(1, calls // rounds)
    clock = time.perf_counter_ns
    with gc_paused():
        for _ in range(rounds):
            for name, fn in contenders.items():
                out = samples[name]
                for _ in range(per_round):
                    t0 = clock()
                    fn()
                    out.append(clock() - t0)
    return {k: Stats.of((np.asarray(v) - overhead) / 1000.0) for k, v in samples.items()}


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector (timeit does the same)."""
    was = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def environment() -> dict[str, Any]:
    """Machine, CPU, OS, Python and library versions."""
    import onnxruntime
    import sklearn

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    versions: dict[str, str] = {"python": platform.python_version(),
                                "numpy": np.__version__, "onnxruntime": onnxruntime.__version__,
                                "scikit-learn": sklearn.__version__}
    for mod in ("onnx", "skl2onnx", "flask", "gunicorn", "requests", "matplotlib"):
        try:
            versions[mod] = __import__(mod).__version__
        except (ImportError, AttributeError):
            versions[mod] = "absent"
    return {"machine": platform.machine(), "cpu": cpu, "cores": os.cpu_count(),
            "os": f"{platform.system()} {platform.release()}",
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
                               1),
            "wrk": wrk_version(), "taskset": bool(which("taskset")), "versions": versions}


def which(cmd: str) -> str | None:
    """Path of ``cmd`` on $PATH, or None."""
    for d in os.environ.get("PATH", "").split(os.pathsep):
        p = Path(d) / cmd
        if p.is_file() and os.access(p, os.X_OK):
            return str(p)
    return None


def wrk_version() -> str | None:
    """``wrk``'s version line, or None when it is not installed."""
    if not which("wrk"):
        return None
    out = subprocess.run(["wrk", "--version"], capture_output=True, text=True, check=False)
    return (out.stdout or out.stderr).splitlines()[0].strip() if (out.stdout or out.stderr) \
        else "wrk"


def save(name: str, data: dict[str, Any], results: Path = RESULTS) -> Path:
    """Write ``results/<name>.json``."""
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"{name}.json"
    path.write_text(json.dumps(data, indent=1, sort_keys=False, default=_json_default) + "\n")
    return path


def _json_default(o: object) -> Any:
    if isinstance(o, Stats):
        return o.to_json()
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def wait_http(url: str, proc: subprocess.Popen[bytes] | None = None,
              timeout_s: float = 30.0) -> None:
    """Wait until ``url`` answers 200; raise if the process exits or time runs out."""
    import requests

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise RuntimeError(f"server exited with {proc.returncode}: {err[-2000:]}")
        try:
            if requests.get(url, timeout=0.5).ok:
                return
        except requests.RequestException:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout_s} s")


def stop_group(proc: subprocess.Popen[bytes] | None, timeout_s: float = 3.0) -> None:
    """Stop a process started with ``start_new_session=True`` and its children.

    The measurements are over when this runs: SIGTERM, and SIGKILL for the whole group if it
    has not exited within ``timeout_s`` (a graceful gunicorn shutdown waits out its 10 s
    graceful timeout, which would only slow the suite down).
    """
    if proc is None:
        return
    try:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            with suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=timeout_s)
        os.killpg(proc.pid, signal.SIGKILL)  # workers left behind by the master, if any
    except ProcessLookupError:
        pass
    proc.wait()


def proc_stats() -> Iterator[tuple[int, list[str]]]:
    """``(pid, fields)`` of every live process: its ``/proc/<pid>/stat`` after the command
    name (``fields[0]`` is the state, ``[1]`` the parent, ``[2]`` the process group, ``[11:15]``
    utime, stime, cutime, cstime in clock ticks)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                yield int(entry), fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue


def group_cpu_seconds(pid: int) -> float:
    """user+system CPU seconds of ``pid`` and every live process in its process group."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for _, fields in proc_stats():
        if int(fields[2]) == pid:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def child_env(**extra: str) -> dict[str, str]:
    """Environment for child processes: repo on the path, quiet logging."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"]
                                     if env.get("PYTHONPATH") else "")
    env.update(extra)
    return env


def log(msg: str) -> None:
    """Progress line on stderr (benchmarks are scripts, not library code)."""
    print(f"[bench] {msg}", file=sys.stderr, flush=True)
