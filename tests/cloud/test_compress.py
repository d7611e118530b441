"""The compression guard: candidates for tree ensembles and forests, on real exports and runs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.pipeline import Pipeline

from hybridml.cloud.compress import VARIANTS, CompressionReport, compress, report_of
from hybridml.cloud.compress_refit import Refit, exporter
from hybridml.cloud.data import Dataset, fit_schema, load_csv, split
from hybridml.cloud.export import export_onnx
from hybridml.cloud.models import build_pipeline, combine
from hybridml.cloud.quantize import QuantizationReport
from hybridml.edge.session import ModelSession
from hybridml.shared.errors import ConfigError
from hybridml.shared.schema import EncodedBatch, InputSchema

V5_OK = "1.21"  # an edge floor that runs opset-5 TreeEnsemble
FIELDS = {"variant", "status", "reason", "size", "metric_value", "drop", "latency_us",
          "settings", "rss_kb", "requires_onnxruntime"}


@dataclass
class Fitted:
    """A fitted pipeline of the orders data, its export and the guard's inputs."""

    pipe: Pipeline
    fp32: bytes
    schema: InputSchema
    task: str
    ds: Dataset
    train: EncodedBatch
    test: EncodedBatch
    y_test: np.ndarray
    refit: Refit

    def run(self, **kwargs: Any) -> Any:
        return compress(self.fp32, self.schema, self.task, calibration=self.train,
                        test=self.test, y_test=self.y_test, **kwargs)


def _fit(csv: Path, family: str, target: str, params: dict[str, Any],
         y_val: np.ndarray | None = None) -> Fitted:
    other = "late" if target == "delivery_minutes" else "delivery_minutes"
    ds = load_csv(csv, target, drop=[other])
    sp = split(ds, 0)
    num, cat, y = ds.take(sp.train)
    schema = fit_schema(ds.schema.names, [f.kind for f in ds.schema.features], num, cat)
    pipe = build_pipeline(family, ds.task, schema.n_numeric, schema.n_categorical, 0, params)
    pipe.fit(combine(num, cat), y)
    tn, tc, ty = ds.take(sp.test)
    vn, vc, vy = ds.take(sp.validation)
    refit = Refit(pipe, combine(num, cat), y, combine(vn, vc), vy if y_val is None else y_val,
                  exporter(schema, ds.task, tn, tc, None, 1))
    return Fitted(pipe, export_onnx(pipe, schema, ds.task), schema, ds.task, ds,
                  schema.encode_blocks(num, cat), schema.encode_blocks(tn, tc), ty, refit)


@pytest.mark.parametrize(("family", "target", "params"), [
    ("rf", "delivery_minutes", {"n_estimators": 8}),
    ("rf", "late", {"n_estimators": 8}),
    ("gb", "late", {"n_estimators": 15}),
    ("hgb", "delivery_minutes", {"max_iter": 15}),
])
def test_trees_v5_is_smaller_and_reproduces_the_exported_outputs(
        orders_csv: Path, family: str, target: str, params: dict[str, Any]) -> None:
    f = _fit(orders_csv, family, target, params)
    variant, data, report = _unpack(f.run(min_onnxruntime=V5_OK))
    v5 = report.guard.candidate("trees_v5")
    assert v5.status in ("chosen", "accepted"), v5
    assert v5.size is not None and v5.size < 0.6 * len(f.fp32)
    assert v5.requires_onnxruntime == V5_OK
    assert variant == "trees_v5" and report.requires_onnxruntime == V5_OK
    a = ModelSession(f.fp32, f.schema, f.task).run(f.test)
    b = ModelSession(data, f.schema, f.task).run(f.test)
    if f.task == "regression":
        assert a.values is not None and b.values is not None
        np.testing.assert_allclose(b.values, a.values, rtol=1e-6, atol=1e-5)
    else:
        assert a.probabilities is not None and b.probabilities is not None
        np.testing.assert_allclose(b.probabilities, a.probabilities, atol=1e-6)
        np.testing.assert_array_equal(b.labels, a.labels)


def test_trees_v5_is_not_offered_when_the_edge_supports_an_older_onnxruntime(
        orders_csv: Path) -> None:
    f = _fit(orders_csv, "rf", "delivery_minutes", {"n_estimators": 4})
    variant, data, report = _unpack(f.run(min_onnxruntime="1.17"))
    v5 = report.guard.candidate("trees_v5")
    assert v5.status == "not_applicable" and "needs onnxruntime >= 1.21" in v5.reason
    assert (variant, data) == ("fp32", f.fp32)
    assert report.requires_onnxruntime is None and report.min_onnxruntime == "1.17"


