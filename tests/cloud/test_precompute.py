"""cloud.precompute: CSV request logs -> the table of the most frequent inputs' predictions."""

from __future__ import annotations

import csv
import hashlib
import importlib
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from skl2onnx import to_onnx
from skl2onnx.common.data_types import FloatTensorType, StringTensorType

from hybridml.cloud.models import build_pipeline, combine
from hybridml.cloud.precompute import PrecomputeReport, precompute
from hybridml.edge.session import ModelSession
from hybridml.shared.errors import ConfigError, InputError, TableError
from hybridml.shared.schema import Feature, InputSchema
from hybridml.shared.table import Table

# The module: ``hybridml.cloud.precompute`` is the function the package re-exports.
precompute_module = importlib.import_module("hybridml.cloud.precompute")
COLORS = ("red", "green", "blue")
SIZES = ("s", "m", "l")
HEADER = ["x0", "color", "x1", "size", "x2"]


@pytest.fixture(scope="module")
def schema() -> InputSchema:
    return InputSchema((
        Feature("x0", "numeric", -3.0, 3.0),
        Feature("color", "categorical", categories=COLORS),
        Feature("x1", "numeric", -3.0, 3.0),
        Feature("size", "categorical", categories=SIZES),
        Feature("x2", "numeric", -3.0, 3.0),
    ))


def fitted_onnx(schema: InputSchema, task: str, family: str = "logreg") -> bytes:
    rng = np.random.default_rng(0)
    n = 300
    num = rng.normal(size=(n, 3)).astype(np.float32)
    num[::17, 1] = np.nan
    cat = np.stack([rng.choice(COLORS, n), rng.choice(SIZES, n)], axis=1).astype(object)
    score = num[:, 0] + np.nan_to_num(num[:, 1]) + (cat[:, 0] == "red")
    y = score if task == "regression" else np.digitize(score, [-0.5, 0.8])
    pipe = build_pipeline(family, task, 3, 2, seed=0)
    pipe.fit(combine(num, cat), y)
    options = {} if task == "regression" else {type(pipe.steps[-1][1]): {"zipmap": False}}
    onx = to_onnx(pipe, initial_types=[("num", FloatTensorType([None, 3])),
                                       ("cat", StringTensorType([None, 2]))],
                  options=options, target_opset={"": 17, "ai.onnx.ml": 3})
    return onx.SerializeToString()


@pytest.fixture(scope="module")
def clf_model(schema: InputSchema) -> tuple[bytes, str]:
    model = fitted_onnx(schema, "multiclass")
    return model, hashlib.sha256(model).hexdigest()


@pytest.fixture(scope="module")
def reg_model(schema: InputSchema) -> tuple[bytes, str]:
    model = fitted_onnx(schema, "regression")
    return model, hashlib.sha256(model).hexdigest()


