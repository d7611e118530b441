"""The edge's three prediction paths give the same answers, and the fast helpers under them
equal the plain numpy they replace.

* ``rt.predict([row])`` takes the single-row fast path (:class:`~hybridml.edge.fastpath.RowPath`),
  which defers to the general path for anything unusual;
* ``rt.predict([row, row])`` takes the general path (schema encode, table, model, policy);
* ``rt.predict_arrays(num=..., cat=...)`` takes the columnar path (:mod:`hybridml.edge.columnar`).

Rows come from hypothesis and mix in-range and out-of-range numbers, ints, NaN, -0.0, None,
denormals, values near and past float32's limits, numpy scalars, bools, known, unseen, missing
and non-string categories, and rows the precomputed table holds (spelled several ways). The
runtimes have no cloud, so every row the fallback policy flags comes back ``degraded``.
"""

from __future__ import annotations

import contextlib
import csv
import math
import shutil
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from hybridml.cloud.registry import Registry
from hybridml.cloud.train import train
from hybridml.edge.columnar import BatchPrediction
from hybridml.edge.fallback import FallbackPolicy
from hybridml.edge.loaded import PROBE_EVERY, SAMPLE_ROWS, LoadedVersion, TableCost
from hybridml.edge.runtime import EdgeRuntime, Prediction
from hybridml.edge.store import LocalStore
from hybridml.shared.errors import InputError
from hybridml.shared.manifest import Manifest
from hybridml.shared.schema import (
    MISSING_CATEGORY,
    NUMERIC,
    UNSEEN_CODE,
    InputSchema,
    category_codes,
    column_bounds,
)
from tests.conftest import write_orders_csv
from tests.integration.conftest import LATE_FEATURES, attach_table, frequent_rows

MODELS = ("iris", "wine", "late", "eta")
POLICIES = {"all_on": FallbackPolicy(), "min_conf": FallbackPolicy(min_confidence=0.9)}
# (model in the store, table kept) for each runtime variant the property tests run against.
VARIANTS = {"iris": ("iris", True), "wine": ("wine", True), "late": ("late", True),
            "eta": ("eta", True), "late_no_table": ("late", False)}
PROPERTY = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
F32_MAX = float(np.finfo(np.float32).max)
# A Python float NaN with a payload and the sign bit set: not the canonical NaN's bits.
ODD_NAN = struct.unpack("<d", b"\x01\x00\x00\x00\x00\x00\xf8\xff")[0]


@dataclass
class Model:
    """What the row strategies need to know about one stored model."""

    schema: InputSchema
    hits: list[list[Any]]  # rows the table holds, typed, in schema order


class Edge:
    """The offline store and what each model's table holds."""

    def __init__(self, root: Path, models: dict[str, Model]) -> None:
        self.root, self.models = root, models

    def __repr__(self) -> str:  # hypothesis prints the fixtures of a failing example: keep short
        return f"Edge({self.root})"


# --------------------------------------------------------------------------------- fixture
def _typed(text: str, kind: str) -> Any:
    """A CSV text cell as the Python value a caller would send."""
    if kind != NUMERIC:
        return text
    if text == "":
        return None
    return int(text) if text.lstrip("-").isdigit() else float(text)


def _write_log(path: Path, names: Sequence[str], rows: Sequence[Sequence[str]]) -> Path:
    """A request log: row ``i`` of ``rows`` is requested ``len(rows) - i`` times."""
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(names)
        for i, r in enumerate(rows):
            for _ in range(len(rows) - i):
                w.writerow(r)
    return path


def _dataset_rows(name: str, k: int) -> list[list[str]]:
    from sklearn import datasets

    data = getattr(datasets, f"load_{name}")().data
    return [[repr(float(v)) for v in row] for row in data[:k]]


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Edge:
    """An offline store with iris and wine (numeric), late (logreg) and eta (hgb), each with
    a precomputed table that also holds an out-of-range row and (late, eta) an unseen one."""
    root = tmp_path_factory.mktemp("paths_agree")
    reg = Registry(root / "reg")
    orders = write_orders_csv(root / "orders.csv", n=300)
    train(reg, "iris", dataset="iris", model="logreg")
    train(reg, "wine", dataset="wine", model="logreg")
    train(reg, "late", data=orders, target="late", model="logreg", drop=["delivery_minutes"])
    train(reg, "eta", data=orders, target="delivery_minutes", model="hgb", drop=["late"],
          params={"max_iter": 20})
    logs: dict[str, list[list[str]]] = {}
    orders_rows = [[r[c] for c in LATE_FEATURES] for r in frequent_rows(orders, k=20)]
    # Rows the policy flags can be table hits too: an unseen restaurant, an hour past 22.
    orders_rows += [["r999", "12", "3.0", "no", "2"], ["r001", "30", "3.0", "yes", "2"]]
    logs["late"] = logs["eta"] = orders_rows
    for name in ("iris", "wine"):
        rows = _dataset_rows(name, 30)
        rows.append(["100.0", *rows[0][1:]])
        logs[name] = rows
    models: dict[str, Model] = {}
    local = LocalStore(root / "store").ensure()
    for name in MODELS:
        schema = InputSchema.from_json(reg.manifest(name)["schema"])
        assert list(schema.names) == LATE_FEATURES or name in ("iris", "wine")
        log_csv = _write_log(root / f"{name}_log.csv", schema.names, logs[name])
        attach_table(reg, name, log_csv, top=50)
        manifest = reg.manifest(name)
        for art in manifest["artifacts"]:
            shutil.copyfile(reg.blob_path(art["sha256"]), local.artifact_path(art["sha256"]))
        local.activate(Manifest.from_json(manifest))
        kinds = [f.kind for f in schema.features]
        hits = [[_typed(v, k) for v, k in zip(r, kinds)] for r in logs[name]]
        models[name] = Model(schema, hits)
    reg.close()
    return Edge(local.root, models)


