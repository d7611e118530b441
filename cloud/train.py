"""Training: data -> fitted pipeline -> ONNX (parity-gated) -> compressed -> registered version.

:func:`train` is the whole pipeline behind ``hybridml-cloud train``. Nothing becomes visible in
the registry until every step has passed: the version row is written last, in one transaction.
"""

from __future__ import annotations

import logging
import os
import pickle
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.pipeline import Pipeline

from hybridml.edge.session import ModelSession
from hybridml.shared.errors import ConfigError, NotFoundError
from hybridml.shared.schema import NUMERIC, EncodedBatch, InputSchema

from . import calibration, explainers, fairness, imbalance, metrics
from .compress import compress
from .compress_refit import Refit, exporter
from .data import Dataset, fit_schema, load_builtin, load_csv, split
from .export import check_parity, export_onnx
from .finetune import ModeChoice, Parent, choose_mode, continue_training
from .labelled import Labelled, from_dataset, holdout_ref, store_holdout
from .models import build_pipeline, combine, family
from .policy import MODES
from .profile import version_profile
from .quality import QualityOptions
from .registry import Registry
from .threshold import add_threshold
from .threshold import decide as decide_threshold
from .threshold import labels as threshold_labels

log = logging.getLogger("hybridml.cloud.train")

GOLDEN_ROWS = 8
Progress = Callable[[str], None]
# Called with the shipped model, the finished manifest and the rows the model was trained on;
# returns ``manifest["gate"]`` (hybridml.cloud.gate).
Gate = Callable[[bytes, Mapping[str, Any], Labelled], Mapping[str, Any]]


