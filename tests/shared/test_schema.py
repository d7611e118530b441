"""shared.schema: the row encoder both sides use, and its canonical keys."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hybridml.shared.errors import InputError, SchemaError
from hybridml.shared.schema import Feature, InputSchema


@pytest.fixture
def schema() -> InputSchema:
    return InputSchema((
        Feature("hour", "numeric", 0.0, 23.0),
        Feature("restaurant", "categorical", categories=("r001", "r002")),
        Feature("distance", "numeric", 0.1, 9.5),
    ))


def test_dicts_and_lists_encode_to_the_same_inputs(schema: InputSchema) -> None:
    a = schema.encode([{"hour": 12, "restaurant": "r001", "distance": 2.5}])
    b = schema.encode([[12, "r001", 2.5]])
    assert a.num.dtype == np.float32 and a.num.tolist() == [[12.0, 2.5]]
    assert a.cat.tolist() == [["r001"]] and b.cat.tolist() == [["r001"]]
    assert np.array_equal(schema.keys(a), schema.keys(b))


def test_none_and_nan_mean_missing_and_share_one_key(schema: InputSchema) -> None:
    batch = schema.encode([[None, None, 1.0], [math.nan, None, 1.0]])
    assert np.isnan(batch.num[:, 0]).all()
    assert batch.cat[0, 0] == ""
    keys = schema.keys(batch)
    assert np.array_equal(keys[0], keys[1])


def test_negative_zero_and_zero_share_one_key(schema: InputSchema) -> None:
    keys = schema.keys(schema.encode([[0.0, "r001", 1.0], [-0.0, "r001", 1.0]]))
    assert np.array_equal(keys[0], keys[1])


def test_different_rows_have_different_keys(schema: InputSchema) -> None:
    keys = schema.keys(schema.encode([[1, "r001", 1.0], [1, "r002", 1.0], [1, "r001", 1.5]]))
    assert len({k.tobytes() for k in keys}) == 3
    assert keys.shape == (3, schema.key_width)


def test_out_of_range_and_unseen_categories_are_flagged(schema: InputSchema) -> None:
    batch = schema.encode([[12, "r001", 2.0], [30, "r001", 2.0], [12, "r999", 2.0]])
    assert batch.out_of_range.tolist() == [False, True, False]
    assert batch.unseen.tolist() == [False, False, True]
    assert batch.codes[:, 0].tolist() == [0, 0, -1]


@pytest.mark.parametrize(
    ("row", "field", "needle"),
    [
        ({"hour": 1, "restaurant": "r001"}, "distance", "has no column 'distance'"),
        ({"hour": 1, "restaurant": "r001", "distance": 1, "tip": 2}, "tip", "unknown column"),
        ({"hour": "12", "restaurant": "r001", "distance": 1}, "hour", "needs a number"),
        ({"hour": True, "restaurant": "r001", "distance": 1}, "hour", "needs a number"),
        ({"hour": 1, "restaurant": 7, "distance": 1}, "restaurant", "needs a string"),
        ({"hour": math.inf, "restaurant": "r001", "distance": 1}, "hour", "infinite"),
        ({"hour": 1e39, "restaurant": "r001", "distance": 1}, "hour", "infinite"),
    ],
)
def test_bad_rows_raise_input_error_naming_the_column(
        schema: InputSchema, row: dict, field: str, needle: str) -> None:
    with pytest.raises(InputError) as err:
        schema.encode([{"hour": 1, "restaurant": "r002", "distance": 1}, row])
    assert err.value.field == field and err.value.row == 1
    assert needle in err.value.message


def test_list_rows_need_every_value(schema: InputSchema) -> None:
    with pytest.raises(InputError, match="has 2 values; the model takes 3"):
        schema.encode([[1, "r001"]])
    with pytest.raises(InputError, match="is a str"):
        schema.encode(["hour=1"])  # type: ignore[list-item]


def test_csv_columns_parse_numbers_and_missing_tokens(schema: InputSchema) -> None:
    batch = schema.encode_text({"hour": ["1", "", "NA"], "restaurant": ["r001", "", "x"],
                                   "distance": ["2.5", "3", "nan"], "extra": ["a", "b", "c"]})
    assert batch.num[0].tolist() == [1.0, 2.5]
    assert np.isnan(batch.num[1, 0]) and np.isnan(batch.num[2, 1])
    assert batch.cat[:, 0].tolist() == ["r001", "", "x"]
    assert batch.unseen.tolist() == [False, True, True]


def test_csv_column_with_text_in_numeric_names_column_and_row(schema: InputSchema) -> None:
    with pytest.raises(InputError) as err:
        schema.encode_text({"hour": ["1", "noon"], "restaurant": ["r001", "r001"],
                               "distance": ["1", "1"]})
    assert err.value.field == "hour" and err.value.row == 1


def test_schema_round_trips_through_json(schema: InputSchema) -> None:
    again = InputSchema.from_json(schema.to_json())
    assert again == schema
    assert again.names == ("hour", "restaurant", "distance")


@pytest.mark.parametrize(
    "bad",
    [[], [{"name": "a", "kind": "text"}], [{"kind": "numeric"}], "x",
     [{"name": "a", "kind": "numeric"}, {"name": "a", "kind": "numeric"}]],
)
def test_malformed_schema_json_is_a_schema_error(bad: object) -> None:
    with pytest.raises(SchemaError):
        InputSchema.from_json(bad)