class Runtimes(dict[tuple[str, str], EdgeRuntime]):
    """Runtimes by (variant, policy), with a short repr for hypothesis' failure reports."""

    def __repr__(self) -> str:
        return f"Runtimes({len(self)})"


def _runtime(edge: Edge, variant: str, policy: str) -> EdgeRuntime:
    model, keep_table = VARIANTS[variant]
    rt = EdgeRuntime(edge.root, model, policy=POLICIES[policy])
    assert rt.client is None and rt.table is not None
    if not keep_table:
        rt.table = None
    return rt


@pytest.fixture(scope="module")
def runtimes(edge: Edge) -> Runtimes:
    """One offline runtime per (variant, policy), shared by the property tests."""
    return Runtimes({(v, p): _runtime(edge, v, p) for v in VARIANTS for p in POLICIES})


# ------------------------------------------------------------------------------ strategies
def _f32(x: float) -> float:
    return float(np.float32(x))


def _near(x: float) -> list[float]:
    """``x`` and its float32 and float64 neighbours."""
    f, inf = np.float32(x), np.float32(np.inf)
    return [x, float(np.nextafter(f, -inf)), float(np.nextafter(f, inf)),
            math.nextafter(x, -math.inf), math.nextafter(x, math.inf)]


def number_edges(lo: float, hi: float) -> list[Any]:
    """Odd values a numeric column accepts, in and out of the training range ``[lo, hi]``."""
    return [*_near(lo), *_near(hi), (lo + hi) / 2, 0.0, -0.0, 1e-40, -1e-40, 1e30, -1e30,
            F32_MAX, -F32_MAX, 3.4028235e38, math.nan, -math.nan, ODD_NAN, None, 2**24 + 1,
            2**70 + 1, -(2**53) - 1, math.floor(lo), math.ceil(hi) + 1, np.float32("nan"),
            np.float64("nan"), np.float16(1.5), np.float32(-0.0), np.uint8(3),
            np.float32(hi), np.float64(lo), np.int64(math.ceil(hi)), np.int32(-3)]


def good_numbers(lo: float, hi: float) -> st.SearchStrategy[Any]:
    """Values a numeric column accepts: in and out of the training range, missing, odd."""
    return st.one_of(
        st.sampled_from(number_edges(lo, hi)),
        st.floats(lo, hi),
        st.floats(width=32, allow_infinity=False),
        st.integers(math.floor(lo) - 2, math.ceil(hi) + 2),
        st.integers(-(2**70), 2**70),
        st.floats(lo, hi, width=32).map(np.float32),
        st.floats(allow_nan=True, allow_infinity=False, width=32).map(np.float64),
        st.integers(-(2**63), 2**63 - 1).map(np.int64),
        st.integers(-(2**31), 2**31 - 1).map(np.int32),
    )


BAD_NUMBERS: list[Any] = [
    1e39, -1e39, 3.4028235677973366e38, math.inf, -math.inf, 10**400, -(10**400), 2**128,
    True, False, np.bool_(True), np.float64("inf"), np.float64(1e39), "3.5", b"1", [1.0], 1j,
]


def category_edges(known: Sequence[str]) -> list[Any]:
    """Values a categorical column accepts besides its known ones: missing, unseen, str
    subclasses."""
    return [None, MISSING_CATEGORY, "R001", "yes ", "\x00", "größe", "r999",
            *(np.str_(c) for c in known)]


def good_categories(known: Sequence[str]) -> st.SearchStrategy[Any]:
    """Values a categorical column accepts: known, missing, unseen, str subclasses."""
    return st.one_of(st.sampled_from(list(known)), st.sampled_from(category_edges(known)),
                     st.text(max_size=4))