def test_a_multiclass_forest_keeps_its_graph(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rows = ["a,b,y"] + [f"{x:.3f},{z:.3f},{'p' if x < .3 else 'q' if x < .6 else 'r'}"
                        for x, z in rng.random((200, 2))]
    (tmp_path / "three.csv").write_text("\n".join(rows) + "\n")
    ds = load_csv(tmp_path / "three.csv", "y")
    num, cat, y = ds.take(np.arange(150))
    schema = fit_schema(ds.schema.names, ["numeric", "numeric"], num, cat)
    pipe = build_pipeline("rf", "multiclass", 2, 0, 0, {"n_estimators": 3}).fit(num, y)
    tn, tc, ty = ds.take(np.arange(150, 200))
    out = compress(export_onnx(pipe, schema, "multiclass"), schema, "multiclass",
                   calibration=schema.encode_blocks(num, cat),
                   test=schema.encode_blocks(tn, tc), y_test=ty, min_onnxruntime=V5_OK)
    v5 = out.report.guard.candidate("trees_v5")
    assert v5.status == "not_applicable" and "one target per leaf" in v5.reason
    assert out.variant == "fp32"


def test_pruned_and_distilled_forests_pass_parity_and_record_every_field(
        orders_csv: Path) -> None:
    f = _fit(orders_csv, "rf", "delivery_minutes", {"n_estimators": 30})
    out = f.run(mode="aggressive", refit=f.refit, tolerance=0.05)
    got = out.report.to_json()
    assert got["mode"] == "aggressive" and got["min_onnxruntime"]
    by = {c["variant"]: c for c in got["candidates"]}
    assert set(by) <= set(VARIANTS) and {"fp32", "pruned", "distilled"} <= set(by)
    for c in got["candidates"]:
        assert set(c) == FIELDS
    for name in ("pruned", "distilled"):  # exported through the parity gate, then judged
        c = by[name]
        assert c["status"] in ("chosen", "accepted", "rejected"), c
        assert c["size"] < by["fp32"]["size"] and c["settings"]
        assert c["metric_value"] is not None and c["latency_us"] > 0
        assert c["rss_kb"] is not None
    assert by["fp32"]["rss_kb"] > by["pruned"]["rss_kb"]
    assert out.variant == got["chosen"] and by[out.variant]["status"] == "chosen"
    if out.pipeline is not None:  # a refitted winner comes with its own pipeline and export
        assert out.fp32 is not None and out.family in ("rf", "hgb")
        sk = out.pipeline.predict(f.refit.x_train[:5])
        edge = ModelSession(out.data, f.schema, f.task).run(f.train.take(np.arange(5)))
        assert edge.values is not None
        np.testing.assert_allclose(edge.values.ravel(), sk, rtol=1e-4, atol=1e-3)


def test_an_absurdly_pruned_forest_is_rejected_and_the_original_ships(
        orders_csv: Path) -> None:
    # Validation labels that the first few trees predict perfectly make a 5-tree forest look
    # flawless to the screening; on the test rows it is worse, and the guard must say no.
    f = _fit(orders_csv, "rf", "delivery_minutes", {"n_estimators": 60})
    est = f.refit.pipe.steps[-1][1]
    xt = f.refit.pipe.steps[0][1].transform(f.refit.x_val)
    fooled = np.mean([t.predict(xt) for t in est.estimators_[:5]], axis=0)
    f = _fit(orders_csv, "rf", "delivery_minutes", {"n_estimators": 60}, y_val=fooled)
    out = f.run(mode="aggressive", refit=f.refit, tolerance=0.0)
    pruned = out.report.guard.candidate("pruned")
    assert pruned.status == "rejected" and "> tolerance" in pruned.reason, pruned
    assert pruned.settings.startswith("5 of 60 trees")
    if out.report.guard.candidate("distilled").status == "rejected":
        # the original forest ships: as exported, or its exact opset-5 rewrite
        assert out.pipeline is None and out.variant in ("fp32", "trees_v5")


def test_an_old_manifest_with_only_a_quantization_report_still_reads() -> None:
    old = {"metric": "accuracy", "tolerance": 0.005, "chosen": "int8_dynamic",
           "preprocess": "quant_pre_process",
           "candidates": [{"variant": "fp32", "status": "accepted", "reason": "baseline",
                           "size": 100, "metric_value": 0.9, "drop": 0.0, "latency_us": 9.0,
                           "settings": ""},
                          {"variant": "int8_dynamic", "status": "chosen", "reason": "smallest",
                           "size": 40, "metric_value": 0.9, "drop": 0.0, "latency_us": 9.0,
                           "settings": ""}]}
    report = report_of({"quantization": old})
    assert report.chosen == "int8_dynamic" and report.requires_onnxruntime is None
    assert report.guard.candidate("fp32").rss_kb is None
    assert "compression" in report.to_table()
    # ...and a new report still parses as an old one, for readers of ``quantization``.
    new = CompressionReport.from_json({**old, "mode": "auto", "min_onnxruntime": "1.17",
                                       "requires_onnxruntime": None}).to_json()
    assert QuantizationReport.from_json(new).chosen == "int8_dynamic"


def test_unknown_compress_mode_is_a_config_error(orders_csv: Path) -> None:
    f = _fit(orders_csv, "hgb", "late", {"max_iter": 3})
    with pytest.raises(ConfigError, match="compress mode") as err:
        f.run(mode="max")
    assert err.value.details["field"] == "compress"


def _unpack(out: Any) -> tuple[str, bytes, CompressionReport]:
    return out.variant, out.data, out.report
