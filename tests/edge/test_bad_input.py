"""Bad rows at the edge: typed InputErrors naming the row and the column, per-row reports.

The rules are the cloud API's (one schema encodes on both sides): numbers for numeric
columns, strings for categorical ones, ``None`` for missing. In Python a float NaN also means
missing (it is what pandas and numpy produce); the API refuses the ``NaN`` literal only because
it is not JSON, and the edge client sends NaN to the cloud as ``null``. Infinities and values
past float32 are refused on both sides.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hybridml.cloud.registry import Registry
from hybridml.cloud.train import train
from hybridml.edge.runtime import EdgeRuntime
from hybridml.edge.store import LocalStore
from hybridml.shared.errors import ConfigError, HybridMLError, InputError
from hybridml.shared.manifest import Manifest
from tests.conftest import write_orders_csv

IRIS = {"sepal_length_cm": 5.1, "sepal_width_cm": 3.5, "petal_length_cm": 1.4,
        "petal_width_cm": 0.2}
LATE = {"restaurant": "r001", "hour": 12, "distance_km": 3.0, "rain": "no", "items": 2}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store with iris (numeric only) and late (numeric + categorical) active, no cloud."""
    root = tmp_path_factory.mktemp("bad_input")
    reg = Registry(root / "reg")
    train(reg, "iris", dataset="iris", model="logreg")
    csv = write_orders_csv(root / "orders.csv", n=200)
    train(reg, "late", data=csv, target="late", model="logreg", drop=["delivery_minutes"])
    local = LocalStore(root / "store").ensure()
    for name in ("iris", "late"):
        manifest = reg.manifest(name)
        for art in manifest["artifacts"]:
            shutil.copyfile(reg.blob_path(art["sha256"]), local.artifact_path(art["sha256"]))
        local.activate(Manifest.from_json(manifest))
    reg.close()
    return local.root


@pytest.fixture(scope="module")
def iris(store: Path) -> EdgeRuntime:
    """Offline runtime of the iris model."""
    return EdgeRuntime(store, "iris")


@pytest.fixture(scope="module")
def late(store: Path) -> EdgeRuntime:
    """Offline runtime of the late model (has categorical columns)."""
    return EdgeRuntime(store, "late")


def without(row: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k != key}


# (case id, model, bad row, column the error names or None, a word of the message)
BAD_ROWS: list[tuple[str, str, Any, str | None, str]] = [
    ("missing column", "iris", without(IRIS, "sepal_width_cm"), "sepal_width_cm", "null"),
    ("unknown column", "iris", IRIS | {"colour": 1.0}, "colour", "unknown column"),
    ("unknown column instead of one", "iris",
     without(IRIS, "petal_width_cm") | {"petal_widht_cm": 0.2}, "petal_width_cm", "no column"),
    ("non-string key", "iris", without(IRIS, "sepal_length_cm") | {1: 5.1}, "sepal_length_cm",
     "no column"),
    ("unicode column", "iris", IRIS | {"größe_高さ": 1.0}, "größe_高さ", "größe_高さ"),
    ("short list row", "iris", [5.1, 3.5, 1.4], None, "sepal_length_cm"),
    ("long tuple row", "iris", (5.1, 3.5, 1.4, 0.2, 0.0), None, "takes 4"),
    ("string row", "iris", "5.1,3.5,1.4,0.2", None, "str"),
    ("int row", "iris", 7, None, "int"),
    ("None row", "iris", None, None, "NoneType"),
    ("set row", "iris", {5.1, 3.5, 1.4, 0.2}, None, "set"),
    ("numpy array row", "iris", np.array([5.1, 3.5, 1.4, 0.2]), None, "list in schema order"),
    ("string in numeric", "iris", IRIS | {"sepal_width_cm": "3.5"}, "sepal_width_cm", "number"),
    ("bytes in numeric", "iris", IRIS | {"sepal_width_cm": b"3"}, "sepal_width_cm", "number"),
    ("bool in numeric", "iris", IRIS | {"petal_length_cm": True}, "petal_length_cm", "number"),
    ("numpy bool in numeric", "iris", IRIS | {"petal_length_cm": np.bool_(True)},
     "petal_length_cm", "number"),
    ("list in numeric", "iris", IRIS | {"petal_width_cm": [0.2]}, "petal_width_cm", "number"),
    ("dict in numeric", "iris", IRIS | {"petal_width_cm": {"v": 0.2}}, "petal_width_cm",
     "number"),
    ("complex in numeric", "iris", IRIS | {"petal_width_cm": 1j}, "petal_width_cm", "number"),
    ("inf", "iris", IRIS | {"sepal_length_cm": math.inf}, "sepal_length_cm", "infinite"),
    ("-inf in a list row", "iris", [5.1, -math.inf, 1.4, 0.2], "sepal_width_cm", "infinite"),
    ("numpy inf", "iris", IRIS | {"sepal_length_cm": np.float64("inf")}, "sepal_length_cm",
     "infinite"),
    ("past float32", "iris", IRIS | {"petal_length_cm": 1e39}, "petal_length_cm", "float32"),
    ("int 10**400", "iris", IRIS | {"petal_length_cm": 10**400}, "petal_length_cm", "finite"),
    ("int 10**400 with a None", "iris",
     IRIS | {"petal_length_cm": 10**400, "sepal_length_cm": None}, "petal_length_cm", "finite"),
    ("number in categorical", "late", LATE | {"rain": 0}, "rain", "string"),
    ("bytes in categorical", "late", LATE | {"restaurant": b"r001"}, "restaurant", "string"),
    ("list in categorical", "late", LATE | {"restaurant": ["r001"]}, "restaurant", "string"),
    ("NaN in categorical", "late", LATE | {"rain": math.nan}, "rain", "string"),
    ("string in numeric of a mixed model", "late", LATE | {"hour": "noon"}, "hour", "number"),
]