BAD_CATEGORIES: list[Any] = [0, 1.5, math.nan, b"r001", True, ["r001"], np.int64(1)]


def _bounds(schema: InputSchema, j: int) -> tuple[float, float]:
    f = schema.features[j]
    return (-1e3 if f.min is None else _f32(f.min)), (1e3 if f.max is None else _f32(f.max))


def _value(schema: InputSchema, j: int, good: bool) -> st.SearchStrategy[Any]:
    f = schema.features[j]
    if f.kind == NUMERIC:
        return good_numbers(*_bounds(schema, j)) if good else st.sampled_from(BAD_NUMBERS)
    return good_categories(f.categories) if good else st.sampled_from(BAD_CATEGORIES)


def spellings(value: Any, kind: str) -> list[Any]:
    """Spellings of a table row's value that give the same key."""
    if kind != NUMERIC:
        return [MISSING_CATEGORY, None] if value == MISSING_CATEGORY else [value, np.str_(value)]
    if value is None:
        return [None, math.nan, -math.nan, np.float64("nan"), np.float32("nan")]
    ways = [value, float(value), np.float64(value), np.float32(value)]
    if float(value).is_integer():
        ways += [int(value), np.int64(int(value))]
    return ways


def _respell(value: Any, kind: str) -> st.SearchStrategy[Any]:
    return st.sampled_from(spellings(value, kind))


def _shape(values: list[Any], names: Sequence[str], form: str) -> Any:
    if form == "list":
        return values
    if form == "tuple":
        return tuple(values)
    return dict(zip(names, values))


def random_rows(model: Model, n: int, seed: int) -> list[Any]:
    """``n`` valid rows from a seeded generator (hypothesis shrinks 200-row lists poorly):
    table rows respelled, and rows of in-range numbers mixed with :func:`number_edges` and
    known, missing and unseen categories; as dicts, lists and tuples."""
    rng = np.random.default_rng(seed)
    schema = model.schema
    kinds = [f.kind for f in schema.features]

    def pick(seq: Sequence[Any]) -> Any:
        return seq[int(rng.integers(len(seq)))]

    out = []
    for _ in range(n):
        if rng.random() < 0.3:
            values = [pick(spellings(v, k)) for v, k in zip(pick(model.hits), kinds)]
        else:
            values = []
            for j, f in enumerate(schema.features):
                if f.kind == NUMERIC:
                    lo, hi = _bounds(schema, j)
                    values.append(float(rng.uniform(lo, hi)) if rng.random() < 0.7
                                  else pick(number_edges(lo, hi)))
                else:
                    values.append(pick(f.categories) if rng.random() < 0.8
                                  else pick(category_edges(f.categories)))
        out.append(_shape(values, schema.names, pick(["dict", "list", "tuple"])))
    return out


@st.composite
def values_in_order(draw: st.DrawFn, model: Model, valid: bool = False) -> list[Any]:
    """A row's values in schema order: a table row (respelled, maybe with one cell changed)
    or generated values; unless ``valid``, sometimes with one value the schema refuses."""
    schema = model.schema
    kinds = [f.kind for f in schema.features]
    n = len(kinds)
    if draw(st.booleans()):
        base = draw(st.sampled_from(model.hits))
        values = [draw(_respell(v, k)) for v, k in zip(base, kinds)]
        if draw(st.sampled_from([False, False, True])):
            j = draw(st.integers(0, n - 1))
            values[j] = draw(_value(schema, j, True))
    else:
        values = [draw(_value(schema, j, True)) for j in range(n)]
    if not valid and draw(st.sampled_from([False, False, False, True])):
        j = draw(st.integers(0, n - 1))
        values[j] = draw(_value(schema, j, False))
    return values


@st.composite
def rows(draw: st.DrawFn, model: Model, valid: bool = False) -> Any:
    """A row as a dict (schema order or shuffled), list or tuple; unless ``valid``, sometimes
    with a column missing, an extra column or the wrong number of values."""
    values = draw(values_in_order(model, valid))
    names = list(model.schema.names)
    form = draw(st.sampled_from(["dict", "shuffled", "list", "tuple", "broken"] if not valid
                                else ["dict", "shuffled", "list", "tuple"]))
    if form == "shuffled":
        order = draw(st.permutations(range(len(names))))
        return {names[j]: values[j] for j in order}
    if form != "broken":
        return _shape(values, names, form)
    how = draw(st.sampled_from(["drop", "extra", "short", "long"]))
    if how == "drop":
        return dict(zip(names[1:], values[1:]))
    if how == "extra":
        return {**dict(zip(names, values)), "extra": 1.0}
    return values[:-1] if how == "short" else [*values, 1.0]


