"""Quantization candidates and the accuracy guard that picks which one ships to the edge.

:func:`quantize` builds up to three candidates from an fp32 ONNX model — ``fp32`` (always, the
baseline), ``int8_dynamic`` (weights 8-bit, activations quantized per call) and ``int8_static``
(QDQ, activation ranges calibrated on training rows) — scores each on the test split with the
task's metric, and ships the smallest one whose drop against fp32 stays within the tolerance.
Every candidate is recorded in a :class:`QuantizationReport`, including those that do not apply
(tree and linear graphs are all ``ai.onnx.ml`` ops) or fail to build: a failed candidate is a
line in the report, never a failed training run.

Why ``QUInt8`` weights: the cloud machine that runs the guard may have AVX-512 VNNI while an
edge laptop has plain AVX2, where onnxruntime's u8×s8 kernels can saturate (``vpmaddubsw``).
u8×u8 has no saturating path on any CPU, so the accuracy the guard measures is the accuracy the
device gets. Per-channel weight scales kept MLP accuracy at the fp32 level in our trials for
about 1 KB more per model.
"""

from __future__ import annotations

import logging
import math
import statistics
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from hybridml.edge.session import ModelSession
from hybridml.shared.errors import ConfigError, DataError, HybridMLError, QuantizationError
from hybridml.shared.schema import EncodedBatch, InputSchema
from hybridml.shared.text import format_table

from . import metrics

log = logging.getLogger("hybridml.cloud.quantize")

VARIANTS = ("fp32", "int8_dynamic", "int8_static")
STATUSES = ("chosen", "accepted", "rejected", "not_applicable", "failed")
NOT_QUANTIZABLE = "graph has no quantizable ops (ai.onnx.ml ops only)"
# Ops with float weights the int8 builders rewrite; everything else (ai.onnx.ml, strings) stays.
QUANTIZABLE_OPS = ("MatMul", "Gemm", "Conv")
_STANDARD = ("", "ai.onnx")
# Accuracy metrics: absolute drop (0.005 = half a point); RMSE: relative increase (1%).
DEFAULT_TOLERANCE = {"balanced_accuracy": 0.005, "accuracy": 0.005, "rmse": 0.01}
CALIBRATION_ROWS = 512
CALIBRATION_BATCH = 64
LATENCY_RUNS = 200
LATENCY_WARMUP = 20
_SETTINGS = {
    "fp32": "exported graph, unchanged",
    "int8_dynamic": "weights uint8 per-channel; activations uint8 per call",
    "int8_static": "QDQ; weights uint8 per-channel; activations uint8 MinMax-calibrated",
}


@dataclass(frozen=True)
class Candidate:
    """One model variant and how it fared against fp32.

    ``drop`` is the fp32 metric minus this one for accuracy metrics, and the relative RMSE
    increase for regression; positive is worse. Fields are ``None`` where nothing was measured.
    """

    variant: str
    status: str
    reason: str
    size: int | None = None
    metric_value: float | None = None
    drop: float | None = None
    latency_us: float | None = None
    settings: str = ""
    rss_kb: float | None = None  # peak RSS a process gains loading it and running one row
    requires_onnxruntime: str | None = None  # None: every onnxruntime the edge supports


    def to_json(self) -> dict[str, Any]:
        """Return a JSON-safe mapping (non-finite floats become ``None``)."""
        return {"variant": self.variant, "status": self.status, "reason": self.reason,
                "size": self.size, "metric_value": _finite(self.metric_value),
                "drop": _finite(self.drop), "latency_us": _finite(self.latency_us),
                "settings": self.settings, "rss_kb": _finite(self.rss_kb),
                "requires_onnxruntime": self.requires_onnxruntime}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Candidate:
        """Rebuild a candidate from :meth:`to_json` output."""
        size = data.get("size")
        return cls(str(data["variant"]), str(data["status"]), str(data.get("reason", "")),
                   None if size is None else int(size), _opt_float(data.get("metric_value")),
                   _opt_float(data.get("drop")), _opt_float(data.get("latency_us")),
                   str(data.get("settings", "")), _opt_float(data.get("rss_kb")),
                   data.get("requires_onnxruntime"))


