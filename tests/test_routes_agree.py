"""Every route applies the same input rules: the same rows refused with the same error, the
same answers for the rows accepted.

Hypothesis generates small batches of rows — good and bad cells mixed: bools, numeric text,
padded and differently spelled categories, None, NaN, ±inf, values past float32, unicode (a
lone surrogate too), numpy scalars, missing and extra columns, short lists — and sends each
batch through every route that turns user input into model inputs:

===========  =====================================================================
``one``      ``EdgeRuntime.predict([row])`` for each row (the single-row fast path)
``rows``     ``EdgeRuntime.predict(rows)`` and ``predict(rows, errors="report")``
``arrays``   ``EdgeRuntime.predict_arrays(num, cat)``
``cli_json`` ``hybridml-edge predict --json`` on JSON lines
``cli_csv``  ``hybridml-edge predict --json`` on a CSV file
``cloud``    ``POST /v1/models/<name>/predict`` on the real cloud app, over HTTP
``log``      ``precompute`` on a request log of the rows, then the table's answers
``train``    ``load_csv`` of the rows as training data (numbers and categories parsed)
===========  =====================================================================

Each route either refuses the batch — with ``bad_input``, naming the same column and the same
row (the first bad one) — or answers every row like the others. The routes' legitimate
differences, each asserted below where it applies:

* **Arrays have no rows to misshape.** A missing or extra column, or a list of the wrong
  length, cannot be written as ``num``/``cat`` blocks: such batches skip ``arrays``.
* **JSON has no NaN, bytes or complex numbers.** A NaN is sent as ``null`` (missing, as NaN is
  in Python); rows holding bytes or complex numbers skip the JSON routes.
* **CSV has no types, and one header.** In a CSV every cell is text: text that reads as a
  number is a number in a numeric column (``"3"``, refused by the typed routes, is 3.0 there),
  and any text is a category in a categorical one (``0`` is the category ``"0"``). Extra
  columns are ignored (logs carry ids and timestamps). The CSV routes are held to the typed
  routes' answer for the rows those rules give. Batches whose rows lack a column skip them (a
  CSV cannot leave a column out of one row), as do rows with text a UTF-8 file cannot hold.
* **The cloud answers from its fp32 model, and has no table.** ``source`` is the edge's word;
  these models ship fp32, so the predictions are compared.
* **Training learns the ranges and categories**, so it only parses: its numbers and
  categories must equal what the edge feeds the model for the same text.

A binary version with a decision threshold (``manifest["decision"]``) carries it in its graph:
:func:`test_every_route_applies_the_decision_threshold_alike` sends an imbalanced model's rows
nearest the threshold through the edge's batch path, the single-row fast path, the precomputed
table and the cloud's ``/predict``, and each label must be ``threshold.apply`` of the
probabilities. Its positive class is "fraud", the minority, which sorts first: index 0, so the
graph's rule is the one for a positive class that is not ``classes[1]``.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from hybridml.cloud.data import load_csv
from hybridml.cloud.precompute import precompute
from hybridml.cloud.registry import Registry
from hybridml.cloud.threshold import apply as apply_threshold
from hybridml.cloud.train import train
from hybridml.edge import cli as edge_cli
from hybridml.edge.loaded import TableCost
from hybridml.edge.runtime import EdgeRuntime, Prediction
from hybridml.edge.session import ModelSession
from hybridml.edge.store import LocalStore
from hybridml.shared.cells import MISSING_TOKENS
from hybridml.shared.errors import InputError
from hybridml.shared.schema import NUMERIC, InputSchema
from hybridml.shared.table import Table
from tests.cloud.imbalanced import fraud_csv
from tests.conftest import write_orders_csv
from tests.edgekit import ThreadCloud, install
from tests.integration.conftest import LATE_FEATURES, attach_table, frequent_rows

MODELS = ("late", "iris")
TOL = 2e-6  # onnxruntime's kernels for one row and for a batch differ in the 7th digit
AGREE = settings(max_examples=120, deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                        HealthCheck.function_scoped_fixture])


@dataclass
class World:
    """The registry, the edge store, the cloud and what each model knows."""

    root: Path
    registry: Path
    store: LocalStore
    cloud: ThreadCloud
    schemas: dict[str, InputSchema]
    runtimes: dict[str, EdgeRuntime]

    def __repr__(self) -> str:
        return f"World({self.root})"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """late (hgb: numbers and categories, with a table) and iris (logreg: numbers only)."""
    root = tmp_path_factory.mktemp("routes")
    reg = Registry(root / "reg")
    orders = write_orders_csv(root / "orders.csv", n=300)
    train(reg, "late", data=orders, target="late", model="hgb", drop=["delivery_minutes"],
          params={"max_iter": 20})
    train(reg, "iris", dataset="iris", model="logreg")
    log = root / "late_log.csv"
    with open(log, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=LATE_FEATURES)
        w.writeheader()
        w.writerows(frequent_rows(orders, 15))
    attach_table(reg, "late", log)
    store = LocalStore(root / "store")
    schemas = {}
    for name in MODELS:
        schemas[name] = install(reg, name, store).schema
    reg.close()
    cloud = ThreadCloud(root / "reg")
    runtimes = {name: EdgeRuntime(store, name) for name in MODELS}
    yield World(root, root / "reg", store, cloud, schemas, runtimes)
    cloud.close()


# --------------------------------------------------------------------------- strategies
LONE = "\ud800"  # a lone surrogate: not valid Unicode text


def numeric_cells(lo: float, hi: float, good: bool) -> st.SearchStrategy[Any]:
    """Numeric cells the rules accept (in and out of range, missing, numpy), or refuse."""
    if not good:
        return st.sampled_from([True, False, np.bool_(True), math.inf, -math.inf, 1e39,
                                10**400, "3", " 4.5 ", "nan", "NA", "", "abc", "1_000", "inf",
                                b"1", [1.0], 1j, {"v": 1}])
    return st.one_of(
        st.floats(lo, hi), st.integers(int(lo) - 3, int(hi) + 3),
        st.sampled_from([None, math.nan, -0.0, 0.0, 1e-40, 3.4028235e38, -3.4028235e38,
                         np.float32(lo), np.float64(hi), np.int64(int(hi)), np.float32("nan"),
                         2**70 + 1]),
    )


def category_cells(known: Sequence[str], good: bool) -> st.SearchStrategy[Any]:
    """Categorical cells the rules accept (known, padded, missing spellings, unseen,
    unicode), or refuse."""
    if not good:
        return st.sampled_from([0, 1.5, math.nan, True, b"r001", ["r001"], np.int64(1), LONE])
    return st.one_of(
        st.sampled_from(list(known)),
        st.sampled_from(list(known)).map(lambda c: f"  {c}\t"),
        st.sampled_from([None, "", "NA", " none ", "?", "R001", "r999", "größe", "a,b", "\x00",
                         "line\nbreak", "cr\rlf", "\u2028", np.str_("r001")]),
        st.text(max_size=3),
    )


@st.composite
def batches(draw: st.DrawFn, schema: InputSchema) -> list[Any]:
    """1-4 rows as dicts or lists: most clean, some with one bad cell, some misshapen."""
    out = []
    names = list(schema.names)
    for _ in range(draw(st.integers(1, 4))):
        mode = draw(st.sampled_from(["clean"] * 5 + ["bad cell"] * 2 + ["broken"]))
        bad_at = draw(st.integers(0, len(names) - 1)) if mode == "bad cell" else -1
        values = []
        for j, f in enumerate(schema.features):
            if f.kind == NUMERIC:
                lo = -1e3 if f.min is None else f.min
                hi = 1e3 if f.max is None else f.max
                values.append(draw(numeric_cells(lo, hi, j != bad_at)))
            else:
                values.append(draw(category_cells(f.categories, j != bad_at)))
        if mode != "broken":
            out.append(dict(zip(names, values)) if draw(st.booleans()) else values)
            continue
        how = draw(st.sampled_from(["drop", "extra", "short"]))
        row = dict(zip(names, values))
        if how == "drop":
            row.pop(draw(st.sampled_from(names)))
            out.append(row)
        elif how == "extra":
            out.append({**row, "extra": 1})
        else:
            out.append(values[:-1])
    return out


# ----------------------------------------------------------------------------- outcomes
Outcome = tuple[Any, ...]


def refused(err: InputError) -> Outcome:
    return ("refused", err.code, err.field, err.row)


def answers(preds: Sequence[Prediction]) -> Outcome:
    return ("answered", tuple((p.prediction, p.source, p.degraded, p.reason,
                               _probs(p.probabilities)) for p in preds))


def _probs(probs: dict[str, float] | None) -> tuple[tuple[str, float], ...] | None:
    return None if probs is None else tuple(sorted(probs.items()))


def same(a: Outcome, b: Outcome, *, fields: slice = slice(None)) -> bool:
    """Equal outcomes; probabilities within TOL (NaN equal to NaN)."""
    if a[0] != b[0] or a[0] == "refused":
        return a == b
    if len(a[1]) != len(b[1]):
        return False
    for x, y in zip(a[1], b[1]):
        if x[:-1][fields] != y[:-1][fields]:
            return False
        px, py = x[-1], y[-1]
        if (px is None) != (py is None):
            return False
        if px is not None and (dict(px).keys() != dict(py).keys() or not all(
                _near(u, v) for u, v in zip(dict(px).values(), (dict(py)[k] for k in dict(px))))):
            return False
    return True


def _near(u: float | None, v: float | None) -> bool:
    """Within TOL; NaN (a model overflowing) equals NaN, and JSON's null for it."""
    u = math.nan if u is None else u
    v = math.nan if v is None else v
    return (u != u and v != v) or abs(u - v) <= TOL