# --------------------------------------------------------------------------------- helpers
class Near:
    """Probabilities that compare equal within ``TOL``, NaN equal to NaN.

    onnxruntime computes one row with another float32 kernel than a batch (a matrix-vector
    product instead of a matrix product), so ``LinearClassifier``'s softmax for the same row
    can differ in the 7th digit, and after rounding to 6 digits by 1e-6 — between batch sizes,
    not between our paths (two rows through the general path differ from one the same way).
    The logits are sums of products with the inputs, so that rounding grows with them: an iris
    row with a 13,148 cm petal differs by 3.1e-6 between one row and two (measured with the
    session alone). :meth:`inputs` scales the tolerance to the row being compared.
    NaN appears when a model overflows on values near float32's limit.
    """

    TOL = 2e-6
    scale = 1.0  # of TOL, for the row under comparison (:meth:`inputs`)

    def __init__(self, probs: dict[str, float]) -> None:
        self.probs = probs

    @classmethod
    @contextlib.contextmanager
    def inputs(cls, row: Any) -> Iterator[None]:
        """Compare with a tolerance grown in proportion to the row's largest number past 1000."""
        cells = row.values() if isinstance(row, dict) else row
        numbers = [v for v in cells if isinstance(v, (int, float)) and not isinstance(v, bool)]
        big = max([abs(v) if isinstance(v, float) else min(abs(v), 10**40) for v in numbers
                   if v == v] or [0])
        cls.scale = max(1.0, float(big) / 1000.0)  # rows past float32 are refused anyway
        try:
            yield
        finally:
            cls.scale = 1.0

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Near) or self.probs.keys() != other.probs.keys():
            return False
        tol = self.TOL * Near.scale
        return all((a != a and b != b) or abs(a - b) <= tol
                   for a, b in ((self.probs[k], other.probs[k]) for k in self.probs))

    def __repr__(self) -> str:
        return f"Near({self.probs!r})"


def _same_nan(probs: dict[str, float] | None) -> Near | None:
    return None if probs is None else Near(probs)


def answer(p: Prediction) -> tuple[Any, ...]:
    """Every field a caller sees, probabilities as the rounded dict."""
    return (p.prediction, p.source, p.model_version, p.degraded, p.reason,
            _same_nan(p.probabilities), p.error)


def outcome(call: Callable[[], list[Prediction]]) -> tuple[Any, ...]:
    """The first answer of ``call()``, or the InputError it raised (field, row, message)."""
    try:
        return ("answer", answer(call()[0]))
    except InputError as err:
        return ("InputError", err.field, err.row, err.message)


def cells(schema: InputSchema, row: Any) -> list[Any]:
    """A valid row's values in schema order."""
    return [row[n] for n in schema.names] if isinstance(row, dict) else list(row)


def to_arrays(schema: InputSchema, rows: Sequence[Any]) -> tuple[np.ndarray, np.ndarray | None]:
    """``num`` as the schema encodes it; ``cat`` by hand in schema order, keeping None and
    str subclasses as the caller sent them."""
    num = schema.encode(rows).num
    if not schema.n_categorical:
        return num, None
    at = [schema.names.index(n) for n in schema.categorical_names]
    cat = np.empty((len(rows), len(at)), dtype=object)
    for i, row in enumerate(rows):
        values = cells(schema, row)
        for k, j in enumerate(at):
            cat[i, k] = values[j]
    return num, cat


def batch_answers(bp: BatchPrediction) -> list[tuple[Any, ...]]:
    """The columnar answer as (prediction, source, version, degraded, reason, probabilities)."""
    preds = bp.predictions
    out = []
    for i in range(len(bp)):
        pred = preds[i] if bp.labels is not None else float(preds[i])
        probs = None if bp.probabilities is None else \
            {str(c): round(float(p), 6) for c, p in zip(bp.classes, bp.probabilities[i])}
        out.append((pred, str(bp.source[i]), bp.model_version, bool(bp.degraded[i]),
                    bp.reason[i], _same_nan(probs), None))
    return out


def _v(rt: EdgeRuntime) -> LoadedVersion:
    v = rt.loaded
    assert v is not None
    return v


def skip_table(rt: EdgeRuntime) -> None:
    """Costs that make every batch skip the table (no probe for PROBE_EVERY - 1 batches)."""
    _v(rt).cost = TableCost(lookup=1.0, model=1e-9, hit_rate=0.0, batches=1)