@dataclass(frozen=True)
class QuantizationReport:
    """What the accuracy guard saw: the metric, the tolerance, every candidate, the choice."""

    metric: str
    tolerance: float
    chosen: str
    candidates: tuple[Candidate, ...]
    preprocess: str = ""

    def candidate(self, variant: str) -> Candidate:
        """Return the candidate called ``variant``; raises ``KeyError`` if it was not built."""
        for c in self.candidates:
            if c.variant == variant:
                return c
        raise KeyError(variant)

    def to_json(self) -> dict[str, Any]:
        """Return the JSON-safe form stored in the manifest under ``quantization``."""
        return {"metric": self.metric, "tolerance": _finite(self.tolerance),
                "chosen": self.chosen, "preprocess": self.preprocess,
                "candidates": [c.to_json() for c in self.candidates]}

    @classmethod
    def from_json(cls, data: Any) -> QuantizationReport:
        """Parse :meth:`to_json` output; raises :class:`QuantizationError` if it is not one."""
        try:
            return cls(str(data["metric"]), float(data["tolerance"]), str(data["chosen"]),
                       tuple(Candidate.from_json(c) for c in data["candidates"]),
                       str(data.get("preprocess", "")))
        except (KeyError, TypeError, ValueError) as exc:
            raise QuantizationError(
                f"not a quantization report ({type(exc).__name__}: {exc}); expected the "
                "object QuantizationReport.to_json() writes", field="quantization") from exc

    def to_table(self, title: str = "quantization") -> str:
        """Return a fixed-width text table of the candidates, for the CLI."""
        unit = "relative rise" if self.metric == "rmse" else "absolute drop"
        rss = any(c.rss_kb is not None for c in self.candidates)
        rows = [(c.variant, c.status, "-" if c.size is None else f"{c.size:,}",
                 _fmt(c.metric_value, ".4f"), _fmt_drop(self.metric, c.drop),
                 _fmt(c.latency_us, ".1f"), *([_fmt(c.rss_kb, ",.0f")] if rss else []),
                 c.reason) for c in self.candidates]
        head = ["variant", "status", "size B", self.metric, "drop", "latency µs",
                *(["RSS KB"] if rss else []), "reason"]
        lines = [f"{title} ({self.metric}, tolerance {_fmt_tol(self.metric, self.tolerance)}"
                 f" {unit}; chosen {self.chosen})",
                 format_table(head, rows, align="llrrrr" + ("r" if rss else "") + "l",
                              indent="  ", rule=False)]
        if self.preprocess:
            lines.append(f"  pre-processing: {self.preprocess}")
        return "\n".join(lines)


def quantize(fp32: bytes, schema: InputSchema, task: str, *, calibration: EncodedBatch,
             test: EncodedBatch, y_test: np.ndarray, tolerance: float | None = None,
             variants: Sequence[str] = ("int8_dynamic", "int8_static"),
             ) -> tuple[str, bytes, QuantizationReport]:
    """Build the candidates, score them on ``test`` and return ``(variant, bytes, report)``.

    ``tolerance`` is the largest allowed drop: absolute for accuracy metrics (default 0.005),
    relative for RMSE (default 0.01). 0 rejects any drop. Raises :class:`ConfigError` for an
    unknown task, variant or a bad tolerance, and :class:`DataError` for an unusable test split.
    """
    metric, tol = check_args(task, variants, tolerance, test, y_test)
    y_true = np.asarray(y_test)
    base = measure("fp32", fp32, schema, task, test, y_true)
    measured, built, preprocess = int8_candidates(fp32, schema, task, calibration=calibration,
                                                  test=test, y_true=y_true, variants=variants)
    built["fp32"] = fp32
    measured.insert(0, base)
    report = decide(metric, tol, base, measured, preprocess)
    log.info("quantization: chose %s (%d bytes of %d fp32) by %s", report.chosen,
             len(built[report.chosen]), len(fp32), metric)
    return report.chosen, built[report.chosen], report


def int8_candidates(fp32: bytes, schema: InputSchema, task: str, *, calibration: EncodedBatch,
                    test: EncodedBatch, y_true: np.ndarray,
                    variants: Sequence[str] = ("int8_dynamic", "int8_static"),
                    ) -> tuple[list[Candidate], dict[str, bytes], str]:
    """Build and measure the int8 variants of ``fp32`` (not fp32 itself).

    Returns the candidates (``accepted`` ones await :func:`decide`), the bytes of those built,
    and what pre-processing did.
    """
    built: dict[str, bytes] = {}
    measured: list[Candidate] = []
    wanted = [v for v in dict.fromkeys(variants) if v != "fp32"]
    model = onnx.load_from_string(fp32)
    preprocess = "not run: no int8 variant requested" if not wanted else ""
    if wanted and not _quantizable_nodes(model):
        preprocess = "not run: " + NOT_QUANTIZABLE
        measured += [Candidate(v, "not_applicable", NOT_QUANTIZABLE, settings=_SETTINGS[v])
                     for v in wanted]
        wanted = []
    if wanted:
        with tempfile.TemporaryDirectory(prefix="hybridml-quant-") as tmp:
            src, preprocess = _prepare(model, Path(tmp), test.feeds(schema))
            for variant in wanted:
                data, cand = _build(variant, src, Path(tmp), fp32, calibration, schema)
                if data is not None:
                    built[variant] = data
                    cand = measure(variant, data, schema, task, test, y_true)
                measured.append(cand)
    return measured, built, preprocess