def run(call: Callable[[], Sequence[Prediction]]) -> Outcome:
    try:
        return answers(call())
    except InputError as err:
        return refused(err)


def reference(rt: EdgeRuntime, rows: list[Any]) -> Outcome:
    """One row at a time: the first refused row's error, else every row's answer."""
    out = []
    for r, row in enumerate(rows):
        one = run(partial(rt.predict, [row]))
        if one[0] == "refused":
            return ("refused", one[1], one[2], r)
        out.extend(one[1])
    return ("answered", tuple(out))


# ------------------------------------------------------------------------ row conversions
def complete(schema: InputSchema, row: Any) -> list[Any] | None:
    """The row's cells in schema order, extra columns dropped; None if misshapen."""
    if isinstance(row, dict):
        if not all(n in row for n in schema.names):
            return None
        return [row[n] for n in schema.names]
    return list(row) if len(row) == len(schema.names) else None


def json_cell(v: Any) -> Any:
    """What a JSON producer sends for ``v``; raises TypeError when JSON cannot hold it."""
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and v != v:
        return None
    if isinstance(v, (bytes, complex)):
        raise TypeError(type(v).__name__)
    if isinstance(v, list):
        return [json_cell(x) for x in v]
    if isinstance(v, dict):
        return {k: json_cell(x) for k, x in v.items()}
    return v


