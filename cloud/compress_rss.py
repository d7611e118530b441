"""Peak RSS of loading a candidate model and predicting one row, measured in a child process.

One child imports numpy and onnxruntime (the edge's baseline), then forks once per candidate.
A fork's peak RSS (``VmHWM``) starts at its RSS when forked; it opens an onnxruntime session
with the edge's options on the candidate's bytes, runs one row, and reports how far its peak
rose: what the model adds to a device's peak. One interpreter start serves every
candidate, so measuring costs ~0.3 s plus the loads. Linux only (``/proc``, ``fork``); elsewhere,
or when the child fails, the numbers are ``None``.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

log = logging.getLogger("hybridml.cloud.compress_rss")

TIMEOUT_S = 120
_CHILD = r"""
import json, os, sys
import numpy as np
import onnxruntime as ort
from hybridml.edge.session import session_options

def hwm():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0

work = sys.argv[1]
spec = json.load(open(os.path.join(work, "spec.json")))
raw = np.load(os.path.join(work, "row.npz"))
feeds = {k: (raw[k].astype(object) if raw[k].dtype.kind == "U" else raw[k]) for k in raw.files}
out = {}
for name, path in spec.items():
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            start = hwm()  # a fork's peak starts at its RSS when forked
            sess = ort.InferenceSession(path, session_options(1),
                                        providers=["CPUExecutionProvider"])
            names = {i.name for i in sess.get_inputs()}
            sess.run(None, {k: v for k, v in feeds.items() if k in names})
            os.write(w, str(hwm() - start).encode())
        finally:
            os._exit(0)
    os.close(w)
    text = os.read(r, 64).decode()
    os.close(r)
    os.waitpid(pid, 0)
    out[name] = int(text) if text else None
print(json.dumps(out))
"""


def peak_rss_kb(models: Mapping[str, bytes], feeds: Mapping[str, np.ndarray]
                ) -> dict[str, float | None]:
    """KB of peak RSS each model adds to a process that has imported onnxruntime."""
    if not models or not sys.platform.startswith("linux"):
        return {}
    with tempfile.TemporaryDirectory(prefix="hybridml-rss-") as tmp:
        work = Path(tmp)
        spec = {}
        for i, (name, data) in enumerate(models.items()):
            path = work / f"m{i}.onnx"
            path.write_bytes(data)
            spec[name] = str(path)
        (work / "spec.json").write_text(json.dumps(spec))
        row = {k: (v.astype(str) if v.dtype == object else v) for k, v in feeds.items()}
        np.savez(work / "row.npz", **row)  # type: ignore[arg-type]
        try:
            proc = subprocess.run([sys.executable, "-c", _CHILD, str(work)], capture_output=True,
                                  text=True, timeout=TIMEOUT_S, check=True)
            got = json.loads(proc.stdout.strip().splitlines()[-1])
        except (subprocess.SubprocessError, OSError, ValueError, IndexError) as exc:
            log.warning("could not measure peak RSS: %s", exc)
            return {}
    return {k: (None if v is None else float(v)) for k, v in got.items()}