def decide(metric: str, tolerance: float, base: Candidate, measured: Sequence[Candidate],
           preprocess: str = "") -> QuantizationReport:
    """Apply the accuracy guard to measured candidates and return the report.

    A measured candidate (status ``accepted`` on entry) whose drop against ``base`` exceeds
    ``tolerance`` is rejected; of the rest, fp32 included, the smallest is chosen, earlier
    candidates winning ties (so fp32 wins over an equal-sized int8).
    """
    out: list[Candidate] = []
    for c in measured:
        if c.status != "accepted" or c is base:  # fp32 is the yardstick, never rejected
            out.append(c)
            continue
        drop = metric_drop(metric, base.metric_value, c.metric_value)
        if drop is None or not math.isfinite(drop):
            c = replace(c, drop=drop, status="rejected", reason=f"{metric} cannot be compared: "
                        f"{c.metric_value} vs fp32 {base.metric_value}")
        elif drop > tolerance + 1e-12:  # 1e-12: a drop equal to the tolerance must pass
            c = replace(c, drop=drop, status="rejected", reason=_over(metric, drop, tolerance))
        else:
            c = replace(c, drop=drop)
        out.append(c)
    ok = [c for c in out if c.status == "accepted"]
    best = min(ok, key=lambda c: c.size or 0) if ok else base
    final = []
    for c in out:
        if c.variant == best.variant:
            c = replace(c, status="chosen", reason=_why_chosen(c, tolerance, metric))
        elif c.status == "accepted":
            c = replace(c, reason=f"within tolerance but larger than {best.variant}")
        final.append(c)
    return QuantizationReport(metric, tolerance, best.variant, tuple(final), preprocess)


# ------------------------------------------------------------------------------ measuring
def check_args(task: str, variants: Sequence[str], tolerance: float | None,
               test: EncodedBatch, y_test: np.ndarray) -> tuple[str, float]:
    """Validate the guard's arguments; return the task's metric and the tolerance to apply."""
    if task not in metrics.PRIMARY:
        raise ConfigError(f"unknown task {task!r}; use one of {', '.join(metrics.PRIMARY)}",
                          field="task")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ConfigError(f"unknown quantization variant {unknown[0]!r}; choose from "
                          f"{', '.join(VARIANTS)}", field="variants")
    metric = metrics.PRIMARY[task]
    tol = DEFAULT_TOLERANCE[metric] if tolerance is None else float(tolerance)
    if not math.isfinite(tol) or tol < 0:
        raise ConfigError(f"tolerance {tolerance!r} must be a finite number >= 0 (0 rejects "
                          "any drop)", field="tolerance")
    if len(test) == 0:
        raise DataError("the test split is empty; quantized candidates need test rows to be "
                        "scored on", field="test")
    if len(np.asarray(y_test)) != len(test):
        raise DataError(f"y_test has {len(np.asarray(y_test))} values but the test batch has "
                        f"{len(test)} rows; pass the labels of the same rows", field="y_test")
    return metric, tol


def measure(variant: str, data: bytes, schema: InputSchema, task: str, test: EncodedBatch,
            y_true: np.ndarray, settings: str | None = None) -> Candidate:
    """Score and time one candidate; returns it ``accepted`` (the guard decides later)."""
    settings = _SETTINGS.get(variant, "") if settings is None else settings
    try:
        sess = ModelSession(data, schema, task)
        out = sess.run(test)
    except Exception as exc:
        if variant == "fp32":  # no baseline, no guard: this one must surface
            if isinstance(exc, HybridMLError):
                raise
            raise QuantizationError(f"the fp32 model cannot be run on the test rows: {exc}",
                                    field="fp32") from exc
        log.warning("candidate %s does not run: %s", variant, exc)
        return Candidate(variant, "failed", f"cannot run: {short_error(exc)}", size=len(data),
                         settings=settings)
    pred = out.values if task == "regression" else out.labels
    value = score(task, y_true, np.asarray(pred))
    return Candidate(variant, "accepted", "baseline" if variant == "fp32" else "",
                     size=len(data), metric_value=value,
                     drop=0.0 if variant == "fp32" else None,
                     latency_us=_latency_us(sess, test.take([0])), settings=settings)