def nan_in_categories(schema: InputSchema, rows: list[Any]) -> bool:
    """True when a categorical cell is a float NaN (JSON can only send it as null)."""
    for row in rows:
        cells_ = row.values() if isinstance(row, dict) else row
        kinds = [f.kind for f in schema.features] if not isinstance(row, dict) else \
            [schema.features[schema.names.index(k)].kind if k in schema.names else NUMERIC
             for k in row]
        if any(k != NUMERIC and isinstance(v, float) and v != v for k, v in zip(kinds, cells_)):
            return True
    return False


def json_rows(rows: list[Any]) -> list[Any] | None:
    try:
        return [{k: json_cell(v) for k, v in r.items()} if isinstance(r, dict)
                else [json_cell(v) for v in r] for r in rows]
    except TypeError:
        return None


def text_cell(v: Any) -> str:
    """The CSV text of a cell."""
    if v is None:
        return ""
    if isinstance(v, np.generic):
        v = v.item()
    return repr(v) if isinstance(v, float) else str(v)


def csv_text(schema: InputSchema, rows: list[Any], extra: bool = True) -> str | None:
    """The rows as a CSV file (with an ``id`` column the routes ignore), or None when a row
    is misshapen or holds text a UTF-8 file cannot."""
    cells_ = [complete(schema, r) for r in rows]
    if any(c is None for c in cells_):
        return None
    buf = io.StringIO()
    w = csv.writer(buf)  # \r\n rows: a cell holding \r or \n is quoted
    w.writerow([*schema.names, *(["id"] if extra else [])])
    for i, c in enumerate(cells_):
        assert c is not None
        w.writerow([*map(text_cell, c), *([f"x{i}"] if extra else [])])
    text = buf.getvalue()
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return text


