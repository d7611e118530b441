"""A model that fails to run: its own error code, converted where onnxruntime is called.

The model is a real ONNX graph that onnxruntime runs for some rows and refuses for others: it
gathers from a 3-value table at the index given by the first feature, so ``a = 0, 1, 2``
answer and ``a = 7`` makes onnxruntime raise (index out of bounds) — a failure no schema check
can foresee.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper

from hybridml.edge.runtime import EdgeRuntime
from hybridml.edge.session import ModelSession
from hybridml.edge.store import LocalStore
from hybridml.shared.errors import InferenceError
from hybridml.shared.manifest import Manifest
from hybridml.shared.schema import InputSchema

SCHEMA = [{"name": "a", "kind": "numeric", "dtype": "float32", "min": 0.0, "max": 9.0},
          {"name": "b", "kind": "numeric", "dtype": "float32", "min": 0.0, "max": 9.0}]


def gather_model(nan_guard: bool = True) -> bytes:
    """num [N, 2] -> variable [N, 1] = TABLE[int(num[:, 0])]; NaN read as index 0, or
    (without ``nan_guard``) failing like any index out of bounds."""
    first = helper.make_node("Gather", ["num", "zero_i"], ["col"], axis=1)
    nan = helper.make_node("IsNaN", ["col"], ["is_nan"])
    clean = helper.make_node("Where", ["is_nan", "zero_f", "col"], ["safe"])
    idx = helper.make_node("Cast", ["safe" if nan_guard else "col"], ["idx"],
                           to=TensorProto.INT64)
    pick = helper.make_node("Gather", ["table", "idx"], ["picked"], axis=0)
    out = helper.make_node("Unsqueeze", ["picked", "axes"], ["variable"])
    nodes = [first, nan, clean, idx, pick, out] if nan_guard else [first, idx, pick, out]
    graph = helper.make_graph(
        nodes, "gather",
        [helper.make_tensor_value_info("num", TensorProto.FLOAT, [None, 2])],
        [helper.make_tensor_value_info("variable", TensorProto.FLOAT, [None, 1])],
        initializer=[
            helper.make_tensor("zero_i", TensorProto.INT64, [], [0]),
            helper.make_tensor("zero_f", TensorProto.FLOAT, [], [0.0]),
            helper.make_tensor("table", TensorProto.FLOAT, [3], [10.0, 20.0, 30.0]),
            helper.make_tensor("axes", TensorProto.INT64, [1], [1]),
        ])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


def make_store(root: Path, data: bytes) -> LocalStore:
    """A store whose active model is ``data``."""
    local = LocalStore(root).ensure()
    sha = hashlib.sha256(data).hexdigest()
    local.artifact_path(sha).write_bytes(data)
    manifest = {"format": 1, "name": "gather", "version": 1, "lineage": "retrain",
                "artifacts": [{"role": "model", "sha256": sha, "size": len(data)}],
                "schema": SCHEMA, "output": {"task": "regression"}}
    local.activate(Manifest.loads(json.dumps(manifest).encode()))
    return local


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    """A store whose active model is the gather graph."""
    return make_store(tmp_path / "store", gather_model())


def test_the_model_answers_rows_it_can_run(store: LocalStore) -> None:
    rt = EdgeRuntime(store, "gather")
    assert [p.prediction for p in rt.predict([[1, 0], [2, 5]])] == [20.0, 30.0]
    assert rt.predict([[0, 0]])[0].prediction == 10.0
    assert list(rt.predict_arrays(num=np.array([[1, 0]], dtype=np.float32)).predictions) == \
        [20.0]


def test_session_converts_onnxruntime_errors_to_inference_error(store: LocalStore) -> None:
    manifest = store.require_active("gather")
    model = manifest.artifact("model")
    assert model is not None
    session = ModelSession(store.artifact_path(model.sha256), manifest.schema, "regression")
    schema = InputSchema.from_json(SCHEMA)
    with pytest.raises(InferenceError) as err:
        session.run(schema.encode([[7, 0]]))
    assert err.value.code == "inference_failed" and err.value.status == 500
    assert "failed to run" in err.value.message


@pytest.mark.parametrize("rows", [[[7, 0]], [[1, 0], [7, 0]]], ids=["one row", "batch"])
def test_failed_local_inference_without_a_cloud_raises_its_own_error(
        store: LocalStore, rows: list[list[int]]) -> None:
    rt = EdgeRuntime(store, "gather")
    with pytest.raises(InferenceError) as err:
        rt.predict(rows)
    assert err.value.code == "inference_failed"
    assert "local inference failed" in err.value.message
    with pytest.raises(InferenceError):
        rt.predict_arrays(num=np.array(rows, dtype=np.float32))
    # The runtime keeps working for rows the model can run.
    assert rt.predict([[2, 0]])[0].prediction == 30.0


def test_a_model_that_fails_on_missing_values_still_loads_and_answers_the_rest(
        tmp_path: Path) -> None:
    # The warm-up row is all missing; this model cannot run it. Warming is an optimisation:
    # the runtime loads, answers rows it can run, and says what failed for the others.
    store = make_store(tmp_path / "store", gather_model(nan_guard=False))
    rt = EdgeRuntime(store, "gather")
    assert rt.predict([[2, 0]])[0].prediction == 30.0
    with pytest.raises(InferenceError):
        rt.predict([[None, 0]])