# ------------------------------------------------------------------- one row, three paths
@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("variant", list(VARIANTS))
@PROPERTY
@given(data=st.data())
def test_single_row_fast_path_answers_like_the_general_and_columnar_paths(
        edge: Edge, runtimes: Runtimes, variant: str, policy: str, data: st.DataObject) -> None:
    rt = runtimes[(variant, policy)]
    model = edge.models[VARIANTS[variant][0]]
    row = data.draw(rows(model), label="row")
    one = outcome(lambda: rt.predict([row]))
    general = outcome(lambda: rt.predict([row, row]))
    with Near.inputs(row):
        assert one == general
    if one[0] != "answer":
        return
    _v(rt).cost = TableCost()  # a fresh cost looks the whole batch up
    num, cat = to_arrays(model.schema, [row])
    columnar = batch_answers(rt.predict_arrays(num=num, cat=cat))[0]
    with Near.inputs(row):
        assert columnar == one[1]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fast_path_answers_plain_rows_and_table_hits_itself(
        edge: Edge, runtimes: Runtimes, variant: str) -> None:
    # The property above is only worth something if the fast path does answer rows itself.
    rt = runtimes[(variant, "all_on")]
    fast = _v(rt).fast
    assert fast is not None
    answered = {"precomputed": 0, "edge": 0}
    for hit in edge.models[VARIANTS[variant][0]].hits:
        plain = [v + 0.001 if isinstance(v, float) else v for v in hit]
        for row in (hit, plain):
            if rt.predict([row, row])[0].degraded:
                continue  # flagged rows go to the general path
            got = fast.predict(list(row))
            assert got is not None
            # Probabilities are compared by the property test; here: that it answers at all.
            assert answer(got)[:5] == answer(rt.predict([row, row])[0])[:5]
            answered[got.source] += 1
    assert answered["edge"] > 0
    assert (answered["precomputed"] > 0) == (rt.table is not None)


@pytest.mark.parametrize("policy", list(POLICIES))
def test_flagged_rows_come_back_degraded_with_a_reason_on_both_row_paths(
        edge: Edge, runtimes: Runtimes, policy: str) -> None:
    rt = runtimes[("late", policy)]
    hits = edge.models["late"].hits  # the last two: an unseen restaurant, an hour past 22
    # Every unseen category has one code: "r777" finds the table row logged for "r999".
    cases = [("unseen_category", ["r777", 13, 3.0, "no", 2], "edge"),
             ("unseen_category", ["r777", 12, 3.0, "no", 2], "precomputed"),
             ("unseen_category", hits[-2], "precomputed"),
             ("out_of_range", hits[-1], "precomputed"),
             ("out_of_range", ["r001", 12, 99.0, "no", 2], "edge")]
    for reason, row, source in cases:
        for p in (rt.predict([row])[0], rt.predict([row, row])[1]):
            assert (p.degraded, p.reason, p.source) == (True, reason, source)
    answers = rt.predict(hits[:-2])
    low = [p for p in answers if p.reason == "low_confidence"]
    assert all(p.degraded for p in low)
    assert bool(low) == (policy == "min_conf")
    for row, p in zip(hits[:-2], answers):
        assert answer(rt.predict([row])[0]) == answer(p)


# ----------------------------------------------------------------------- batches, columnar
@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_predict_arrays_equals_predict_on_a_batch_of_valid_rows(
        edge: Edge, runtimes: Runtimes, variant: str, policy: str, seed: int) -> None:
    rt = runtimes[(variant, policy)]
    model = edge.models[VARIANTS[variant][0]]
    batch = random_rows(model, 200, seed)
    expected = [answer(p) for p in rt.predict(batch)]
    sources = {e[1] for e in expected}
    assert sources == ({"edge", "precomputed"} if rt.table is not None else {"edge"})
    num, cat = to_arrays(model.schema, batch)
    _v(rt).cost = TableCost()
    got = rt.predict_arrays(num=num, cat=cat)
    assert batch_answers(got) == expected
    # Skipping the table changes only where the answers come from.
    skip_table(rt)
    skipped = rt.predict_arrays(num=num, cat=cat)
    assert list(skipped.source) == ["edge"] * len(batch)
    _assert_same_answers(got, skipped)


def _assert_same_answers(a: BatchPrediction, b: BatchPrediction) -> None:
    """Equal labels, reasons and degraded flags; probabilities or values within 1e-6 (a
    table holds the model's answers computed in another batch)."""
    if a.labels is not None:
        assert b.labels is not None and list(a.predictions) == list(b.predictions)
        assert a.probabilities is not None and b.probabilities is not None
        np.testing.assert_allclose(a.probabilities, b.probabilities, rtol=0, atol=1e-6)
    else:
        assert a.values is not None and b.values is not None
        np.testing.assert_allclose(a.values, b.values, rtol=0, atol=1e-6)
    assert list(a.reason) == list(b.reason) and list(a.degraded) == list(b.degraded)