@pytest.mark.parametrize(("model", "row", "column", "word"),
                         [c[1:] for c in BAD_ROWS], ids=[c[0] for c in BAD_ROWS])
def test_bad_row_raises_input_error_naming_the_column(
        iris: EdgeRuntime, late: EdgeRuntime, model: str, row: Any, column: str | None,
        word: str) -> None:
    rt = iris if model == "iris" else late
    good = IRIS if model == "iris" else LATE
    for batch, index in (([row], 0), ([good, good, row, good], 2)):
        with pytest.raises(InputError) as err:
            rt.predict(batch)
        assert err.value.code == "bad_input" and err.value.status == 400
        assert err.value.field == column and err.value.details.get("field") == column
        assert err.value.row == index and err.value.message.startswith(f"row {index} ")
        assert word in err.value.message
        if column is not None:
            assert repr(column) in err.value.message


@pytest.mark.parametrize("missing", [None, math.nan, np.nan, np.float32("nan")])
def test_none_and_nan_both_mean_missing_in_numeric_columns(iris: EdgeRuntime,
                                                           missing: Any) -> None:
    reference = iris.predict([IRIS | {"petal_length_cm": None}])[0]
    got = iris.predict([IRIS | {"petal_length_cm": missing}])[0]
    assert got.error is None and got.prediction == reference.prediction
    assert got.probabilities == reference.probabilities


def test_none_means_missing_in_categorical_columns(late: EdgeRuntime) -> None:
    p = late.predict([LATE | {"rain": None}, LATE | {"rain": ""}])
    assert p[0].prediction == p[1].prediction and p[0].probabilities == p[1].probabilities


def test_numpy_scalars_and_str_subclasses_are_accepted(late: EdgeRuntime) -> None:
    plain = late.predict([LATE])[0]
    row = LATE | {"hour": np.int64(12), "distance_km": np.float32(3.0), "items": np.int8(2),
                  "restaurant": np.str_("r001")}
    got = late.predict([row])[0]
    assert got.prediction == plain.prediction and got.probabilities == plain.probabilities


def test_report_mode_marks_bad_rows_and_predicts_the_good_ones(iris: EdgeRuntime) -> None:
    good = [IRIS, [6.7, 3.0, 5.2, 2.3], IRIS | {"sepal_length_cm": None}, [5.9, 3.0, 4.2, 1.5]]
    bad = {1: (without(IRIS, "petal_width_cm"), "petal_width_cm"),
           3: (IRIS | {"sepal_width_cm": "wide"}, "sepal_width_cm"),
           4: ("not a row", None),
           6: (IRIS | {"petal_length_cm": math.inf}, "petal_length_cm"),
           11: ([1.0, 2.0], None)}
    rows: list[Any] = []
    goods = iter(good * 2)
    for i in range(12):
        rows.append(bad[i][0] if i in bad else next(goods))
    out = iris.predict(rows, errors="report")
    assert len(out) == len(rows)
    alone = iris.predict([r for i, r in enumerate(rows) if i not in bad])
    it = iter(alone)
    for i, p in enumerate(out):
        if i in bad:
            assert p.prediction is None and p.error is not None
            assert p.error["code"] == "bad_input"
            assert p.error["details"]["row"] == i
            assert p.error["details"].get("field") == bad[i][1]
            assert p.error["message"].startswith(f"row {i} ")
            assert p.to_json()["error"] == p.error
        else:
            ref = next(it)
            assert p.error is None and p.prediction == ref.prediction
            assert p.probabilities == ref.probabilities and p.source == "edge"


def test_report_mode_with_only_bad_rows_raises_nothing(late: EdgeRuntime) -> None:
    out = late.predict([LATE | {"rain": 1}, None, LATE | {"hour": math.inf}],
                       errors="report")
    assert [p.error["details"]["row"] for p in out if p.error] == [0, 1, 2]
    assert [p.error["details"].get("field") for p in out if p.error] == ["rain", None, "hour"]


def test_report_mode_for_a_single_bad_row_reports_it(iris: EdgeRuntime) -> None:
    out = iris.predict([IRIS | {"sepal_length_cm": "x"}], errors="report")
    assert len(out) == 1 and out[0].error is not None
    assert out[0].error["details"] == {"field": "sepal_length_cm", "row": 0}
    one = iris.predict([IRIS], errors="report")[0]
    assert one.error is None and one.prediction == "setosa"


def test_report_mode_on_good_rows_equals_raise_mode(late: EdgeRuntime) -> None:
    rows = [LATE, LATE | {"restaurant": "r003", "rain": "yes"}, LATE | {"distance_km": None}]
    a = late.predict(rows, errors="report")
    b = late.predict(rows)
    assert [(p.prediction, p.probabilities) for p in a] == \
        [(p.prediction, p.probabilities) for p in b]


def test_empty_batch_predicts_nothing(iris: EdgeRuntime) -> None:
    assert iris.predict([]) == [] and iris.predict([], errors="report") == []


def test_unknown_errors_mode_is_refused(iris: EdgeRuntime) -> None:
    with pytest.raises(ConfigError) as err:
        iris.predict([IRIS], errors="ignore")
    assert err.value.details["field"] == "errors"


def test_input_errors_survive_the_json_round_trip(iris: EdgeRuntime) -> None:
    with pytest.raises(InputError) as err:
        iris.predict([IRIS, IRIS | {"petal_width_cm": "x"}])
    back = HybridMLError.from_json(err.value.to_json(), 400)
    assert isinstance(back, InputError) and (back.field, back.row) == ("petal_width_cm", 1)