def score(task: str, y_true: np.ndarray, pred: np.ndarray) -> float:
    """The task's primary metric of ``pred`` against ``y_true``."""
    name = metrics.PRIMARY[task]
    fn = {"accuracy": metrics.accuracy, "balanced_accuracy": metrics.balanced_accuracy,
          "rmse": metrics.rmse}[name]
    return float(fn(y_true, pred))


def _latency_us(sess: ModelSession, row: EncodedBatch) -> float:
    """Median single-row latency in µs after a warm-up (benchmarks hold the careful numbers)."""
    for _ in range(LATENCY_WARMUP):
        sess.run(row)
    times = []
    for _ in range(LATENCY_RUNS):
        t0 = time.perf_counter_ns()
        sess.run(row)
        times.append(time.perf_counter_ns() - t0)
    return statistics.median(times) / 1000.0


def metric_drop(metric: str, base: float | None, value: float | None) -> float | None:
    """How much worse ``value`` is than ``base``: absolute for accuracies, relative for RMSE."""
    if base is None or value is None or not math.isfinite(value):
        return None
    if metric != "rmse":
        return base - value
    if base > 0:
        return (value - base) / base
    return 0.0 if value <= base else math.inf


def _over(metric: str, drop: float, tol: float) -> str:
    return f"{metric} drop {_fmt_drop(metric, drop, '')} > tolerance {_fmt_tol(metric, tol)}"


def _why_chosen(c: Candidate, tol: float, metric: str) -> str:
    if c.variant == "fp32":
        return "baseline; no smaller candidate within tolerance"
    return (f"smallest within tolerance (drop {_fmt_drop(metric, c.drop, '')} <= "
            f"{_fmt_tol(metric, tol)})")


# ------------------------------------------------------------------------------- building
def _quantizable_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node
            if n.domain in _STANDARD and n.op_type in QUANTIZABLE_OPS]


def _prepare(model: onnx.ModelProto, tmp: Path,
             feeds: Mapping[str, np.ndarray]) -> tuple[Path, str]:
    """Write the graph the int8 builders start from; return its path and what was done.

    ``quant_pre_process`` runs ONNX shape inference and the onnxruntime optimizer. Its symbolic
    shape pass is skipped: it needs sympy (not a dependency) and only matters for dynamic shapes
    of transformer graphs. If pre-processing fails the raw graph is used and the report says so.
    """
    raw = tmp / "fp32.onnx"
    pre = tmp / "pre.onnx"
    for i, node in enumerate(model.graph.node):
        if not node.name:  # the static builder selects nodes by name
            node.name = f"hybridml_node_{i}"
    onnx.save(model, str(raw))
    try:
        quant_pre_process(str(raw), str(pre), skip_symbolic_shape=True)
        src, status = pre, "quant_pre_process"
    except Exception as exc:
        log.warning("quant_pre_process failed, quantizing the exported graph as is: %s", exc)
        src, status = raw, f"quant_pre_process failed ({short_error(exc)}); used the raw graph"
    typed = tmp / "typed.onnx"
    try:
        onnx.save(_annotate_types(onnx.load(str(src)), feeds), str(typed))
    except Exception as exc:  # the builders still work, static just quantizes fewer tensors
        log.warning("could not probe tensor types: %s", exc)
        return src, status + f"; type probe failed ({short_error(exc)})"
    return typed, status