def test_predict_arrays_on_an_empty_batch_answers_nothing(runtimes: Runtimes) -> None:
    for variant in ("iris", "late", "eta"):
        rt = runtimes[(variant, "all_on")]
        schema = rt.manifest.schema  # type: ignore[union-attr]
        cat = np.empty((0, schema.n_categorical), dtype=object) if schema.n_categorical \
            else None
        out = rt.predict_arrays(num=np.empty((0, schema.n_numeric), np.float32), cat=cat)
        assert len(out) == 0 and list(out.predictions) == [] and list(out.source) == []
        assert rt.predict([]) == []


def _cat_with(value: Any) -> np.ndarray:
    cat = np.empty((2, 2), dtype=object)
    cat[:] = [["r001", "no"], ["r002", "yes"]]
    cat[1, 0] = value
    return cat


LATE_NUM = np.array([[12, 3.0, 2], [13, 4.0, 3]], dtype=np.float32)
# (case id, model, num, cat, field the InputError names ("a|b": either), row it names)
BAD_ARRAYS: list[tuple[str, str, Any, Any, str, int | None]] = [
    ("num too wide", "iris", np.zeros((3, 5)), None, "num", None),
    ("num too narrow", "late", np.zeros((2, 2)), _cat_with("r003"), "num", None),
    ("num 1-D", "iris", np.zeros(4), None, "num", None),
    ("num 3-D", "iris", np.zeros((2, 4, 1)), None, "num", None),
    ("num missing", "iris", None, None, "num", None),
    ("cat missing for a mixed model", "late", LATE_NUM, None, "cat", None),
    ("cat too wide", "late", LATE_NUM, np.full((2, 3), "no", dtype=object), "cat", None),
    ("cat rows differ from num rows", "late", LATE_NUM, np.full((3, 2), "no", dtype=object),
     "cat", None),
    ("cat 1-D", "late", LATE_NUM, np.array(["r001", "no"], dtype=object), "cat", None),
    ("int in cat", "late", LATE_NUM, _cat_with(0), "restaurant", 1),
    ("float NaN in cat", "late", LATE_NUM, _cat_with(math.nan), "restaurant", 1),
    ("bytes in cat", "late", LATE_NUM, _cat_with(b"r001"), "restaurant", 1),
    ("bool in cat", "late", LATE_NUM, _cat_with(True), "restaurant", 1),
    ("list in cat", "late", LATE_NUM, _cat_with(["r001"]), "restaurant", 1),
    ("dict in cat", "late", LATE_NUM, _cat_with({"r": "r001"}), "restaurant", 1),
    ("inf in num", "iris", [[5.1, 3.5, 1.4, 0.2], [5.1, math.inf, 1.4, 0.2]], None,
     "sepal_width_cm", 1),
    ("-inf in num of a mixed model", "late", [[12, 3.0, 2], [13, 4.0, -math.inf]],
     _cat_with("r003"), "items", 1),
    ("past float32 in num", "iris", np.array([[1e39, 3.5, 1.4, 0.2]]), None, "sepal_length_cm",
     0),
    ("inf with an unseen category", "late", [[12, 3.0, 2], [math.inf, 4.0, 3]],
     _cat_with("r999"), "hour", 1),
    ("text in num", "iris", [[5.1, "wide", 1.4, 0.2]], None, "sepal_width_cm", 0),
    ("numeric text in num", "iris", [[5.1, "3", 1.4, 0.2]], None, "sepal_width_cm", 0),
    ("bool in num", "iris", [[True, 3.5, 1.4, 0.2]], None, "sepal_length_cm", 0),
    ("bool array as num", "iris", np.ones((2, 4), dtype=bool), None, "sepal_length_cm", 0),
    ("text array as num", "iris", np.array([["5.1", "3.5", "1.4", "0.2"]]), None,
     "sepal_length_cm", 0),
    ("lone surrogate in cat", "late", LATE_NUM, _cat_with("\ud800"), "restaurant", 1),
    ("cat error before a later inf", "late", [[12, 3.0, 2], [13, 4.0, 3], [math.inf, 1, 1]],
     np.array([["r001", "no"], [7, "no"], ["r001", "no"]], dtype=object), "restaurant", 1),
]


@pytest.mark.parametrize(("model", "num", "cat", "field", "row"),
                         [c[1:] for c in BAD_ARRAYS], ids=[c[0] for c in BAD_ARRAYS])
def test_predict_arrays_refuses_bad_arrays_with_an_input_error(
        runtimes: Runtimes, model: str, num: Any, cat: Any, field: str,
        row: int | None) -> None:
    rt = runtimes[(model, "all_on")]
    with pytest.raises(InputError) as err:
        rt.predict_arrays(num=num, cat=cat)
    accepted = field.split("|")
    assert err.value.code == "bad_input" and err.value.field in accepted
    assert str(err.value.field) in err.value.message
    if err.value.field == accepted[0]:  # an alternative may name a row the first does not
        assert err.value.row == row


