"""The serving floor: the least a Flask + onnxruntime /predict can do (no validation, no logs).

Rows are lists in schema order; FLOOR_NUM / FLOOR_CAT list the numeric and categorical
positions. Run with ``gunicorn -w 2 benchmarks.floor_app:app``.
"""

from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort
from flask import Flask, Response, jsonify, request

opts = ort.SessionOptions()
opts.intra_op_num_threads = 1  # as the kit's sessions: one thread per worker, no spinning
opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
sess = ort.InferenceSession(os.environ["FLOOR_MODEL"], opts, providers=["CPUExecutionProvider"])
NUM = [int(i) for i in os.environ.get("FLOOR_NUM", "").split(",") if i]
CAT = [int(i) for i in os.environ.get("FLOOR_CAT", "").split(",") if i]
app = Flask(__name__)


@app.get("/healthz")
def healthz() -> dict[str, str]:
    """Liveness."""
    return {"status": "ok"}


@app.post("/predict")
def predict() -> Response:
    """Predict the posted rows."""
    rows = request.get_json()["inputs"]
    feeds = {}
    if NUM:
        feeds["num"] = np.array([[np.nan if r[i] is None else r[i] for i in NUM] for r in rows],
                                dtype=np.float32)
    if CAT:
        feeds["cat"] = np.array([[r[i] or "" for i in CAT] for r in rows], dtype=object)
    out = sess.run(None, feeds)
    return jsonify({"predictions": np.asarray(out[0]).reshape(-1).tolist()})
