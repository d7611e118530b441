"""Items 1 and 2: single-row latency and batch throughput, side by side per model.

Single row (µs, per call): scikit-learn ``predict`` on the pickled pipeline · raw onnxruntime
``session.run(None, feeds)`` on the shipped ONNX with prebuilt feeds · the same through IO
binding (the floor onnxruntime allows from Python; numeric-only models) · raw onnxruntime on the
fp32 model when the shipped one is int8 · ``EdgeRuntime.predict`` on a row the table does not
hold (miss: encode + lookup + model + result) and on one it holds (precomputed hit).

Batch of 1,000 rows (rows/s): raw onnxruntime on a prebuilt batch · ``EdgeRuntime.predict`` on
the same rows as dicts/lists · ``EdgeRuntime.predict_arrays`` on the prebuilt arrays.
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .common import Stats, gc_paused, log, ratio, time_calls
from .workspace import Model

BATCH = 1000


def _ort_session(path: Any, threads: int = 1) -> Any:
    import onnxruntime as ort

    from hybridml.edge.session import session_options

    return ort.InferenceSession(str(path), session_options(threads),
                                providers=["CPUExecutionProvider"])


def _iobinding_call(sess: Any, feeds: dict[str, np.ndarray]) -> Callable[[], object] | None:
    """Raw onnxruntime through IO binding with inputs bound once (numeric inputs only)."""
    import onnxruntime as ort

    if any(v.dtype == object for v in feeds.values()):
        return None
    io = sess.io_binding()
    for k, v in feeds.items():
        io.bind_ortvalue_input(k, ort.OrtValue.ortvalue_from_numpy(v))
    for o in sess.get_outputs():
        io.bind_output(o.name)

    def call() -> object:
        sess.run_with_iobinding(io)
        return io.copy_outputs_to_cpu()
    return call


def single_row(model: Model, calls: int, sklearn_calls: int, threads: int = 1
               ) -> dict[str, Any]:
    """Per-call latency of every contender for one model."""
    from hybridml.cloud.models import combine
    from hybridml.edge.runtime import EdgeRuntime
    from hybridml.shared.manifest import Manifest

    schema = Manifest.from_json(model.manifest).schema
    miss_batch = schema.encode([model.miss_row])
    feeds = miss_batch.feeds(schema)
    sess = _ort_session(model.onnx_path, threads)
    rt = EdgeRuntime(model.store, model.name, threads=threads)
    hit, miss = [model.hit_row], [model.miss_row]
    got_hit, got_miss = rt.predict(hit)[0], rt.predict(miss)[0]
    if got_hit.source != "precomputed" or got_miss.source != "edge" or got_miss.degraded:
        raise RuntimeError(f"{model.name}: hit/miss rows answered {got_hit.source}/"
                           f"{got_miss.source}; the workspace is inconsistent")
    contenders: dict[str, Callable[[], object]] = {
        "ort": lambda: sess.run(None, feeds),
        "edge_miss": lambda: rt.predict(miss),
        "edge_hit": lambda: rt.predict(hit),
    }
    bound = _iobinding_call(sess, feeds)
    if bound is not None:
        contenders["ort_iobinding"] = bound
    if model.variant != "fp32":
        fp32 = _ort_session(model.fp32_path, threads)
        contenders["ort_fp32"] = lambda: fp32.run(None, feeds)
    stats = time_calls(contenders, calls=calls)
    pipe = pickle.loads(model.sklearn_path.read_bytes())
    x = combine(miss_batch.num, miss_batch.cat)
    stats.update(time_calls({"sklearn": lambda: pipe.predict(x)}, calls=sklearn_calls,
                            rounds=min(5, sklearn_calls), warmup=3))
    med = {k: v.median for k, v in stats.items()}
    return {
        "model": model.name, "family": model.spec.family, "dataset": model.spec.dataset,
        "variant": model.variant, "stats_us": {k: v.to_json() for k, v in stats.items()},
        "ratios": {
            "miss_vs_ort": ratio(med["edge_miss"], med["ort"]),
            "hit_vs_ort": ratio(med["edge_hit"], med["ort"]),
            "sklearn_vs_edge_miss": ratio(med["sklearn"], med["edge_miss"]),
            "sklearn_vs_edge_hit": ratio(med["sklearn"], med["edge_hit"]),
            "int8_vs_fp32": ratio(med["ort"], med["ort_fp32"]) if "ort_fp32" in med else None,
        },
    }


def _rows_per_s(contenders: dict[str, Callable[[], object]], n_rows: int, repeats: int
                ) -> dict[str, Stats]:
    """Rows/s of each contender (one batch per call), interleaved call by call."""
    samples: dict[str, list[float]] = {k: [] for k in contenders}
    for fn in contenders.values():
        fn()
    clock = time.perf_counter
    with gc_paused():
        for _ in range(repeats):
            for name, fn in contenders.items():
                t0 = clock()
                fn()
                samples[name].append(n_rows / (clock() - t0))
    return {k: Stats.of(v) for k, v in samples.items()}


def batch(model: Model, repeats: int, threads: int = 1) -> dict[str, Any]:
    """Rows/s at batch 1,000: raw onnxruntime vs EdgeRuntime (rows and arrays)."""
    from hybridml.edge.runtime import EdgeRuntime
    from hybridml.shared.manifest import Manifest

    schema = Manifest.from_json(model.manifest).schema
    # Rows the table does not hold: the model path, the worst case for the edge.
    from .workspace import TABLE_ROWS

    fresh = model.rows[TABLE_ROWS:] or model.rows
    rows = (fresh * (BATCH // len(fresh) + 1))[:BATCH]
    enc = schema.encode(rows)
    feeds = enc.feeds(schema)
    sess = _ort_session(model.onnx_path, threads)
    rt = EdgeRuntime(model.store, model.name, threads=threads)
    arrays = {k: v for k, v in (("num", enc.num), ("cat", enc.cat)) if v.shape[1]}
    out = _rows_per_s({"ort": lambda: sess.run(None, feeds),
                       "edge_rows": lambda: rt.predict(rows),
                       "edge_arrays": lambda: rt.predict_arrays(**arrays)}, BATCH, repeats)
    med = {k: v.median for k, v in out.items()}
    return {"model": model.name, "batch": BATCH,
            "rows_per_s": {k: v.to_json() for k, v in out.items()},
            "ratios": {"edge_arrays_vs_ort": ratio(med["edge_arrays"], med["ort"]),
                       "edge_rows_vs_ort": ratio(med["edge_rows"], med["ort"])}}


def run(models: list[Model], *, calls: int, sklearn_calls: int, batch_repeats: int,
        threads: int = 1) -> dict[str, Any]:
    """Both items for every model."""
    single, batches = [], []
    for m in models:
        log(f"latency: {m.name}")
        single.append(single_row(m, calls, sklearn_calls, threads))
        batches.append(batch(m, batch_repeats, threads))
    return {"single_row": single, "batch": batches,
            "settings": {"calls": calls, "sklearn_calls": sklearn_calls,
                         "batch_repeats": batch_repeats, "threads": threads}}
