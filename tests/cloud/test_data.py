"""cloud.data: CSV validation, typing, task detection, bundled datasets, seeded split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hybridml.cloud.data import load_builtin, load_csv, split
from hybridml.shared.errors import DataError


def write(tmp_path: Path, text: str, name: str = "d.csv") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def orders(tmp_path: Path, n: int = 60) -> Path:
    lines = ["restaurant,hour,distance_km,rain,delivery_minutes,late"]
    for i in range(n):
        dist = "" if i % 13 == 0 else f"{1 + (i % 7) * 0.5}"
        rain = "" if i % 11 == 0 else ("yes" if i % 3 else "no")
        late = "late" if i % 5 else "ok"
        lines.append(f"r{i % 4:03d},{i % 24},{dist},{rain},{20 + i % 17},{late}")
    return write(tmp_path, "\n".join(lines) + "\n")


def test_csv_types_numeric_and_categorical_columns_with_missing_values(tmp_path: Path) -> None:
    ds = load_csv(orders(tmp_path), "delivery_minutes")
    kinds = {f.name: f.kind for f in ds.schema.features}
    assert kinds == {"restaurant": "categorical", "hour": "numeric", "distance_km": "numeric",
                     "rain": "categorical", "late": "categorical"}
    assert ds.task == "regression"
    assert np.isnan(ds.num[0, ds.schema.numeric_names.index("distance_km")])
    assert "" in ds.schema.features[3].categories  # missing rain is its own category
    assert len(ds.sha256) == 64


def test_string_target_is_detected_as_binary_with_sorted_classes(tmp_path: Path) -> None:
    ds = load_csv(orders(tmp_path), "late")
    assert ds.task == "binary"
    assert ds.classes == ["late", "ok"]
    assert set(np.unique(ds.y)) == {0, 1}


def test_task_can_be_overridden(tmp_path: Path) -> None:
    ds = load_csv(orders(tmp_path), "hour", task="regression")
    assert ds.task == "regression"
    ds2 = load_csv(orders(tmp_path), "hour")
    assert ds2.task == "regression"  # 24 distinct integers > MAX_INT_CLASSES
    ds3 = load_csv(orders(tmp_path), "hour", task="multiclass")
    assert ds3.classes is not None and len(ds3.classes) == 24


@pytest.mark.parametrize(
    ("text", "target", "needle"),
    [
        ("", "y", "is empty"),
        ("a,y\n", "y", "no data rows"),
        ("a,b\n1,2\n", "y", "target column 'y' is not in"),
        ("a,y\n1,\n2,\n", "y", "empty in every row"),
        ("a,a,y\n1,2,3\n", "y", "duplicate column names: a"),
        ("a,b,y\n1,,0\n2,,1\n", "y", "column 'b' has no values"),
        ("a,y\n1,x\n2,x\n3,x\n", "y", "single class"),
        ("a,y\n1,0\n2\n", "y", "line 3 has 1 fields"),
    ],
)
def test_bad_csv_is_rejected_with_a_message_naming_the_problem(
        tmp_path: Path, text: str, target: str, needle: str) -> None:
    with pytest.raises(DataError) as err:
        load_csv(write(tmp_path, text), target)
    assert needle in err.value.message


def test_numeric_column_with_a_stray_word_names_column_and_row(tmp_path: Path) -> None:
    rows = ["a,y"] + [f"{i},{i % 2}" for i in range(30)]
    rows[17] = "abc,1"
    with pytest.raises(DataError) as err:
        load_csv(write(tmp_path, "\n".join(rows)), "y")
    assert err.value.details["field"] == "a" and err.value.details["row"] == 16
    assert err.value.code == "bad_input"  # the same error the edge and the cloud API give
    assert "row 16 column 'a' is numeric but holds 'abc'" in err.value.message
    assert "(29 of 30 values are numbers: pass --categorical a" in err.value.message


def test_forced_categorical_accepts_the_mixed_column(tmp_path: Path) -> None:
    rows = ["a,y"] + [f"{i},{i % 2}" for i in range(30)]
    rows[17] = "abc,1"
    ds = load_csv(write(tmp_path, "\n".join(rows)), "y", categorical=["a"])
    assert ds.schema.features[0].kind == "categorical"


def test_missing_file_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        load_csv(tmp_path / "nope.csv", "y")


def test_rows_with_missing_target_are_dropped_and_counted(tmp_path: Path) -> None:
    rows = ["a,y"] + [f"{i},{'' if i == 3 else i % 2}" for i in range(30)]
    ds = load_csv(write(tmp_path, "\n".join(rows)), "y")
    assert len(ds) == 29 and ds.dropped_rows == 1


@pytest.mark.parametrize("name", ["iris", "wine", "breast_cancer", "digits", "diabetes"])
def test_builtin_datasets_load_without_download(name: str) -> None:
    ds = load_builtin(name)
    assert len(ds) > 100
    expected = {"diabetes": "regression", "breast_cancer": "binary"}.get(name, "multiclass")
    assert ds.task == expected
    if name == "iris":
        assert ds.classes == ["setosa", "versicolor", "virginica"]


def test_unknown_dataset_lists_the_choices() -> None:
    with pytest.raises(DataError, match="iris, wine, breast_cancer, digits, diabetes"):
        load_builtin("mnist")


def test_split_is_seeded_disjoint_and_stratified() -> None:
    ds = load_builtin("iris")
    a, b = split(ds, seed=7), split(ds, seed=7)
    assert np.array_equal(a.test, b.test) and np.array_equal(a.train, b.train)
    assert not set(a.train) & set(a.test) and not set(a.train) & set(a.validation)
    assert a.train.size + a.validation.size + a.test.size == len(ds)
    assert set(np.bincount(ds.y[a.test])) == {10}
    assert not np.array_equal(split(ds, seed=8).test, a.test)
