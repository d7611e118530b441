"""The manifest endpoint in a rollout: per-device roles, signed blocks, ETags, no leaks."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from hybridml.cloud.app import create_app
from hybridml.cloud.rollouts import Rollouts
from hybridml.cloud.signing import KeyRing
from hybridml.cloud.tokens import TokenStore
from hybridml.shared.manifest import Manifest
from hybridml.shared.rollout import RolloutBlock
from hybridml.shared.signature import signed_payload
from tests.cloud.rolloutkit import with_candidates

URL = "/v1/models/iris/manifest"
DEVICES = [f"dev-{i:03d}" for i in range(200)]


@pytest.fixture
def app(iris_copy: Path, monkeypatch: pytest.MonkeyPatch) -> Flask:
    """The insecure app over iris v1 (stable) .. v4, signing with a fresh key."""
    monkeypatch.setenv("HYBRIDML_INSECURE", "1")
    with_candidates(iris_copy).close()
    KeyRing(iris_copy).init(activate=True)
    return create_app(iris_copy)


@pytest.fixture
def client(app: Flask) -> Iterator[FlaskClient]:
    with app.test_client() as c:
        yield c


@pytest.fixture
def rollouts(app: Flask) -> Rollouts:
    r: Rollouts = app.extensions["hybridml"]["rollouts"]
    return r


def _get(client: FlaskClient, device: str | None, query: str = "") -> dict[str, object]:
    headers = {} if device is None else {"Hybridml-Device": device}
    resp = client.get(URL + query, headers=headers)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    doc: dict[str, object] = resp.get_json()
    return doc


def _cohort(client: FlaskClient) -> set[str]:
    return {d for d in DEVICES if "rollout" in _get(client, d)}


def test_a_canary_cohort_is_stable_per_device_and_grows_as_a_superset(
        client: FlaskClient, rollouts: Rollouts) -> None:
    r = rollouts.start("iris", "canary", candidate=3, config={"steps": [5, 20, 100]},
                       actor="cli:test")
    small = _cohort(client)
    assert 2 <= len(small) <= 22  # about 5 % of 200
    assert _cohort(client) == small  # the same devices every time
    rollouts.advance(r.id, 1, actor="cli:test")
    large = _cohort(client)
    assert small < large and 24 <= len(large) <= 60  # about 20 %, and every earlier one
    assert {u.unit for u in rollouts.units(r.id) if u.arm == "candidate"} == large


def test_a_cohort_device_gets_the_candidate_with_a_signed_rollout_block(
        app: Flask, client: FlaskClient, rollouts: Rollouts, iris_copy: Path) -> None:
    r = rollouts.start("iris", "canary", candidate=3, config={"steps": [20, 100]},
                       actor="cli:test")
    device = sorted(_cohort(client))[0]
    doc = _get(client, device)
    assert doc["version"] == 3
    release = doc["release"]
    assert isinstance(release, dict)
    assert release["ref"] == "stable" and release["version"] == 3
    block = RolloutBlock.from_json(doc["rollout"])
    assert (block.id, block.strategy, block.role, block.arm, block.stable, block.candidate,
            block.serve, block.step, block.percent, block.sample, block.forced) == \
        (r.id, "canary", "canary", "candidate", 1, 3, 3, 0, 20.0, 0.1, False)
    assert block.companion == Rollouts(rollouts.registry).registry.manifest("iris", 1)
    parsed = Manifest.from_json(doc)
    assert RolloutBlock.of(parsed) == block
    assert parsed.content() == Manifest.from_json(
        rollouts.registry.manifest("iris", 3)).content()
    ring = KeyRing(iris_copy)
    signature = doc["signature"]
    assert isinstance(signature, dict)
    key = ring.private_key(signature["key_id"]).public_key()
    key.verify(base64.b64decode(signature["value"]), signed_payload(doc))  # raises if bad


def test_outside_the_cohort_the_answer_is_byte_for_byte_today_s(
        client: FlaskClient, rollouts: Rollouts) -> None:
    rollouts.start("iris", "canary", candidate=3, config={"steps": [5, 100]},
                   actor="cli:test")
    inside = _cohort(client)
    outside = next(d for d in DEVICES if d not in inside)
    plain = client.get(URL)  # no unit: never in a rollout
    other = client.get(URL, headers={"Hybridml-Device": outside})
    assert other.data == plain.data and other.headers["ETag"] == plain.headers["ETag"]
    assert json.loads(other.data)["version"] == 1 and "rollout" not in json.loads(other.data)
    for bad in ("x" * 65, "dev\x01"):  # malformed ids are ignored
        assert client.get(URL, headers={"Hybridml-Device": bad}).data == plain.data


def test_a_conditional_request_in_the_cohort_is_a_small_304(
        client: FlaskClient, rollouts: Rollouts) -> None:
    rollouts.start("iris", "shadow", candidate=3, actor="cli:test")
    first = client.get(URL, headers={"Hybridml-Device": "dev-001"})
    assert first.status_code == 200 and first.get_json()["rollout"]["role"] == "shadow"
    assert first.get_json()["version"] == 1  # shadow serves stable, the candidate beside it
    etag = first.headers["ETag"]
    again = client.get(URL, headers={"Hybridml-Device": "dev-001", "If-None-Match": etag})
    assert again.status_code == 304 and len(again.data) < 1024
    assert again.headers["ETag"] == etag
    plain = client.get(URL)
    assert plain.headers["ETag"] != etag  # another role, another ETag


def test_abort_sends_the_cohort_back_to_stable_with_a_higher_sequence(
        client: FlaskClient, rollouts: Rollouts) -> None:
    rollouts.start("iris", "canary", candidate=3, config={"steps": [20, 100]},
                   actor="cli:test")
    device = sorted(_cohort(client))[0]
    during = _get(client, device)
    rollouts.abort("iris", actor="cli:test", reason="test")
    after = _get(client, device)
    assert after["version"] == 1 and "rollout" not in after
    seq_during = during["release"]["sequence"]  # type: ignore[index]
    assert after["release"]["sequence"] > seq_during  # type: ignore[index]


def test_only_the_default_stable_request_takes_part(client: FlaskClient,
                                                    rollouts: Rollouts) -> None:
    rollouts.start("iris", "canary", candidate=3, config={"steps": [100]}, actor="cli:test")
    assert _get(client, "dev-001")["version"] == 3
    assert "rollout" in _get(client, "dev-001", "?alias=stable")
    for query in ("?version=3", "?version=1", "?alias=latest"):
        assert "rollout" not in _get(client, "dev-001", query)
    assert "rollout" not in _get(client, None)


def test_an_ab_device_gets_its_arm_without_a_companion(client: FlaskClient,
                                                       rollouts: Rollouts) -> None:
    rollouts.start("iris", "ab", arms=[1, 4], actor="cli:test")
    seen = {}
    for device in DEVICES[:40]:
        doc = _get(client, device)
        block = doc["rollout"]
        assert isinstance(block, dict) and block["companion"] is None
        assert block["role"] == "arm" and doc["version"] == block["serve"]
        seen[block["arm"]] = doc["version"]
    assert seen == {"A": 1, "B": 4}


def test_with_tokens_the_token_name_is_the_unit(iris_copy: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HYBRIDML_INSECURE", raising=False)
    with_candidates(iris_copy).close()
    store = TokenStore(iris_copy)
    tokens = {name: store.create("device", name)[1] for name in DEVICES[:20]}
    app = create_app(iris_copy)
    rollouts: Rollouts = app.extensions["hybridml"]["rollouts"]
    r = rollouts.start("iris", "canary", candidate=3, config={"steps": [50, 100]},
                       actor="cli:test")
    with app.test_client() as client:
        for token in tokens.values():
            auth = {"Authorization": f"Bearer {token}"}
            doc = client.get(URL, headers=auth).get_json()
            spoofed = client.get(URL, headers={**auth, "Hybridml-Device": "other"}).get_json()
            assert doc == spoofed  # the header is ignored when there is a token
    assert {u.unit for u in rollouts.units(r.id)} == set(tokens)