def typed_from_text(schema: InputSchema, text: str) -> list[list[Any]]:
    """What the CSV's text means as typed rows: in a numeric column, a missing spelling is
    None and text Python's float() reads is that number; any text is a category."""
    records = list(csv.reader(io.StringIO(text, newline="")))[1:]
    out = []
    for rec in records:
        row: list[Any] = []
        for f, t in zip(schema.features, rec):
            if f.kind != NUMERIC:
                row.append(t)
            elif t.strip().lower() in MISSING_TOKENS:
                row.append(None)
            else:
                try:
                    row.append(float(t))
                except ValueError:
                    row.append(t)
        out.append(row)
    return out


# ------------------------------------------------------------------------------- routes
def cli(world: World, name: str, path: Path) -> Outcome:
    """``hybridml-edge predict --json`` in this process (the real entry point)."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = edge_cli.main(["predict", "--store", str(world.store.root), "--name", name,
                              "--input", str(path), "--json"])
    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    if code:
        body = lines[-1]["error"]
        details = body.get("details", {})
        return ("refused", body["code"], details.get("field"), details.get("row"))
    preds = []
    for d in lines:
        pred = d["prediction"]
        preds.append(Prediction(pred, d["source"], d["model_version"], d.get("probabilities"),
                                degraded=d.get("degraded", False), reason=d.get("reason")))
    return answers(preds)


def cloud(world: World, name: str, rows: list[Any]) -> Outcome:
    resp = requests.post(f"{world.cloud.url}/v1/models/{name}/predict",
                         data=json.dumps({"inputs": rows}),
                         headers={"Content-Type": "application/json",
                                  "Authorization": f"Bearer {world.cloud.token}"}, timeout=30)
    body = resp.json()
    if resp.status_code != 200:
        assert 400 <= resp.status_code < 500, body
        err = body["error"]
        return ("refused", err["code"], err.get("details", {}).get("field"),
                err.get("details", {}).get("row"))
    probs = body.get("probabilities") or [None] * len(body["predictions"])
    return ("answered", tuple((p, None, None, None, _probs(q))
                              for p, q in zip(body["predictions"], probs)))


def arrays(world: World, name: str, rows: list[Any]) -> Outcome | None:
    schema = world.schemas[name]
    cells_ = [complete(schema, r) for r in rows]
    if any(c is None or (isinstance(r, dict) and len(r) != len(schema.names))
           for c, r in zip(cells_, rows)):
        return None
    num = np.empty((len(rows), schema.n_numeric), dtype=object)
    cat = np.empty((len(rows), schema.n_categorical), dtype=object)
    for i, c in enumerate(cells_):
        assert c is not None
        jn = jc = 0
        for v, f in zip(c, schema.features):  # cell by cell: a list cell stays one cell
            if f.kind == NUMERIC:
                num[i, jn] = v
                jn += 1
            else:
                cat[i, jc] = v
                jc += 1
    rt = world.runtimes[name]
    assert rt.loaded is not None
    rt.loaded.cost = TableCost()  # a fresh cost looks every row up, like predict()
    try:
        b = rt.predict_arrays(num=num, cat=cat if schema.n_categorical else None)
    except InputError as err:
        return refused(err)
    out = []
    for i in range(len(b)):
        probs = None if b.probabilities is None else \
            {str(c): round(float(p), 6) for c, p in zip(b.classes, b.probabilities[i])}
        pred = b.predictions[i] if b.labels is not None else float(b.predictions[i])
        out.append((pred, str(b.source[i]), bool(b.degraded[i]), b.reason[i], _probs(probs)))
    return ("answered", tuple(out))


# --------------------------------------------------------------------------------- test
@pytest.mark.parametrize("name", MODELS)
@AGREE
@given(data=st.data())
def test_every_route_refuses_and_answers_rows_alike(world: World, name: str,
                                                    data: st.DataObject) -> None:
    schema = world.schemas[name]
    rt = world.runtimes[name]
    rows = data.draw(batches(schema), label="rows")
    ref = reference(rt, rows)
    event(f"edge {ref[0]}")

    # Typed rows: the general path, report mode, arrays, JSON (CLI and cloud).
    assert same(run(lambda: rt.predict(rows)), ref), "predict(rows)"
    report = rt.predict(rows, errors="report")
    if ref[0] == "answered":
        assert same(answers(report), ref), "report mode"
    else:
        first = next(i for i, p in enumerate(report) if p.error)
        assert (first, report[first].error["code"],  # type: ignore[index]
                report[first].error.get("details", {}).get("field")) == \
            (ref[3], ref[1], ref[2]), "report mode names the first bad row"
    got = arrays(world, name, rows)
    if got is not None:
        assert same(got, ref), "predict_arrays"
    as_json = json_rows(rows)
    if as_json is not None:
        path = world.root / "rows.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in as_json) + "\n")
        # A NaN goes as null: missing, as a numeric NaN is anyway; in a categorical column,
        # where a float NaN is refused, JSON can only say missing.
        json_ref = reference(rt, as_json)
        if not nan_in_categories(schema, rows):
            assert same(json_ref, ref), "JSON carries the same values"
        assert same(cli(world, name, path), json_ref), "CLI (JSON lines)"
        # The cloud has no table and its own fallback: compare predictions and probabilities.
        assert same(cloud(world, name, as_json), json_ref, fields=slice(0, 1)), \
            "cloud /predict"

    # CSV text: the CLI, a request log for precompute, and training data.
    text = csv_text(schema, rows)
    if text is None:
        return
    text_ref = reference(rt, typed_from_text(schema, text))
    event(f"csv {text_ref[0]}")
    path = world.root / "rows.csv"
    path.write_text(text, encoding="utf-8")
    assert same(cli(world, name, path), text_ref), "CLI (CSV)"
    check_request_log(world, name, path, text, text_ref)
    check_training_data(world, name, rows, text_ref)


def check_request_log(world: World, name: str, path: Path, text: str, text_ref: Outcome
                      ) -> None:
    """precompute on the rows as a request log: the same refusal, or a table whose rows are
    found by the edge's keys for those rows, holding the edge's answers."""
    schema = world.schemas[name]
    reg = Registry(world.registry)
    manifest = reg.manifest(name)
    model = next(a for a in manifest["artifacts"] if a["role"] == "model")
    blob = reg.blob_path(model["sha256"]).read_bytes()
    reg.close()
    out = world.root / "t.table"
    try:
        precompute(blob, model["sha256"], schema, manifest["output"]["task"], path, top=100,
                   out_path=out)
    except InputError as err:
        assert refused(err) == text_ref, "precompute refuses like the CSV route"
        return
    assert text_ref[0] == "answered", f"precompute accepted what the edge refuses: {text_ref}"
    columns = {n: [r[j] for r in list(csv.reader(io.StringIO(text, newline="")))[1:]]
               for j, n in enumerate(schema.names)}
    keys = schema.keys(schema.encode_text(columns))
    with Table.open(out, model_sha256=model["sha256"]) as table:
        hits = table.lookup_many(keys)
        assert (hits >= 0).all(), "a logged row's key is missing from its table"
        labels, probs, values = table.take(hits)
    classes = manifest["output"].get("classes")
    if labels is not None:
        table = tuple((classes[int(i)], None, None, None,
                       _probs({str(c): round(float(p), 6) for c, p in zip(classes, ps)}))
                      for i, ps in zip(labels, probs))
    else:
        table = tuple((float(v), None, None, None, None) for v in values)
    assert same(("answered", table), text_ref, fields=slice(0, 1)), \
        "the table answers the logged rows like the edge"


def check_training_data(world: World, name: str, rows: list[Any], text_ref: Outcome) -> None:
    """The rows as training data (with a target): the same refusal, or exactly the numbers
    and categories the edge feeds the model for that text."""
    schema = world.schemas[name]
    text = csv_text(schema, rows, extra=False)
    assert text is not None
    records = list(csv.reader(io.StringIO(text, newline="")))
    buf = io.StringIO()
    w = csv.writer(buf)  # \r\n rows: a cell holding \r or \n is quoted
    w.writerow([*records[0], "target"])
    w.writerows([*rec, f"{i}.5"] for i, rec in enumerate(records[1:]))
    body = buf.getvalue()
    typed = typed_from_text(schema, text)
    numeric_cols = [j for j, f in enumerate(schema.features) if f.kind == NUMERIC]
    if any(all(r[j] is None for r in typed) for j in numeric_cols) or any(
            all(not str(r[j]).strip() or str(r[j]).strip().lower() in MISSING_TOKENS
                for r in typed) for j in range(len(schema.names)) if j not in numeric_cols):
        return  # training needs a value in every column (the edge does not)
    path = world.root / "train.csv"
    path.write_text(body, encoding="utf-8")
    try:
        ds = load_csv(path, "target", task="regression", numeric=schema.numeric_names,
                      categorical=schema.categorical_names)
    except InputError as err:
        assert refused(err) == text_ref, "training refuses like the CSV route"
        return
    assert text_ref[0] == "answered", f"training accepted what the edge refuses: {text_ref}"
    edge = schema.encode_text({n: [r[j] for r in records[1:]]
                               for j, n in enumerate(schema.names)})
    nan = np.isnan(edge.num)
    assert np.array_equal(np.isnan(ds.num), nan), "training reads other cells as missing"
    assert np.array_equal(ds.num.view(np.uint32)[~nan], edge.num.view(np.uint32)[~nan]), \
        "training numbers differ from the edge's, bit for bit"
    assert ds.cat.tolist() == edge.cat.tolist(), "training categories differ"


# ------------------------------------------------------------- the decision threshold
@dataclass
class Thresholded:
    """An imbalanced binary model with a tuned threshold, and the rows sent through it."""

    root: Path
    plain: EdgeRuntime  # no table: the local model (batch and single-row fast path)
    tabled: EdgeRuntime  # the same version with a precomputed table of ``rows``
    cloud: ThreadCloud
    manifest: dict[str, Any]
    rows: list[dict[str, Any]]
    probabilities: np.ndarray  # raw onnxruntime on the shipped model, float32


@pytest.fixture(scope="module")
def thresholded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Thresholded]:
    """fraud (~3% positive, string labels; logreg: ships fp32, so the cloud and the edge run
    the same graph) with its threshold tuned; the rows: the 25 whose positive probability is
    nearest the threshold, on both sides, and 15 others."""
    root = tmp_path_factory.mktemp("threshold")
    reg = Registry(root / "reg")
    data = fraud_csv(root / "fraud.csv", rows=2000, seed=1)
    train(reg, "fraud", data=data, target="label", model="logreg")
    manifest = reg.manifest("fraud")
    schema = InputSchema.from_json(manifest["schema"])
    with open(data, newline="") as fh:
        every = [{n: (r[n] if f.kind != NUMERIC else float(r[n]))
                  for n, f in zip(schema.names, schema.features)} for r in csv.DictReader(fh)]
    model = next(a for a in manifest["artifacts"] if a["role"] == "model")
    session = ModelSession(reg.blob_path(model["sha256"]).read_bytes(), schema, "binary")
    positive = manifest["output"]["classes"].index(manifest["metrics"]["positive"])
    p_pos = session.run(schema.encode(every)).probabilities[:, positive]  # type: ignore[index]
    near = np.argsort(np.abs(p_pos - manifest["decision"]["threshold"]))[:25]
    rows = [every[i] for i in (*near, *range(15))]
    plain = LocalStore(root / "plain")
    install(reg, "fraud", plain)
    log = root / "fraud_log.csv"
    with open(log, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=schema.names)
        w.writeheader()
        w.writerows(rows)
    attach_table(reg, "fraud", log, top=len(rows))
    manifest = reg.manifest("fraud")
    tabled = LocalStore(root / "tabled")
    install(reg, "fraud", tabled)
    reg.close()
    cloud = ThreadCloud(root / "reg")
    probs = session.run(schema.encode(rows)).probabilities
    assert probs is not None
    yield Thresholded(root, EdgeRuntime(plain, "fraud"), EdgeRuntime(tabled, "fraud"), cloud,
                      manifest, rows, probs)
    cloud.close()


def test_every_route_applies_the_decision_threshold_alike(thresholded: Thresholded) -> None:
    w = thresholded
    decision, classes = w.manifest["decision"], w.manifest["output"]["classes"]
    t = decision["threshold"]
    # The positive class is the minority, "fraud", which sorts first: index 0, not classes[1].
    assert decision["source"] == "auto" and decision["positive"] == "fraud"
    assert w.manifest["metrics"]["positive"] == "fraud" and classes.index("fraud") == 0
    p_pos = w.probabilities[:, 0]
    assert (p_pos[:25] >= np.float32(t)).any() and (p_pos[:25] < np.float32(t)).any(), \
        "the rows straddle the threshold"
    assert float(np.abs(p_pos - t).min()) < 0.01
    expected = [classes[i] for i in apply_threshold(w.probabilities, t, 0)]
    assert all((e == "fraud") == (p >= np.float32(t)) for e, p in zip(expected, p_pos)), \
        "fraud exactly where P(fraud) reaches the threshold"
    assert expected != [classes[i] for i in w.probabilities.argmax(axis=1)], \
        "the threshold changes some answers"

    batch = w.plain.predict(w.rows)
    one = [w.plain.predict([r])[0] for r in w.rows]
    table = w.tabled.predict(w.rows)
    assert {p.source for p in table} == {"precomputed"}, "the table answers these rows"
    resp = requests.post(f"{w.cloud.url}/v1/models/fraud/predict",
                         data=json.dumps({"inputs": w.rows}),
                         headers={"Content-Type": "application/json",
                                  "Authorization": f"Bearer {w.cloud.token}"}, timeout=30)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    routes = {"edge batch": [p.prediction for p in batch],
              "single-row fast path": [p.prediction for p in one],
              "precomputed table": [p.prediction for p in table],
              "cloud /predict": body["predictions"]}
    for route, labels in routes.items():
        assert labels == expected, route
    # Each route's probabilities are the ones the rule was applied to.
    for route, probs in (("edge batch", [p.probabilities for p in batch]),
                         ("single-row fast path", [p.probabilities for p in one]),
                         ("precomputed table", [p.probabilities for p in table]),
                         ("cloud /predict", body["probabilities"])):
        got = np.array([[q[c] for c in classes] for q in probs])
        assert np.abs(got - w.probabilities).max() <= 1e-6, route