# -------------------------------------------------------------------- schema fast helpers
@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(num=hnp.arrays(
    np.float32,
    st.tuples(st.integers(0, 1100), st.integers(1, 70)),
    elements=st.floats(width=32, allow_nan=True, allow_infinity=True),
    fill=st.sampled_from([np.nan, 0.0, -0.0, 1.0, -np.inf, np.inf, 3e38, -1e-40])),
    fortran=st.booleans())
def test_column_bounds_equal_numpy_nan_ignoring_reductions(num: np.ndarray,
                                                            fortran: bool) -> None:
    if fortran:
        num = np.asfortranarray(num)
    lo, hi = column_bounds(num)
    with np.errstate(invalid="ignore"):  # numpy warns on all-NaN columns
        want_lo = np.fmin.reduce(num, axis=0) if len(num) else np.full(num.shape[1], np.nan)
        want_hi = np.fmax.reduce(num, axis=0) if len(num) else np.full(num.shape[1], np.nan)
    assert lo.shape == hi.shape == (num.shape[1],)
    assert lo.dtype == hi.dtype == np.float32
    np.testing.assert_array_equal(lo, want_lo)
    np.testing.assert_array_equal(hi, want_hi)


def test_column_bounds_of_edge_shapes() -> None:
    nan = np.float32(np.nan)
    for shape in ((0, 1), (0, 9), (1, 1), (1, 9), (7, 1), (2049, 9), (300, 70), (2048, 1)):
        num = np.arange(math.prod(shape), dtype=np.float32).reshape(shape) - 5
        num[::3] = nan
        if shape[0]:
            num[:, -1] = nan  # an all-NaN column
            num[-1, 0] = -np.inf
        lo, hi = column_bounds(num)
        if shape[0]:
            np.testing.assert_array_equal(lo, np.fmin.reduce(num, axis=0))
            np.testing.assert_array_equal(hi, np.fmax.reduce(num, axis=0))
        else:
            assert np.isnan(lo).all() and np.isnan(hi).all() and lo.shape == (shape[1],)


def _late_schema(edge: Edge) -> InputSchema:
    return edge.models["late"].schema


@settings(max_examples=100, deadline=None)
@given(picks=st.lists(st.tuples(st.sampled_from(["r000", "r001", "r004", "r9", "", "R001"]),
                                st.sampled_from(["", "no", "yes", "maybe"])),
                      min_size=0, max_size=40),
       num=st.lists(st.floats(-5, 30, width=32), min_size=3, max_size=3))
def test_lazy_codes_equal_eager_codes_and_unseen_rows_are_named(
        edge: Edge, picks: list[tuple[str, str]], num: list[float]) -> None:
    schema = _late_schema(edge)
    known = [set(f.categories) for f in schema.features if f.kind != NUMERIC]
    n = len(picks)
    cat = np.empty((n, 2), dtype=object)
    for i, pair in enumerate(picks):
        cat[i] = pair
    nums = np.tile(np.array(num, dtype=np.float32), (n, 1))
    batch = schema.encode_arrays(nums, cat)
    eager = category_codes(cat, schema._cat_index)
    assert np.array_equal(batch.codes, eager) and batch.codes.dtype == np.int32
    unseen = np.array([p[0] not in known[0] or p[1] not in known[1] for p in picks], dtype=bool)
    assert np.array_equal(batch.unseen, unseen)
    assert np.array_equal(batch.unseen, (eager == UNSEEN_CODE).any(axis=1))
    with np.errstate(invalid="ignore"):
        oor = ((nums < schema._lo) | (nums > schema._hi)).any(axis=1)
    assert np.array_equal(batch.out_of_range, oor)
    if batch.clean:
        assert not unseen.any() and not oor.any()
    if unseen.any():
        assert not batch.clean
    # Keys from lazy codes equal keys from a batch built with the eager codes.
    sub = batch.take(np.arange(n)[::-1])
    assert np.array_equal(sub.codes, eager[::-1])
    if n:
        encoded = schema.encode([[c[0], *num[:2], c[1], num[2]] for c in picks])
        assert np.array_equal(schema.keys(batch), schema.keys(encoded))


