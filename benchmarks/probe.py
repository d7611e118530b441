"""A fresh process that loads one model, predicts one row and reports time and peak memory.

Run as a script (``python benchmarks/probe.py KIND ...``) so the package import costs nothing:
the process holds only what the contender needs. Prints one JSON line::

    {"kind": ..., "first_prediction_s": <since the interpreter started>, "peak_rss_kb": ...}

Kinds: ``edge STORE NAME ROW_JSON`` (EdgeRuntime), ``sklearn JOBLIB_FILE ROW_JSON``
(joblib + the scikit-learn pipeline), ``bare`` (the interpreter alone, for reference).
"""

from __future__ import annotations

import json
import resource
import sys
import time


def _since_start() -> float:
    """Seconds since this process was created (clock of /proc/self/stat vs uptime)."""
    try:
        import os

        with open("/proc/self/stat") as fh:
            start_ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as fh:
            uptime = float(fh.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def _peak_rss_kb() -> int:
    """Peak RSS of this process image. ``ru_maxrss`` is not used: after fork + exec Linux
    reports the parent's high-water mark there, while VmHWM belongs to the new image."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def main(argv: list[str]) -> int:
    """Run the probe named by ``argv[0]``."""
    t0 = time.perf_counter()
    kind = argv[0]
    answer: object = None
    if kind == "edge":
        from hybridml.edge.runtime import EdgeRuntime

        rt = EdgeRuntime(argv[1], argv[2])
        answer = rt.predict([json.loads(argv[3])])[0].prediction
    elif kind == "sklearn":
        import joblib
        import numpy as np

        pipe = joblib.load(argv[1])
        row = json.loads(argv[2])
        n_num = int(argv[3])
        x = np.empty((1, len(row)), dtype=object)
        x[0, :n_num] = [np.nan if v is None else float(v) for v in row[:n_num]]
        x[0, n_num:] = ["" if v is None else v for v in row[n_num:]]
        answer = pipe.predict(x)[0]
    elif kind != "bare":
        print(f"unknown probe kind {kind!r}", file=sys.stderr)
        return 2
    in_process = time.perf_counter() - t0
    peak = _peak_rss_kb()
    print(json.dumps({"kind": kind, "in_process_s": in_process,
                      "since_start_s": _since_start(), "peak_rss_kb": peak,
                      "answer": str(answer)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
