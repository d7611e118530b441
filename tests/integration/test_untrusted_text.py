"""Text that is not Unicode: lone surrogates sent as JSON ``"\\ud800"`` escapes.

JSON lets a body carry ``"\\ud800"``, which Python decodes into a string that cannot be
encoded as UTF-8. Wherever one arrives — a categorical value, a column name, a body key, a
version — the cloud answers 400 naming the field, and the edge reports the row in
``errors="report"`` mode; and no error it makes carries the surrogate itself (the field is
escaped), so whoever encodes or prints the error as UTF-8 never fails.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import requests

from hybridml.cloud.registry import Registry
from hybridml.edge.runtime import EdgeRuntime
from hybridml.edge.store import LocalStore
from hybridml.shared.errors import InputError
from tests.conftest import CloudServer
from tests.edgekit import install

LATE = {"restaurant": "r001", "hour": 12, "distance_km": 3.0, "rain": "yes", "items": 2}
LONE = "\ud800"
LOW = "\udfff"


def utf8_safe(value: Any) -> bool:
    """True if ``value`` survives JSON encoding as UTF-8 (no lone surrogate anywhere)."""
    json.dumps(value, ensure_ascii=False).encode("utf-8")
    return True


CASES = [
    ("categorical value", {"inputs": [LATE | {"restaurant": LONE}]}, "restaurant", 0),
    ("categorical value, padded", {"inputs": [LATE, LATE | {"rain": f" {LOW} "}]}, "rain", 1),
    ("inside a categorical value", {"inputs": [LATE | {"restaurant": f"r0{LONE}01"}]},
     "restaurant", 0),
    ("categorical value in a list row", {"inputs": [[LONE, 12, 3.0, "yes", 2]]},
     "restaurant", 0),
    ("numeric column", {"inputs": [LATE | {"hour": LONE}]}, "hour", 0),
    ("extra column name", {"inputs": [LATE | {LONE: 1}]}, r"\ud800", 0),
    ("column name instead of a real one",
     {"inputs": [{LOW if k == "rain" else k: v for k, v in LATE.items()}]}, "rain", 0),
    ("unknown body key", {"inputs": [LATE], LONE: 1}, r"\ud800", None),
    ("version in the body", {"inputs": [LATE], "version": LONE}, "version", None),
]


@pytest.mark.parametrize("body,field,row", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_cloud_answers_400_naming_the_field_for_lone_surrogates(
        cloud: CloudServer, body: dict[str, Any], field: str, row: int | None) -> None:
    raw = json.dumps(body).encode()  # ensure_ascii: the surrogates travel as \ud800 escapes
    assert b"\\ud" in raw
    r = requests.post(cloud.url + "/v1/models/late/predict", data=raw, timeout=10,
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "bad_input" and err["details"].get("field") == field, err
    assert err["details"].get("row") == row
    assert utf8_safe(err)


def test_edge_reports_each_row_with_a_lone_surrogate_and_predicts_the_rest(
        trained_registry: Path, tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    install(Registry(trained_registry), "late", store)
    rt = EdgeRuntime(store, "late")
    rows: list[Any] = [LATE, LATE | {"restaurant": LONE}, LATE | {LOW: 1},
                       ["r001", 12, 3.0, f"ye{LONE}s", 2], LATE | {"hour": LONE}]
    out = rt.predict(rows, errors="report")
    assert len(out) == 5 and out[0].error is None and out[0].prediction in ("late", "on_time")
    fields = [p.error["details"]["field"] if p.error else None for p in out[1:]]
    assert fields == ["restaurant", r"\udfff", "rain", "hour"]
    assert all(p.error["code"] == "bad_input" for p in out[1:] if p.error)
    assert all(utf8_safe(p.to_json()) for p in out)
    with pytest.raises(InputError) as info:  # errors="raise": the first bad row
        rt.predict(rows)
    assert info.value.row == 1 and info.value.field == "restaurant"
    one = rt.predict([rows[2]], errors="report")  # a single row takes the fast path first
    assert one[0].error is not None and one[0].error["details"]["field"] == r"\udfff"
    text = rt.predict_text({"restaurant": ["r001", LONE], "hour": ["12", LOW],
                            "distance_km": ["3.0", "3.0"], "rain": ["yes", "no"],
                            "items": ["2", "2"]}, errors="report")
    assert text[0].error is None and text[1].error is not None
    assert text[1].error["details"]["field"] == "restaurant"
    assert all(utf8_safe(p.to_json()) for p in text)