def write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def random_rows(n: int, seed: int = 1) -> list[list[str]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        x = [f"{v:.3f}" for v in rng.normal(size=3)]
        if i % 9 == 0:
            x[2] = ""  # missing
        color = "purple" if i % 23 == 0 else COLORS[i % 3]  # some unseen categories
        out.append([x[0], color, x[1], SIZES[i % 3], x[2]])
    return out


def run(clf_model: tuple[bytes, str], schema: InputSchema, src: Path, out: Path,
        **kwargs: Any) -> PrecomputeReport:
    model, sha = clf_model
    return precompute(model, sha, schema, "multiclass", src, out_path=out, **kwargs)


def test_request_log_counts_duplicates_and_keeps_the_most_requested(
        tmp_path: Path, schema: InputSchema, clf_model: tuple[bytes, str],
        caplog: pytest.LogCaptureFixture) -> None:
    a, b = ["1.0", "red", "0.5", "s", "0"], ["-1", "blue", "", "l", "2"]
    c, d = ["0", "green", "0", "m", "0"], ["2", "green", "1", "m", "-1"]
    # Spellings the schema maps to one input: "NaN" and "" are missing, "-0" is 0.
    b2 = ["-1.000", "blue", "NaN", "l", "2"]
    c2 = ["-0", "green", "0.0", "m", "-0.0"]
    rows = [a] * 5 + [b] * 2 + [b2] + [c, c2] + [d]
    src = write_csv(tmp_path / "log.csv", HEADER, rows)
    with caplog.at_level(logging.INFO, logger="hybridml.cloud.precompute"):
        report = run(clf_model, schema, src, tmp_path / "t.tbl", top=2)
    assert (report.rows_read, report.requests, report.distinct, report.kept) == (11, 11, 4, 2)
    assert report.coverage == pytest.approx(8 / 11)
    assert report.table_bytes == (tmp_path / "t.tbl").stat().st_size
    assert report.model_sha256 == clf_model[1]
    assert "coverage 72.7%" in caplog.text
    with Table.open(tmp_path / "t.tbl", model_sha256=clf_model[1]) as table:
        keys = schema.keys(schema.encode_text(dict(zip(HEADER, zip(a, b, c, d)))))
        assert (table.lookup_many(keys) >= 0).tolist() == [True, True, False, False]


def test_count_column_gives_each_line_its_request_count(
        tmp_path: Path, schema: InputSchema, clf_model: tuple[bytes, str]) -> None:
    rows = [["1", "red", "1", "s", "1", "noise", "7"],
            ["2", "red", "1", "s", "1", "noise", "90"],
            ["3", "red", "1", "s", "1", "noise", "3"]]
    src = write_csv(tmp_path / "counts.csv", [*HEADER, "extra", "count"], rows)
    report = run(clf_model, schema, src, tmp_path / "t.tbl", top=2)
    assert (report.rows_read, report.requests, report.distinct, report.kept) == (3, 100, 3, 2)
    assert report.coverage == pytest.approx(0.97)
    assert report.to_json()["coverage"] == report.coverage


def test_count_column_option_names_any_column(
        tmp_path: Path, schema: InputSchema, clf_model: tuple[bytes, str]) -> None:
    rows = [["1", "red", "1", "s", "1", "4"], ["2", "red", "1", "s", "1", "6"]]
    src = write_csv(tmp_path / "hits.csv", [*HEADER, "hits"], rows)
    report = run(clf_model, schema, src, tmp_path / "t.tbl", count_column="hits", top=1)
    assert (report.requests, report.kept, report.coverage) == (10, 1, 0.6)


def test_table_predictions_equal_the_model_session_on_the_same_rows(
        tmp_path: Path, schema: InputSchema, clf_model: tuple[bytes, str]) -> None:
    rows = random_rows(400)
    src = write_csv(tmp_path / "log.csv", HEADER, rows)
    report = run(clf_model, schema, src, tmp_path / "t.tbl", top=10_000)
    assert report.kept == report.distinct == 400 and report.coverage == 1.0
    batch = schema.encode_text({h: [r[j] for r in rows] for j, h in enumerate(HEADER)})
    want = ModelSession(clf_model[0], schema, "multiclass").run(batch)
    with Table.open(tmp_path / "t.tbl", model_sha256=clf_model[1]) as table:
        labels, probs, _ = table.take(table.lookup_many(schema.keys(batch)))
    assert labels is not None and probs is not None
    assert np.array_equal(labels, want.labels)
    np.testing.assert_allclose(probs, want.probabilities, rtol=1e-6, atol=1e-7)


def test_regression_table_values_equal_the_model_session(
        tmp_path: Path, schema: InputSchema, reg_model: tuple[bytes, str]) -> None:
    rows = random_rows(150, seed=3)
    src = write_csv(tmp_path / "log.csv", HEADER, rows)
    model, sha = reg_model
    report = precompute(model, sha, schema, "regression", src, out_path=tmp_path / "r.tbl")
    batch = schema.encode_text({h: [r[j] for r in rows] for j, h in enumerate(HEADER)})
    want = ModelSession(model, schema, "regression").run(batch)
    with Table.open(tmp_path / "r.tbl", model_sha256=sha) as table:
        _, _, values = table.take(table.lookup_many(schema.keys(batch)))
    assert report.kept == 150 and values is not None
    np.testing.assert_allclose(values, want.values, rtol=1e-6, atol=1e-6)


def test_ties_are_broken_by_key_so_row_order_does_not_change_the_table(
        tmp_path: Path, schema: InputSchema, clf_model: tuple[bytes, str]) -> None:
    rows = random_rows(50)
    write_csv(tmp_path / "a.csv", HEADER, rows)
    write_csv(tmp_path / "b.csv", HEADER, rows[::-1])
    run(clf_model, schema, tmp_path / "a.csv", tmp_path / "a.tbl", top=20)
    run(clf_model, schema, tmp_path / "b.csv", tmp_path / "b.tbl", top=20)
    assert (tmp_path / "a.tbl").read_bytes() == (tmp_path / "b.tbl").read_bytes()


def test_counts_merge_across_chunks(tmp_path: Path, schema: InputSchema,
                                    clf_model: tuple[bytes, str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precompute_module, "CHUNK_ROWS", 3)  # many tiny chunks
    rows = random_rows(10) * 4 + random_rows(5, seed=9)
    src = write_csv(tmp_path / "log.csv", HEADER, rows)
    report = run(clf_model, schema, src, tmp_path / "t.tbl", top=10)
    assert (report.rows_read, report.distinct, report.kept) == (45, 15, 10)
    assert report.coverage == pytest.approx(40 / 45)


@pytest.mark.parametrize(("header", "row", "field", "needle"), [
    (["x0", "color", "x1", "size"], ["1", "red", "1", "s"], "x2", "has no column 'x2'"),
    (HEADER, ["1", "red", "abc", "s", "1"], "x1",
     "line 3: row 1 column 'x1' is numeric but holds 'abc'"),
    ([*HEADER, "count"], ["1", "red", "1", "s", "1", "-2"], "count", "line 3 (row 1)"),
    ([*HEADER, "count"], ["1", "red", "1", "s", "1", "2.5"], "count", "whole number"),
    ([*HEADER, "count"], ["1", "red", "1", "s", "1", ""], "count", "holds ''"),
])
def test_bad_csv_is_an_input_error_naming_the_column_and_row(
        tmp_path: Path, schema: InputSchema, clf_model: tuple[bytes, str],
        header: list[str], row: list[str], field: str, needle: str) -> None:
    first = ["0", "red", "0", "s", "0", "1"][:len(header)]
    src = write_csv(tmp_path / "bad.csv", header, [first, row])
    with pytest.raises(InputError) as err:
        run(clf_model, schema, src, tmp_path / "t.tbl")
    assert err.value.field == field and needle in str(err.value)
    assert err.value.code == "bad_input"
    assert not (tmp_path / "t.tbl").exists()


def test_bad_row_in_a_later_chunk_is_named_by_its_place_in_the_file(
        tmp_path: Path, schema: InputSchema, clf_model: tuple[bytes, str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precompute_module, "CHUNK_ROWS", 4)
    rows = random_rows(10)
    rows[9][0] = "ten"
    src = write_csv(tmp_path / "bad.csv", HEADER, rows)
    with pytest.raises(InputError) as err:
        run(clf_model, schema, src, tmp_path / "t.tbl")
    assert (err.value.field, err.value.row) == ("x0", 9)
    assert "line 11" in str(err.value)
    assert "row 9 column 'x0' is numeric but holds 'ten'" in str(err.value)


@pytest.mark.parametrize(("text", "needle"), [
    ("", "is empty"),
    (",".join(HEADER) + "\n", "no data rows"),
    (",".join(HEADER) + "\n1,red,1,s\n", "line 2 has 4 fields"),
])
def test_empty_or_ragged_csv_is_an_input_error(tmp_path: Path, schema: InputSchema,
                                               clf_model: tuple[bytes, str], text: str,
                                               needle: str) -> None:
    (tmp_path / "x.csv").write_text(text)
    with pytest.raises(InputError, match=needle):
        run(clf_model, schema, tmp_path / "x.csv", tmp_path / "t.tbl")


def test_sha_that_is_not_the_models_is_refused(tmp_path: Path, schema: InputSchema,
                                               clf_model: tuple[bytes, str]) -> None:
    src = write_csv(tmp_path / "log.csv", HEADER, random_rows(3))
    with pytest.raises(TableError, match="is not the sha256 of the model"):
        precompute(clf_model[0], "0" * 64, schema, "multiclass", src,
                   out_path=tmp_path / "t.tbl")


@pytest.mark.parametrize(("kwargs", "field"), [({"top": 0}, "top"), ({"task": "rank"}, "task")])
def test_bad_arguments_are_config_errors(tmp_path: Path, schema: InputSchema,
                                         clf_model: tuple[bytes, str], kwargs: dict[str, Any],
                                         field: str) -> None:
    src = write_csv(tmp_path / "log.csv", HEADER, random_rows(3))
    args: dict[str, Any] = {"task": "multiclass", "top": 10, **kwargs}
    with pytest.raises(ConfigError) as err:
        precompute(clf_model[0], clf_model[1], schema, args.pop("task"), src,
                   out_path=tmp_path / "t.tbl", **args)
    assert err.value.details["field"] == field


def test_progress_goes_to_stderr_only_when_asked(
        tmp_path: Path, schema: InputSchema, clf_model: tuple[bytes, str],
        capsys: pytest.CaptureFixture[str]) -> None:
    src = write_csv(tmp_path / "log.csv", HEADER, random_rows(5))
    run(clf_model, schema, src, tmp_path / "t.tbl")
    assert capsys.readouterr() == ("", "")
    run(clf_model, schema, src, tmp_path / "t.tbl", progress=True)
    captured = capsys.readouterr()
    assert captured.out == "" and "rows read" in captured.err


@pytest.mark.slow
def test_a_million_distinct_rows_are_precomputed(
        tmp_path: Path, clf_model: tuple[bytes, str]) -> None:
    """Scale check (6 numeric + 2 categorical, 1M distinct rows); the time is benchmarked."""
    schema = InputSchema((*(Feature(f"n{i}", "numeric") for i in range(6)),
                          Feature("color", "categorical", categories=COLORS),
                          Feature("size", "categorical", categories=SIZES)))
    model = fitted_onnx_wide(schema)
    sha = hashlib.sha256(model).hexdigest()
    n = 1_000_000
    rng = np.random.default_rng(5)
    num = rng.normal(size=(n, 6)).round(4)
    num[:, 0] = np.arange(n)  # makes every row distinct
    colors, sizes = np.array(COLORS)[rng.integers(0, 3, n)], np.array(SIZES)[rng.integers(0, 3, n)]
    path = tmp_path / "big.csv"
    with open(path, "w") as f:
        f.write(",".join([*(f"n{i}" for i in range(6)), "color", "size", "count"]) + "\n")
        counts = np.where(np.arange(n) < 1000, 1000, 1)  # 1000 hot rows: half the traffic
        text = np.char.add(np.char.add(
            [",".join(map(str, r)) for r in num.tolist()], ","), colors)
        for line, size, c in zip(text.tolist(), sizes.tolist(), counts.tolist(), strict=True):
            f.write(f"{line},{size},{c}\n")
    report = precompute(model, sha, schema, "multiclass", path, top=10_000,
                        out_path=tmp_path / "big.tbl")
    total = 1000 * 1000 + (n - 1000)
    assert (report.rows_read, report.distinct, report.kept, report.requests) == (
        n, n, 10_000, total)
    assert report.coverage == pytest.approx((1000 * 1000 + 9000) / total)
    with Table.open(tmp_path / "big.tbl", model_sha256=sha) as table:
        assert len(table) == 10_000
        assert not math.isnan(float(table.probabilities(0).sum()))


def fitted_onnx_wide(schema: InputSchema) -> bytes:
    rng = np.random.default_rng(0)
    num = rng.normal(size=(500, 6)).astype(np.float32)
    cat = np.stack([rng.choice(COLORS, 500), rng.choice(SIZES, 500)], axis=1).astype(object)
    y = np.digitize(num[:, 1] + (cat[:, 0] == "red"), [-0.5, 0.8])
    pipe = build_pipeline("logreg", "multiclass", 6, 2, seed=0)
    pipe.fit(combine(num, cat), y)
    onx = to_onnx(pipe, initial_types=[("num", FloatTensorType([None, 6])),
                                       ("cat", StringTensorType([None, 2]))],
                  options={type(pipe.steps[-1][1]): {"zipmap": False}},
                  target_opset={"": 17, "ai.onnx.ml": 3})
    return onx.SerializeToString()


def test_logged_categories_follow_the_training_rules_so_padded_rows_still_hit(
        tmp_path: Path, schema: InputSchema, clf_model: tuple[bytes, str]) -> None:
    # Training strips the spaces around a category and reads NA as missing; a request log
    # written with " red " or "NA" must build the keys of the rows the model was trained on.
    logged = [["0.5", " red ", "1", "s ", "0"], ["1.5", "NA", "1", "\tm", ""]]
    typed = [[0.5, "red", 1.0, "s", 0.0], [1.5, None, 1.0, "m", None]]
    src = write_csv(tmp_path / "log.csv", HEADER, logged * 3)
    run(clf_model, schema, src, tmp_path / "t.tbl")
    with Table.open(tmp_path / "t.tbl") as table:
        hits = table.lookup_many(schema.keys(schema.encode(typed)))
        assert (hits >= 0).all(), "a logged row misses the table"
        labels, _, _ = table.take(hits)
    model, _ = clf_model
    local = ModelSession(model, schema, "multiclass").run(schema.encode(typed))
    assert labels.tolist() == local.labels.tolist()  # type: ignore[union-attr]
