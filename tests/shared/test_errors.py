"""shared.errors: codes, statuses and the JSON round trip the edge relies on."""

from __future__ import annotations

import pytest

from hybridml.shared import errors


def test_every_error_has_a_unique_code() -> None:
    codes = [k.code for k in errors._BY_CODE.values()]
    assert len(codes) == len(set(codes))


def test_input_error_round_trips_with_field_and_row() -> None:
    err = errors.InputError("row 3 column 'hour' is bad", field="hour", row=3)
    again = errors.HybridMLError.from_json(err.to_json(), 400)
    assert isinstance(again, errors.InputError)
    assert again.field == "hour" and again.row == 3  # type: ignore[attr-defined]
    assert again.message == err.message and again.status == 400


@pytest.mark.parametrize("klass", [errors.NotFoundError, errors.ParityError,
                                   errors.CloudTimeoutError, errors.ManifestError])
def test_subclasses_are_rebuilt_from_their_code(klass: type[errors.HybridMLError]) -> None:
    again = errors.HybridMLError.from_json(klass("boom").to_json())
    assert type(again) is klass


def test_unknown_code_or_body_becomes_remote_error() -> None:
    assert type(errors.HybridMLError.from_json({"error": {"code": "??", "message": "x"}})) is \
        errors.RemoteError
    assert type(errors.HybridMLError.from_json("<html>", 502)) is errors.RemoteError


def test_http_error_carries_its_own_status_and_code() -> None:
    err = errors.HTTPError("too large", status=413, code="too_large")
    assert err.status == 413 and err.to_json()["error"]["code"] == "too_large"