def _annotate_types(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """Add value_info types for tensors ONNX shape inference left untyped.

    Inference stops at ai.onnx.ml ops (Imputer, Scaler, ...), so every MatMul after them has
    untyped inputs: the static quantizer then leaves activations in float and the dynamic one
    refuses the node. One real run on one test row tells every intermediate tensor's type.
    """
    g = model.graph
    known = {v.name for v in [*g.value_info, *g.input, *g.output]}
    known |= {i.name for i in g.initializer}
    names = [o for n in g.node for o in n.output if o and o not in known]
    if not names or not feeds:
        return model
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(probe.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    one = {k: v[:1] for k, v in feeds.items()}
    for name, arr in zip(names, sess.run(names, one), strict=True):
        elem = helper.np_dtype_to_tensor_dtype(np.asarray(arr).dtype)
        g.value_info.append(helper.make_tensor_value_info(name, elem, None))
    return model


def _build(variant: str, src: Path, tmp: Path, fp32: bytes, calibration: EncodedBatch,
           schema: InputSchema) -> tuple[bytes | None, Candidate]:
    """Build one int8 variant; return its bytes, or ``None`` and the recorded candidate."""
    out = tmp / f"{variant}.onnx"
    settings = _SETTINGS[variant]
    try:
        if variant == "int8_dynamic":
            quantize_dynamic(str(src), str(out), weight_type=QuantType.QUInt8, per_channel=True,
                             op_types_to_quantize=list(QUANTIZABLE_OPS),
                             extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        else:
            nodes = _static_safe_nodes(onnx.load(str(src)))
            if not nodes:
                return None, Candidate(variant, "not_applicable", "every MatMul/Gemm/Conv "
                                       "touches an ai.onnx.ml op or a graph output",
                                       settings=settings)
            if len(calibration) == 0:
                raise QuantizationError("no calibration rows; pass training rows to calibrate "
                                        "activation ranges", field="calibration")
            quantize_static(str(src), str(out), _FeedReader(calibration.feeds(schema)),
                            quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QUInt8, per_channel=True,
                            op_types_to_quantize=list(QUANTIZABLE_OPS), nodes_to_quantize=nodes,
                            calibrate_method=CalibrationMethod.MinMax,
                            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
            _check_ml_inputs_unquantized(onnx.load(str(out)))
        data = out.read_bytes()
    except Exception as exc:
        log.warning("building %s failed: %s", variant, exc)
        return None, Candidate(variant, "failed", short_error(exc), settings=settings)
    if data == fp32 or len(data) >= len(fp32):
        return None, Candidate(variant, "not_applicable", f"quantized model is not smaller than "
                               f"fp32 ({len(data):,} >= {len(fp32):,} bytes)", size=len(data),
                               settings=settings)
    return data, Candidate(variant, "accepted", "", size=len(data), settings=settings)


def _static_safe_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of weight ops whose QDQ pairs would be seen by standard ops only.

    QDQ rewires *every* consumer of a quantized tensor to the dequantized copy, so a tensor that
    also feeds an ai.onnx.ml op (a tree's thresholds, an encoder) or is a graph output must not
    be quantized; ops touching such a tensor are left in float.
    """
    g = model.graph
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in g.output}
    weights = {i.name for i in g.initializer}
    safe = []
    for n in _quantizable_nodes(model):
        tensors = [t for t in [*n.input, *n.output] if t and t not in weights]
        if all(t not in outputs and all(c.domain in _STANDARD for c in consumers.get(t, []))
               for t in tensors):
            safe.append(n.name)
    return safe


def _check_ml_inputs_unquantized(model: onnx.ModelProto) -> None:
    """Refuse a static model where a dequantized tensor reaches an ml op or a graph output."""
    dq = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    for n in model.graph.node:
        if n.domain not in _STANDARD and dq.intersection(n.input):
            raise QuantizationError(f"QDQ reached ai.onnx.ml node {n.name!r} ({n.op_type}); "
                                    "its input must stay float", field="int8_static")
    hit = dq.intersection(o.name for o in model.graph.output)
    if hit:
        raise QuantizationError(f"QDQ reached graph output {sorted(hit)[0]!r}",
                                field="int8_static")


class _FeedReader(CalibrationDataReader):
    """Calibration feeds in small batches; at most ``CALIBRATION_ROWS`` evenly spaced rows."""

    def __init__(self, feeds: Mapping[str, np.ndarray]) -> None:
        n = len(next(iter(feeds.values())))
        idx = np.unique(np.linspace(0, n - 1, min(n, CALIBRATION_ROWS)).astype(np.intp))
        self._batches: Iterator[dict[str, np.ndarray]] = iter(
            [{k: v[idx[s:s + CALIBRATION_BATCH]] for k, v in feeds.items()}
             for s in range(0, len(idx), CALIBRATION_BATCH)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        """Return the next batch of feeds, or ``None`` when done."""
        return next(self._batches, None)


# -------------------------------------------------------------------------------- helpers
def short_error(exc: BaseException, limit: int = 300) -> str:
    """``Type: message`` on one line, cut to ``limit`` characters (for report reasons)."""
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _finite(x: float | None) -> float | None:
    return x if x is None or math.isfinite(x) else None


def _opt_float(x: Any) -> float | None:
    return None if x is None else float(x)


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None or not math.isfinite(x) else format(x, spec)


def _fmt_drop(metric: str, x: float | None, sign: str = "+") -> str:
    """Drops in the metric's unit: RMSE rises as percentages, accuracy drops as fractions."""
    if x is None or not math.isfinite(x):
        return "-"
    return format(x, f"{sign}.2%") if metric == "rmse" else format(x, f"{sign}.4f")


def _fmt_tol(metric: str, tol: float) -> str:
    return f"{tol:.2%}" if metric == "rmse" else f"{tol:g}"