@dataclass
class TrainResult:
    """What :func:`train` registered: the manifest plus timings."""

    manifest: dict[str, Any]
    seconds: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` output of ``train``."""
        m = self.manifest
        return {
            "name": m["name"], "version": m["version"], "task": m["output"]["task"],
            "parent": m.get("parent"), "lineage": m.get("lineage"),
            "metrics": m["metrics"], "quantization": m["quantization"],
            "compression": m.get("compression"),
            "artifacts": m["artifacts"], "seconds": self.seconds,
            "fairness": m.get("fairness"),
            "calibration": m.get("calibration"),
        }


def train(registry: Registry, name: str, *, data: str | os.PathLike[str] | None = None,
          dataset: str | None = None, target: str | None = None, model: str = "hgb",
          task: str | None = None, seed: int = 0, tolerance: float | None = None,
          params: Mapping[str, Any] | None = None, finetune_from: str | None = None,
          mode: str | ModeChoice = "finetune", categorical: Sequence[str] = (),
          numeric: Sequence[str] = (), drop: Sequence[str] = (),
          quality: QualityOptions | None = None, progress: Progress | None = None,
          gate: Gate | None = None, compression: str = "auto") -> TrainResult:
    """Train, export, compress and register a new version of ``name``.

    Exactly one of ``data`` (a CSV, with ``target``) or ``dataset`` (a bundled scikit-learn
    dataset) is required. ``finetune_from="eta:1"`` names the version the new one follows, and
    ``mode`` says how (:mod:`hybridml.cloud.finetune`): ``finetune`` continues its model on the
    new data (mlp, sgd: partial_fit; gb, hgb: added boosting rounds; rf: added trees) with
    lineage ``finetune``, ``retrain`` fits the line's family and parameters from scratch, and
    ``auto`` fine-tunes when it can, else retrains; the choice and its reason go in
    ``manifest["training"]["mode"]`` (a caller that chose already passes its ``ModeChoice``).
    ``gate``, when given, is called with the shipped model, the finished manifest and the
    training rows before registration; what it returns is ``manifest["gate"]``
    (:func:`hybridml.cloud.gate.gate_hook`). ``quality`` asks for class weights, a decision
    threshold, calibration, fairness reports and the device explainer (docs/quality.md); it is
    recorded in ``manifest["training"]["quality"]``. ``compression`` is the compression
    guard's mode (``off``, ``auto``, ``aggressive``: :mod:`hybridml.cloud.compress`).
    """
    if isinstance(mode, str) and mode not in MODES:
        raise ConfigError(f"mode {mode!r}: use one of {', '.join(MODES)}", field="mode")
    say = progress or (lambda _msg: None)
    asked, quality = quality, quality or QualityOptions()
    timings: dict[str, float] = {}
    lap = _Clock()
    fairness.check_request(quality, target)
    ds = _load(data, dataset, target, task, categorical, numeric,
               (*drop, *quality.sensitive_only), quality.sensitive)
    sensitive = fairness.sensitive_values(ds, quality)
    sp = split(ds, seed)
    train_num, train_cat, y_train = ds.take(sp.train)
    timings["load"] = lap()
    say(f"loaded {len(ds)} rows from {ds.source} ({ds.task}); split {sp.to_json()}")

    parent_version: int | None = None
    lineage, holdout, tuned = "retrain", None, None
    line_positive: str | None = None  # the positive class the parent recorded
    balance: dict[str, Any] | None = None
    choice = ModeChoice("retrain", "retrain", "trained from scratch")
    if finetune_from:
        parent = Parent.load(registry, finetune_from)
        features = [(f.name, f.kind) for f in ds.schema.features]
        # Raises what blocks a fine-tune; a caller's own choice keeps its reason.
        choice = choose_mode(mode if isinstance(mode, str) else mode.mode, parent,
                             task=ds.task, classes=ds.classes, features=features)
        if isinstance(mode, ModeChoice):
            choice = mode
        parent_version, model = parent.version, parent.family
        quality = asked or parent.quality  # a retrain of the line asks for the same things
        line_positive = (parent.manifest.get("metrics") or {}).get("positive")
        if choice.mode == "finetune":
            tuned = continue_training(registry, parent, ds, sp, say)
            pipe, schema, lineage = tuned.pipe, tuned.schema, "finetune"
            balance = imbalance.finetune_record(pipe, ds.task, y_train,
                                                ds.classes, quality.class_weight)
            holdout = holdout_ref(registry, parent.name, parent.version)
        else:
            say(f"retraining {finetune_from}'s line from scratch: {choice.reason}")
            params = {**parent.retrain_params(registry), **(params or {})}
    calibrated = calibration.finetuned(quality.calibrate)
    if tuned is None:
        fam = family(model)
        kinds = [f.kind for f in ds.schema.features]
        schema = fit_schema(ds.schema.names, kinds, train_num, train_cat)
        pipe = build_pipeline(fam.name, ds.task, schema.n_numeric, schema.n_categorical, seed,
                              params)
        calibrated = calibration.calibrate(pipe, quality.calibrate, ds.task, fam.name, y_train, say)
        balancing = imbalance.prepare(pipe, fam.name, ds.task, y_train, ds.classes,
                                      quality.class_weight, seed, say)
        say(f"fitting {fam.name} on {len(y_train)} rows")
        balancing.fit(pipe, combine(train_num, train_cat), y_train)
        balance = balancing.record
        if parent_version is None:
            parent_version = _latest(registry, name)
    timings["fit"] = lap()
    positive = _positive(ds, y_train, line_positive)
    decision = decide_threshold(quality, ds.task, ds.classes, y_train,
                                metrics.primary_name(ds.task, quality.primary),
                                lambda: _validation_proba(pipe, ds, sp.validation), positive)
    if decision is not None:
        say(decision.describe())

    test_num, test_cat, y_test = ds.take(sp.test)
    test_x = combine(test_num, test_cat)
    skl_metrics = _sklearn_scores(pipe, ds, test_x, y_test, decision, positive)
    primary = metrics.primary_name(ds.task, quality.primary)
    say(f"fitted; test {primary} = {skl_metrics[primary]}")

    fp32 = export_onnx(pipe, schema, ds.task)
    if decision is not None:  # the label every route reads is the thresholded one
        fp32 = add_threshold(fp32, decision.threshold, decision.index)
    parity = check_parity(pipe, fp32, schema, ds.task, test_num, test_cat,
                          threshold=decision.threshold if decision else None,
                          positive=positive)
    timings["export"] = lap()
    say(f"exported to ONNX ({len(fp32)} bytes); parity passed")

    calib = schema.encode_blocks(train_num[:512], train_cat[:512])
    test_batch = schema.encode_blocks(test_num, test_cat)
    val_num, val_cat, y_val = ds.take(sp.validation)
    refit = None if decision is not None else Refit(  # a threshold belongs to its model
        pipe, combine(train_num, train_cat), y_train, combine(val_num, val_cat), y_val,
        exporter(schema, ds.task, test_num, test_cat, decision, positive), seed)
    packed = compress(fp32, schema, ds.task, calibration=calib, test=test_batch, y_test=y_test,
                      tolerance=tolerance, mode=compression, refit=refit)
    variant, shipped, qreport = packed.variant, packed.data, packed.report
    compressed_from = None
    if packed.pipeline is not None and packed.fp32 is not None:
        # A refitted model ships (pruned, distilled): it is the version's model from now on,
        # on the cloud too (model_fp32, the pickle, explanations, retrains).
        pipe, compressed_from, model = packed.pipeline, model, packed.family or model
        fp32 = packed.fp32
        skl_metrics = _sklearn_scores(pipe, ds, test_x, y_test, decision, positive)
        parity = check_parity(pipe, fp32, schema, ds.task, test_num, test_cat,
                              positive=positive)
    timings["quantize"] = lap()
    say(f"compression: shipping {variant} ({len(shipped)} bytes)")
    profile = version_profile(shipped, schema, ds, sp, seed)
    timings["profile"] = lap()

    golden = _golden(shipped, schema, ds.task, test_num, test_cat)
    sk_bytes = pickle.dumps(pipe, protocol=pickle.HIGHEST_PROTOCOL)
    fp32_sha, fp32_size = registry.put_blob(fp32)
    model_sha, model_size = registry.put_blob(shipped)
    sk_sha, sk_size = registry.put_blob(sk_bytes)
    shipped_out, shipped_proba = _predict(shipped, schema, ds.task, test_batch)
    onnx_metrics = metrics.scores(ds.task, y_test, shipped_out, shipped_proba, ds.classes,
                                  positive)
    manifest: dict[str, Any] = {
        "artifacts": [
            {"role": "model", "sha256": model_sha, "size": model_size,
             "media_type": "application/onnx", "variant": variant},
            {"role": "model_fp32", "sha256": fp32_sha, "size": fp32_size,
             "media_type": "application/onnx", "variant": "fp32"},
        ],
        "schema": schema.to_json(),
        "output": {"task": ds.task, "classes": ds.classes,
                   "outputs": ["variable"] if ds.task == "regression"
                   else ["label", "probabilities"]},
        "model": {"family": model, "variant": variant,
                  **({"compressed_from": compressed_from} if compressed_from else {})},
        "metrics": {"primary": primary, "sklearn_test": skl_metrics,
                    "edge_test": onnx_metrics, "parity": parity.to_json()},
        "quantization": qreport.to_json(),  # kept for readers of older manifests
        "compression": qreport.to_json(),
        "golden": golden,
        "profile": profile,
        "training": {"source": ds.source, "target": ds.target, "data_sha256": ds.sha256,
                     "rows": len(ds), "dropped_rows": ds.dropped_rows, "split": sp.to_json()},
    }
    if ds.task == "binary" and ds.classes:  # docs/quality.md §1: the minority class
        manifest["metrics"]["positive"] = ds.classes[positive]
    manifest["training"]["mode"] = choice.to_json()
    manifest["training"]["quality"] = quality.to_json()
    if ds.task != "regression":  # docs/quality.md §2: the shipped model's probabilities
        manifest["calibration"] = calibration.record(
            calibrated, y_test, shipped_proba, pipe, test_x, positive)
        say(calibration.describe(manifest["calibration"]))
    if balance is not None:
        manifest["training"]["imbalance"] = balance
    if decision is not None:
        manifest["decision"] = decision.to_json()
    if tuned is not None:
        manifest["training"]["finetune"] = tuned.record
    if sensitive:  # FairnessError over --max-parity-gap: nothing is registered
        manifest["fairness"] = fairness.assess(
            shipped, schema, ds.task, test_batch, y_test,
            {c: v[sp.test] for c, v in sensitive.items()}, quality,
            manifest["metrics"]["primary"], ds.classes, positive)
    if gate is not None:
        manifest["gate"] = dict(gate(shipped, manifest, from_dataset(ds, sp.train)))
    metadata = {"params": _params(pipe), "family": model, "sklearn_sha256": sk_sha,
                "sklearn_size": sk_size, "seconds": timings,
                "holdout": holdout or store_holdout(registry, ds, sp.test, seed)}
    if quality.explainer:  # the device explainer artifact (docs/quality.md §3)
        explainers.attach(registry, pipe, schema, ds.task, ds.classes, manifest, metadata)
    stored = registry.create_version(name, manifest, metadata, parent=parent_version,
                                     lineage=lineage)
    timings["register"] = lap()
    log.info("registered %s v%s (%s, %s, %d bytes shipped)", name, stored["version"], model,
             variant, model_size)
    return TrainResult(stored, timings)


# -------------------------------------------------------------------------------- internals
class _Clock:
    """Per-step durations: each call returns the seconds since the previous one."""

    def __init__(self) -> None:
        self._last = time.perf_counter()

    def __call__(self) -> float:
        now = time.perf_counter()
        took, self._last = now - self._last, now
        return round(took, 3)


def _load(data: str | os.PathLike[str] | None, dataset: str | None, target: str | None,
          task: str | None, categorical: Sequence[str], numeric: Sequence[str],
          drop: Sequence[str], extras: Sequence[str] = ()) -> Dataset:
    if (data is None) == (dataset is None):
        raise ConfigError("pass exactly one of --data CSV (with --target) or --dataset NAME",
                          field="data")
    if data is not None:
        if not target:
            raise ConfigError("--data needs --target COLUMN naming the column to predict",
                              field="target")
        return load_csv(data, target, task=task, categorical=categorical, numeric=numeric,
                        drop=drop, extras=extras)
    return load_builtin(str(dataset), task=task)


def _latest(registry: Registry, name: str) -> int | None:
    try:
        return registry.resolve(name, "latest")
    except NotFoundError:  # the first version of this name
        return None


def _positive(ds: Dataset, y_train: np.ndarray, line: str | None) -> int:
    """The positive class's index of a binary task (1, unused, otherwise): the parent's
    recorded positive class when it is one of the classes (a line keeps its positive class),
    else the minority of the training rows (:func:`hybridml.cloud.metrics.positive_index`)."""
    if ds.task != "binary" or not ds.classes or len(ds.classes) != 2:
        return 1
    names = [str(c) for c in ds.classes]
    if line is not None and str(line) in names:
        return names.index(str(line))
    return metrics.positive_index(np.bincount(np.asarray(y_train, dtype=np.int64),
                                              minlength=2)[:2])


def _validation_proba(pipe: Pipeline, ds: Dataset, rows: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray]:
    """The validation rows' class indices and the fitted pipeline's probabilities."""
    num, cat, y = ds.take(rows)
    return y, pipe.predict_proba(combine(num, cat))


def _predict(model: bytes, schema: InputSchema, task: str, batch: EncodedBatch
             ) -> tuple[np.ndarray, np.ndarray | None]:
    """The shipped model's answers on ``batch``: values or labels, and the probabilities."""
    out = ModelSession(model, schema, task).run(batch)
    if out.values is not None:
        return out.values, None
    assert out.labels is not None
    return out.labels, out.probabilities


def _json_value(v: Any) -> Any:
    if isinstance(v, float) and np.isnan(v):
        return None
    if isinstance(v, (np.floating,)):
        # The shortest text that round-trips the float32 value: 5.1, not 5.099999904632568.
        return None if np.isnan(v) else float(str(np.float32(v)))
    if v == "":
        return None
    return v


def _golden(model: bytes, schema: InputSchema, task: str, num: np.ndarray,
            cat: np.ndarray) -> dict[str, Any]:
    """A few test rows with the shipped model's outputs: the edge's smoke check after sync."""
    n = min(GOLDEN_ROWS, num.shape[0])
    rows: list[list[Any]] = []
    for r in range(n):
        jn = jc = 0
        row: list[Any] = []
        for f in schema.features:
            if f.kind == NUMERIC:
                row.append(_json_value(num[r, jn]))
                jn += 1
            else:
                row.append(_json_value(cat[r, jc]))
                jc += 1
        rows.append(row)
    out = ModelSession(model, schema, task).run(schema.encode(rows))
    golden: dict[str, Any] = {"rows": rows, "tolerance": 1e-4}
    if out.values is not None:
        golden["values"] = [float(v) for v in out.values]
        golden["tolerance"] = 1e-4 * max(1.0, float(np.abs(out.values).max()))
    else:
        assert out.labels is not None and out.probabilities is not None
        golden["labels"] = [int(v) for v in out.labels]
        golden["probabilities"] = [[round(float(p), 7) for p in ps] for ps in out.probabilities]
    return golden


def _sklearn_scores(pipe: Pipeline, ds: Dataset, test_x: np.ndarray, y_test: np.ndarray,
                    decision: Any, positive: int) -> dict[str, Any]:
    """The fitted pipeline's metrics on the test rows (the decision threshold applied)."""
    proba = pipe.predict_proba(test_x) if ds.task != "regression" else None
    return metrics.scores(ds.task, y_test, threshold_labels(pipe, test_x, decision), proba,
                          ds.classes, positive)


def _params(pipe: Pipeline) -> dict[str, Any]:
    est = calibration.inner(pipe.steps[-1][1])  # the family's own parameters, for retrains
    out: dict[str, Any] = {}
    for k, v in est.get_params(deep=False).items():
        if isinstance(v, (int, float, str, bool)) or v is None:
            out[k] = v
        elif isinstance(v, tuple):
            out[k] = list(v)
    return out
