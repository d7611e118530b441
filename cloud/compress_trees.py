"""Rewrite exported tree ensembles into the compact ``ai.onnx.ml`` opset-5 ``TreeEnsemble``.

skl2onnx writes forests and boosted trees as ``TreeEnsembleRegressor``/``TreeEnsembleClassifier``
(ai.onnx.ml opset 1–3): every node, leaves included, carries a tree id, a node id, both child
ids, a hit rate and its mode as a *string* (``b"BRANCH_LEQ"``, ``b"LEAF"``). ``TreeEnsemble``
(opset 5) keeps child ids for interior nodes only, stores leaves in their own arrays, the modes
as one ``uint8`` each, and thresholds and leaf weights as tensors of the input's type.
:func:`to_tree_ensemble` does the rewrite in place of the old node, keeping every output name,
so the rest of the graph (thresholds, casts, the ``label``/``probabilities`` outputs) is
untouched:

* regressors: ``TreeEnsemble`` → (``Add`` of ``base_values``) → the node's output;
* classifiers whose leaves each vote for one class (binary forests, boosted trees): scores →
  (``Add`` base) → post-transform as a standard op (``Sigmoid``/``Softmax``) → probabilities
  (``[1 - p, p]`` in the binary case, as onnxruntime's classifier writes them) → ``ArgMax`` label.

A random forest over three or more classes stores a vote for *every* class at each leaf, which
opset 5 cannot express (one target per leaf) without copying each tree once per class: that
graph would be larger, so it is :class:`NotApplicable`.

float16 thresholds and leaves are valid ONNX (the input is cast to float16 first) but
onnxruntime has no float16 ``TreeEnsemble`` kernel: up to 1.32 its cast-insertion pass feeds the
node float32 and session creation fails ("Attribute 'nodes_splits' must have same type as
input"). So the rewrite keeps float32; it is exact.

onnxruntime runs ``TreeEnsemble`` from 1.21 (:data:`REQUIRES_ONNXRUNTIME`, the first release
with the kernel, microsoft/onnxruntime#22333); earlier ones refuse to load the graph.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

log = logging.getLogger("hybridml.cloud.compress_trees")

REQUIRES_ONNXRUNTIME = "1.21"
ML_DOMAIN = "ai.onnx.ml"
ML_OPSET = 5
_OLD_OPS = ("TreeEnsembleRegressor", "TreeEnsembleClassifier")
_MODES = {b"BRANCH_LEQ": 0, b"BRANCH_LT": 1, b"BRANCH_GTE": 2, b"BRANCH_GT": 3,
          b"BRANCH_EQ": 4, b"BRANCH_NEQ": 5}
_AGGREGATE = {b"AVERAGE": 0, b"SUM": 1, b"MIN": 2, b"MAX": 3}


class NotApplicable(Exception):
    """The graph has nothing this rewrite can make smaller; the message says why."""


def to_tree_ensemble(model_bytes: bytes) -> bytes:
    """Return ``model_bytes`` with every old tree node replaced by opset-5 ``TreeEnsemble``.

    Raises :class:`NotApplicable` when the graph has no tree node or one that opset 5 cannot
    hold (a leaf voting for several classes, class labels other than ``0..C-1``).
    """
    model = onnx.load_from_string(model_bytes)
    g = model.graph
    old = [n for n in g.node if n.domain == ML_DOMAIN and n.op_type in _OLD_OPS]
    if not old:
        raise NotApplicable("graph has no TreeEnsembleRegressor/TreeEnsembleClassifier node")
    new_nodes: list[onnx.NodeProto] = []
    for i, node in enumerate(g.node):
        if node in old:
            new_nodes.extend(_rewrite(node, f"hybridml_te{i}", g))
        else:
            new_nodes.append(node)
    del g.node[:]
    g.node.extend(new_nodes)
    _set_opset(model, ML_DOMAIN, ML_OPSET)
    _set_opset(model, "", max(_opset(model, ""), 13))  # Softmax over axis -1 needs 13
    return model.SerializeToString()


def has_trees(model_bytes: bytes) -> bool:
    """Whether the graph holds an old tree node :func:`to_tree_ensemble` would rewrite."""
    model = onnx.load_from_string(model_bytes)
    return any(n.domain == ML_DOMAIN and n.op_type in _OLD_OPS for n in model.graph.node)


# ------------------------------------------------------------------------------ rewriting
def _rewrite(node: onnx.NodeProto, p: str, g: onnx.GraphProto) -> list[onnx.NodeProto]:
    a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
    if any(k.endswith("_as_tensor") for k in a):
        raise NotApplicable("double-precision tree attributes (*_as_tensor) are kept as they are")
    prefix = "target" if node.op_type == "TreeEnsembleRegressor" else "class"
    leaves = _leaf_votes(a, prefix)
    n_targets = int(a.get("n_targets", 1)) if prefix == "target" else 1 + max(
        (t for v in leaves.values() for t, _ in v), default=0)
    attrs = _encode(a, leaves, n_targets)
    raw = f"{p}_raw"
    nodes = [helper.make_node("TreeEnsemble", [node.input[0]], [raw], domain=ML_DOMAIN,
                              name=f"{p}_TreeEnsemble", n_targets=n_targets, **attrs)]
    base = a.get("base_values")
    post = a.get("post_transform", b"NONE")
    if prefix == "target":
        if post != b"NONE":
            raise NotApplicable(f"regressor post_transform {post!r} is not rewritten")
        out = node.output[0]
        if base:
            g.initializer.append(numpy_helper.from_array(
                np.asarray(base, dtype=np.float32).reshape(1, -1), f"{p}_base"))
            nodes.append(helper.make_node("Add", [raw, f"{p}_base"], [out]))
        else:
            nodes.append(helper.make_node("Identity", [raw], [out]))
        return nodes
    return nodes + _classifier_tail(node, a, p, raw, n_targets, g)


def _classifier_tail(node: onnx.NodeProto, a: dict[str, Any], p: str, raw: str,
                     n_targets: int, g: onnx.GraphProto) -> list[onnx.NodeProto]:
    labels = list(a.get("classlabels_int64s") or [])
    if labels != list(range(len(labels))) or not labels:
        raise NotApplicable("class labels are not the indices 0..C-1")
    post = a.get("post_transform", b"NONE")
    base = a.get("base_values")
    binary = len(labels) == 2 and n_targets == 1
    if not binary and n_targets != len(labels):
        raise NotApplicable(f"{len(labels)} classes but leaves vote for {n_targets}")
    if binary and post == b"NONE" and float(min(a["class_weights"])) < 0:
        raise NotApplicable("binary scores with negative weights and no post_transform")
    nodes: list[onnx.NodeProto] = []
    s = raw
    if base:
        g.initializer.append(numpy_helper.from_array(
            np.asarray(base, dtype=np.float32).reshape(1, -1), f"{p}_base"))
        nodes.append(helper.make_node("Add", [raw, f"{p}_base"], [f"{p}_based"]))
        s = f"{p}_based"
    if post == b"LOGISTIC":
        nodes.append(helper.make_node("Sigmoid", [s], [f"{p}_post"]))
        s = f"{p}_post"
    elif post == b"SOFTMAX":
        nodes.append(helper.make_node("Softmax", [s], [f"{p}_post"], axis=-1))
        s = f"{p}_post"
    elif post != b"NONE":
        raise NotApplicable(f"classifier post_transform {post!r} is not rewritten")
    label, proba = node.output[0], node.output[1]
    if binary:  # onnxruntime's binary case: the one score is class 1's, [1 - p, p]
        g.initializer.append(numpy_helper.from_array(np.ones((1, 1), np.float32), f"{p}_one"))
        nodes += [helper.make_node("Sub", [f"{p}_one", s], [f"{p}_neg"]),
                  helper.make_node("Concat", [f"{p}_neg", s], [proba], axis=1)]
    else:
        nodes.append(helper.make_node("Identity", [s], [proba]))
    nodes.append(helper.make_node("ArgMax", [proba], [label], axis=1, keepdims=0))
    return nodes


def _leaf_votes(a: dict[str, Any], prefix: str) -> dict[tuple[int, int], list[tuple[int, float]]]:
    """``(tree, node) -> [(target, weight), ...]``; a leaf with several votes cannot be kept."""
    votes: dict[tuple[int, int], list[tuple[int, float]]] = defaultdict(list)
    for t, n, k, w in zip(a[f"{prefix}_treeids"], a[f"{prefix}_nodeids"], a[f"{prefix}_ids"],
                          a[f"{prefix}_weights"], strict=True):
        votes[(int(t), int(n))].append((int(k), float(w)))
    if any(len(v) > 1 for v in votes.values()):
        raise NotApplicable("leaves vote for several targets or classes (a multiclass forest); "
                            "opset 5 holds one target per leaf")
    return votes


def _encode(a: dict[str, Any], leaves: dict[tuple[int, int], list[tuple[int, float]]],
            n_targets: int) -> dict[str, Any]:
    """The opset-5 attributes: interior nodes and leaves in separate, tree-ordered arrays."""
    trees, ids, modes = a["nodes_treeids"], a["nodes_nodeids"], a["nodes_modes"]
    unknown = {m for m in modes if m != b"LEAF" and m not in _MODES}
    if unknown:
        raise NotApplicable(f"node modes {sorted(unknown)} are not rewritten")
    order = sorted(range(len(ids)), key=lambda i: (int(trees[i]), int(ids[i])))
    interior: dict[tuple[int, int], int] = {}
    leaf: dict[tuple[int, int], int] = {}
    n_slots = 0  # interior slots, one-leaf trees' stub splits included, in emission order
    for i in order:
        key = (int(trees[i]), int(ids[i]))
        if modes[i] == b"LEAF":
            leaf[key] = len(leaf)
            n_slots += key[1] == 0
        else:
            interior[key] = n_slots
            n_slots += 1
    miss = a.get("nodes_missing_value_tracks_true") or [0] * len(ids)
    feat: list[int] = []
    split: list[float] = []
    mode: list[int] = []
    t_ids: list[int] = []
    f_ids: list[int] = []
    t_leaf: list[int] = []
    f_leaf: list[int] = []
    track: list[int] = []
    roots: list[int] = []
    for i in order:
        key = (int(trees[i]), int(ids[i]))
        if key[1] == 0 and key in leaf:  # a one-leaf tree: a stub split whose branches meet
            roots.append(len(feat))
            feat.append(0)
            split.append(0.0)
            mode.append(0)
            t_ids.append(leaf[key])
            f_ids.append(leaf[key])
            t_leaf.append(1)
            f_leaf.append(1)
            track.append(0)
            continue
        if key not in interior:
            continue
        if key[1] == 0:
            roots.append(interior[key])
        feat.append(int(a["nodes_featureids"][i]))
        split.append(float(a["nodes_values"][i]))
        mode.append(_MODES[modes[i]])
        track.append(int(miss[i]))
        for child, ids_out, is_leaf in ((a["nodes_truenodeids"][i], t_ids, t_leaf),
                                        (a["nodes_falsenodeids"][i], f_ids, f_leaf)):
            ck = (key[0], int(child))
            is_leaf.append(1 if ck in leaf else 0)
            ids_out.append(leaf[ck] if ck in leaf else interior[ck])
    if len(roots) != len(set(int(t) for t in trees)):
        raise NotApplicable("a tree has no node 0 to start from")
    targets = [0] * len(leaf)
    weights = [0.0] * len(leaf)
    for key, k in leaf.items():
        if leaves.get(key):
            targets[k], weights[k] = leaves[key][0]
    if max(targets, default=0) >= n_targets:
        raise NotApplicable(f"a leaf votes for target {max(targets)} of {n_targets}")
    return {
        "aggregate_function": _AGGREGATE.get(a.get("aggregate_function", b"SUM"), 1),
        "post_transform": 0, "tree_roots": roots, "nodes_featureids": feat,
        "nodes_splits": numpy_helper.from_array(np.asarray(split, dtype=np.float32), "splits"),
        "nodes_modes": numpy_helper.from_array(np.asarray(mode, dtype=np.uint8), "modes"),
        "nodes_truenodeids": t_ids, "nodes_falsenodeids": f_ids, "nodes_trueleafs": t_leaf,
        "nodes_falseleafs": f_leaf, "nodes_missing_value_tracks_true": track,
        "leaf_targetids": targets,
        "leaf_weights": numpy_helper.from_array(np.asarray(weights, dtype=np.float32), "weights"),
    }


def _opset(model: onnx.ModelProto, domain: str) -> int:
    return next((o.version for o in model.opset_import if o.domain == domain), 0)


def _set_opset(model: onnx.ModelProto, domain: str, version: int) -> None:
    for o in model.opset_import:
        if o.domain == domain:
            o.version = version
            return
    model.opset_import.append(helper.make_opsetid(domain, version))
