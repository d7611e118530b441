"""Training: data -> fitted pipeline -> ONNX (parity-gated) -> quantized -> registered version.

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
from hybridml.shared.errors import ConfigError, DataError, NotFoundError
from hybridml.shared.schema import NUMERIC, EncodedBatch, InputSchema

from . import metrics
from .data import Dataset, Split, fit_schema, load_builtin, load_csv, profile, split
from .export import check_parity, export_onnx
from .models import build_pipeline, combine, family
from .quantize import quantize
from .registry import Registry

log = logging.getLogger("hybridml.cloud.train")

GOLDEN_ROWS = 8
FINETUNE_EPOCHS = 5
Progress = Callable[[str], None]


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
            "artifacts": m["artifacts"], "seconds": self.seconds,
        }


def train(registry: Registry, name: str, *, data: str | os.PathLike[str] | None = None,
          dataset: str | None = None, target: str | None = None, model: str = "hgb",
          task: str | None = None, seed: int = 0, tolerance: float | None = None,
          params: Mapping[str, Any] | None = None, finetune_from: str | None = None,
          categorical: Sequence[str] = (), numeric: Sequence[str] = (),
          drop: Sequence[str] = (), progress: Progress | None = None) -> TrainResult:
    """Train, export, quantize and register a new version of ``name``.

    Exactly one of ``data`` (a CSV, with ``target``) or ``dataset`` (a bundled scikit-learn
    dataset) is required. ``finetune_from="eta:1"`` continues training that version's model on
    the new data (families with ``partial_fit``: mlp, sgd) and records lineage ``finetune``.
    """
    say = progress or (lambda _msg: None)
    timings: dict[str, float] = {}
    lap = _Clock()
    ds = _load(data, dataset, target, task, categorical, numeric, drop)
    sp = split(ds, seed)
    timings["load"] = lap()
    say(f"loaded {len(ds)} rows from {ds.source} ({ds.task}); split {sp.to_json()}")

    parent_version: int | None
    if finetune_from:
        pipe, schema, parent_version, model = _finetune(registry, finetune_from, ds, sp, say)
        lineage = "finetune"
    else:
        fam = family(model)
        kinds = [f.kind for f in ds.schema.features]
        xn, xc, y = ds.take(sp.train)
        schema = fit_schema(ds.schema.names, kinds, xn, xc)
        pipe = build_pipeline(fam.name, ds.task, schema.n_numeric, schema.n_categorical, seed,
                              params)
        say(f"fitting {fam.name} on {len(y)} rows")
        pipe.fit(combine(xn, xc), y)
        parent_version = _latest(registry, name)
        lineage = "retrain"
    timings["fit"] = lap()

    test_num, test_cat, y_test = ds.take(sp.test)
    skl_metrics = metrics.scores(ds.task, y_test, pipe.predict(combine(test_num, test_cat)))
    say(f"fitted; test {metrics.PRIMARY[ds.task]} = {skl_metrics[metrics.PRIMARY[ds.task]]}")

    fp32 = export_onnx(pipe, schema, ds.task)
    parity = check_parity(pipe, fp32, schema, ds.task, test_num, test_cat)
    timings["export"] = lap()
    say(f"exported to ONNX ({len(fp32)} bytes); parity passed")

    train_num, train_cat, _ = ds.take(sp.train)
    calib = schema.encode_blocks(train_num[:512], train_cat[:512])
    test_batch = schema.encode_blocks(test_num, test_cat)
    variant, shipped, qreport = quantize(fp32, schema, ds.task, calibration=calib,
                                         test=test_batch, y_test=y_test, tolerance=tolerance)
    timings["quantize"] = lap()
    say(f"quantization: shipping {variant} ({len(shipped)} bytes)")

    golden = _golden(shipped, schema, ds.task, test_num, test_cat)
    sk_bytes = pickle.dumps(pipe, protocol=pickle.HIGHEST_PROTOCOL)
    fp32_sha, fp32_size = registry.put_blob(fp32)
    model_sha, model_size = registry.put_blob(shipped)
    sk_sha, sk_size = registry.put_blob(sk_bytes)
    onnx_metrics = metrics.scores(ds.task, y_test, _predict(shipped, schema, ds.task, test_batch))
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
        "model": {"family": model, "variant": variant},
        "metrics": {"primary": metrics.PRIMARY[ds.task], "sklearn_test": skl_metrics,
                    "edge_test": onnx_metrics, "parity": parity.to_json()},
        "quantization": qreport.to_json(),
        "golden": golden,
        "profile": profile(schema, train_num, train_cat),
        "training": {"source": ds.source, "target": ds.target, "data_sha256": ds.sha256,
                     "rows": len(ds), "dropped_rows": ds.dropped_rows, "split": sp.to_json()},
    }
    metadata = {"params": _params(pipe), "family": model, "sklearn_sha256": sk_sha,
                "sklearn_size": sk_size, "seconds": timings}
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
          drop: Sequence[str]) -> Dataset:
    if (data is None) == (dataset is None):
        raise ConfigError("pass exactly one of --data CSV (with --target) or --dataset NAME",
                          field="data")
    if data is not None:
        if not target:
            raise ConfigError("--data needs --target COLUMN naming the column to predict",
                              field="target")
        return load_csv(data, target, task=task, categorical=categorical, numeric=numeric,
                        drop=drop)
    return load_builtin(str(dataset), task=task)


def _latest(registry: Registry, name: str) -> int | None:
    try:
        return registry.resolve(name, "latest")
    except NotFoundError:  # the first version of this name
        return None


def _predict(model: bytes, schema: InputSchema, task: str, batch: EncodedBatch) -> np.ndarray:
    out = ModelSession(model, schema, task).run(batch)
    return out.values if out.values is not None else out.labels  # type: ignore[return-value]


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


def _params(pipe: Pipeline) -> dict[str, Any]:
    est = pipe.steps[-1][1]
    out: dict[str, Any] = {}
    for k, v in est.get_params(deep=False).items():
        if isinstance(v, (int, float, str, bool)) or v is None:
            out[k] = v
        elif isinstance(v, tuple):
            out[k] = list(v)
    return out


def _finetune(registry: Registry, ref: str, ds: Dataset, sp: Split,
              say: Progress) -> tuple[Pipeline, InputSchema, int, str]:
    pname, _, pver = ref.partition(":")
    if not pname or not pver:
        raise ConfigError(f"--finetune-from {ref!r}: use NAME:VERSION, e.g. eta:1",
                          field="finetune_from")
    version = registry.resolve(pname, pver)
    meta = registry.metadata(pname, version)
    parent_manifest = registry.manifest(pname, version)
    fam = family(str(meta.get("family")))
    if not fam.finetune:
        raise ConfigError(f"{pname}:{version} is a {fam.name} model, which cannot be "
                          "fine-tuned (no partial_fit); fine-tune an mlp or sgd model, or "
                          "train from scratch", field="finetune_from")
    if parent_manifest["output"]["task"] != ds.task:
        raise DataError(f"the new data is {ds.task} but {pname}:{version} is "
                        f"{parent_manifest['output']['task']}", field="task")
    schema = InputSchema.from_json(parent_manifest["schema"])
    if [(f.name, f.kind) for f in schema.features] != \
            [(f.name, f.kind) for f in ds.schema.features]:
        raise DataError(f"the new data's columns differ from {pname}:{version}'s schema "
                        f"({', '.join(schema.names)}); fine-tuning needs the same columns",
                        field="schema")
    y_all = ds.y
    if ds.task != "regression":
        parent_classes = list(parent_manifest["output"]["classes"])
        assert ds.classes is not None
        unknown = [c for c in ds.classes if c not in parent_classes]
        if unknown:
            raise DataError(f"the new data has classes {unknown} that {pname}:{version} does "
                            "not know; retrain from scratch to add classes", field="target")
        remap = np.array([parent_classes.index(c) for c in ds.classes], dtype=np.int64)
        y_all = remap[ds.y]
        ds.y = y_all
        ds.classes = parent_classes
    pipe: Pipeline = pickle.loads(registry.blob_path(str(meta["sklearn_sha256"])).read_bytes())
    xn, xc, y = ds.take(sp.train)
    pre, est = pipe.steps[0][1], pipe.steps[-1][1]
    xt = pre.transform(combine(xn, xc))
    say(f"fine-tuning {pname}:{version} ({fam.name}) for {FINETUNE_EPOCHS} epochs on "
        f"{len(y)} rows")
    classes = np.arange(len(ds.classes)) if ds.classes else None
    for _ in range(FINETUNE_EPOCHS):
        if classes is not None:
            est.partial_fit(xt, y, classes=classes)
        else:
            est.partial_fit(xt, y)
    # The schema keeps the parent's categories (the encoder is the parent's); ranges widen.
    wider = fit_schema(schema.names, [f.kind for f in schema.features], xn, xc)
    merged = tuple(
        f if f.kind != NUMERIC else type(f)(f.name, f.kind, _min(f.min, w.min), _max(f.max, w.max))
        for f, w in zip(schema.features, wider.features))
    return pipe, InputSchema(merged), version, fam.name


def _min(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else min(a, b)


def _max(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else max(a, b)