def test_encoded_batch_with_an_unseen_category_is_not_clean(edge: Edge) -> None:
    schema = _late_schema(edge)
    plain = [["r001", 12, 3.0, "no", 2]] * 20
    clean = schema.encode(plain)
    assert clean.clean and clean._codes is None and not clean.unseen.any()
    assert np.array_equal(clean.codes, category_codes(clean.cat, schema._cat_index))
    dirty = schema.encode([*plain[:5], ["r042", 12, 3.0, "no", 2], *plain[5:12],
                           ["r001", 12, 3.0, "hail", 2], *plain[12:]])
    assert not dirty.clean
    assert np.flatnonzero(dirty.unseen).tolist() == [5, 13]
    assert dirty.codes[5, 0] == UNSEEN_CODE and dirty.codes[13, 1] == UNSEEN_CODE


# ---------------------------------------------------------------------- table cost, probe
def test_table_cost_plans_all_then_skips_and_probes_every_probe_every_batches() -> None:
    assert TableCost().plan(200) == "all"  # nothing measured yet
    cheap = TableCost(lookup=1e-7, model=1e-6, hit_rate=0.5)
    assert [cheap.plan(200) for _ in range(3 * PROBE_EVERY)] == ["all"] * (3 * PROBE_EVERY)
    dear = TableCost(lookup=1e-6, model=1e-6, hit_rate=0.0)
    plans = [dear.plan(200) for _ in range(2 * PROBE_EVERY)]
    assert [i for i, p in enumerate(plans) if p is not None] == \
        [PROBE_EVERY - 1, 2 * PROBE_EVERY - 1]
    assert {plans[PROBE_EVERY - 1], plans[-1]} == {"sample"}
    small = TableCost(lookup=1e-6, model=1e-6, hit_rate=0.0, batches=PROBE_EVERY - 1)
    assert small.plan(2 * SAMPLE_ROWS) == "all"  # a small batch is looked up whole
    # Hits coming back make the table pay again as soon as the hit rate says so.
    dear.hit_rate = 0.5
    dear.model = 1e-5
    assert dear.plan(200) == "all"


@pytest.mark.parametrize("model", ["eta", "late"])
def test_skipped_table_comes_back_when_table_rows_return(edge: Edge, model: str) -> None:
    rt = EdgeRuntime(edge.root, model, policy=FallbackPolicy())
    schema = edge.models[model].schema
    rng = np.random.default_rng(7)
    misses = [[f"r00{rng.integers(0, 5)}", int(rng.integers(8, 23)),
               round(float(rng.uniform(0.5, 8.9)), 5) + 1e-4, str(rng.choice(["no", "yes"])),
               int(rng.integers(1, 8))] for _ in range(200)]
    hits = [edge.models[model].hits[i % 20] for i in range(200)]

    def check(batch: list[list[Any]]) -> BatchPrediction:
        expected = rt.predict(batch)
        num, cat = to_arrays(schema, batch)
        got = rt.predict_arrays(num=num, cat=cat)
        _v(rt).cost, saved = TableCost(), _v(rt).cost
        full = rt.predict_arrays(num=num, cat=cat)  # looked up whole, like predict()
        _v(rt).cost = saved
        assert batch_answers(full) == [answer(p) for p in expected]
        _assert_same_answers(got, full)
        return got

    # Misses only, the model cheaper than lookups, the hit rate at 0: the table is skipped.
    _v(rt).cost = TableCost(lookup=1.0, model=1e-9, hit_rate=0.0)
    for _ in range(PROBE_EVERY + 1):
        assert set(check(misses).source) == {"edge"}
    assert _v(rt).cost.hit_rate == 0.0
    # Table rows come back. The model's cost is made huge so the first probe's hit rate makes
    # lookups pay whatever this machine measures; no timing decides the outcome.
    _v(rt).cost.model = 1e6
    came_back = None
    for i in range(2 * PROBE_EVERY + 2):
        got = check(hits)
        if set(got.source) == {"precomputed"}:
            came_back = i
            break
        assert set(got.source) == {"edge"}
    assert came_back is not None, "the table never came back"
    assert _v(rt).cost.hit_rate > 0
    assert set(check(hits).source) == {"precomputed"}


def test_a_bool_never_finds_the_hit_its_number_cached(edge: Edge, runtimes: Runtimes) -> None:
    # The fast path caches hits by the values as sent; True == 1 and hash(True) == hash(1),
    # so only the type check keeps a bool from finding the answer cached for a 1.
    checked = 0
    for variant in ("late", "eta"):
        rt = runtimes[(variant, "all_on")]
        for hit in edge.models[VARIANTS[variant][0]].hits:
            at = [j for j, v in enumerate(hit) if type(v) is int and v in (0, 1)]
            if not at:
                continue
            first = rt.predict([list(hit)])[0]
            again = rt.predict([list(hit)])[0]
            assert answer(first) == answer(again)
            row = list(hit)
            row[at[0]] = bool(row[at[0]])
            with pytest.raises(InputError):
                rt.predict([row])
            checked += 1
    assert checked, "no table row holds a 0 or 1 to check with"
