"""Attacks on the edge's transport: a hostile network between the device and a real cloud.

An :class:`~tests.integration.attacker.Attacker` sits between the edge and a real gunicorn
cloud on loopback whose registry signs its manifests; every device store trusts that key and
is on v1 of ``iris`` and ``late``. Each test switches on one attack and checks three things:

* the device's state is unchanged: the same active version, artifacts that hash to their
  names, nothing half-written;
* where a gzip bomb is involved, memory stays bounded: the device side runs in a child process
  (:func:`~tests.integration.rss.run_device`) that compares its VmHWM before and after the
  attacked call (growth < 50 MB; the numbers are printed for the release note);
* the caller sees a typed error naming what happened (sync), or the degraded local answer with
  the failure counted by the circuit breaker (the prediction fallback) — never a raw
  exception, never the attacker's answer.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from hybridml.cloud.signing import KeyInfo, KeyRing
from hybridml.edge import EdgeRuntime, FallbackPolicy
from hybridml.edge.client import CloudClient
from hybridml.edge.store import LocalStore
from hybridml.edge.sync import sync
from hybridml.edge.trust import TrustStore
from hybridml.shared.errors import HybridMLError, RemoteError, SignatureError
from tests.conftest import CloudServer, start_cloud
from tests.integration.attacker import (
    MANIFEST,
    MIB,
    PREDICT,
    Attacker,
    OtherHost,
    bomb_decoded_size,
)
from tests.integration.faultkit import assert_intact, leftovers
from tests.integration.rss import DeviceRun, run_device

TOKEN = "hml_0123456789ab_" + "s" * 43  # a bearer token that must never leave for another host
ROW = {"restaurant": "r001", "hour": 12, "distance_km": 3.0, "rain": "no", "items": 2}
ODD = dict(ROW, distance_km=500.0)  # out of the training range: the fallback asks the cloud
GROWTH_LIMIT_MB = 50.0
ARTIFACTS = "/v1/artifacts/"


@dataclass
class Site:
    """The cloud, its signing key, and a template store on v1 of iris and late."""

    cloud: CloudServer
    registry: Path
    key: KeyInfo
    template: Path
    iris_row: list[Any]
    late_classes: list[str]
    late_answer: dict[str, Any]  # the cloud's genuine answer to ODD


@pytest.fixture(scope="module")
def site(trained_registry: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """A signing cloud over a copy of the trained registry and a store that trusts its key."""
    base = tmp_path_factory.mktemp("attacks")
    reg = base / "reg"
    shutil.copytree(trained_registry, reg)
    key = KeyRing(reg).init(activate=True)  # the one key the cloud signs with and we trust
    server = start_cloud(reg)
    try:
        template = trusting_store(base / "template", reg / "keys" / f"{key.key_id}.pub")
        client = CloudClient(server.url)
        for name in ("iris", "late"):
            assert sync(template, client, name).version == 1
        client.close()
        iris, late = template.active("iris"), template.active("late")
        assert iris is not None and late is not None and late.classes is not None
        answer = requests.post(f"{server.url}/v1/models/late/predict", json={"inputs": [ODD]},
                               timeout=10).json()
        yield Site(server, reg, key, template.root, list(iris.golden["rows"][0]),
                   [str(c) for c in late.classes], answer)
    finally:
        server.stop()


def trusting_store(path: Path, *pub_files: Path) -> LocalStore:
    """An empty store trusting ``pub_files``."""
    store = LocalStore(path).ensure()
    for f in pub_files:
        TrustStore(store.root).add(f)
    return store


@pytest.fixture(scope="module")
def module_others() -> Iterator[dict[str, OtherHost]]:
    """Servers a redirect may point to: another port of 127.0.0.1, and another address."""
    with OtherHost("127.0.0.1") as port, OtherHost("127.0.0.2") as host:
        yield {"other port": port, "other host": host}


@pytest.fixture
def others(module_others: dict[str, OtherHost]) -> dict[str, OtherHost]:
    """The redirect targets, with nothing seen yet."""
    for o in module_others.values():
        o.clear()
    return module_others


@pytest.fixture
def store(site: Site, tmp_path: Path) -> LocalStore:
    """A private copy of the template store (iris and late on v1, trusting the cloud's key)."""
    shutil.copytree(site.template, tmp_path / "store")
    return LocalStore(tmp_path / "store")


@pytest.fixture(autouse=True)
def _no_ambient_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HYBRIDML_TOKEN", raising=False)


# ---------------------------------------------------------------------------------- helpers
def raised(call: Callable[[], object]) -> BaseException | None:
    """What ``call`` raised, or None (asserted on afterwards, with a message that says why)."""
    try:
        call()
    except Exception as exc:
        return exc
    return None


def assert_unchanged(store: LocalStore, site: Site) -> None:
    """Both models still on v1, artifacts whole, nothing half-written; iris still predicts."""
    late = store.active("late")
    assert late is not None and late.version == 1
    assert_intact(store, 1, site.iris_row)


def assert_bounded(run: DeviceRun, what: str) -> None:
    """Peak memory grew less than the limit during the call and while lingering after it."""
    print(f"MEMORY {what}: {run.summary()}")
    assert run.killed is None and run.growth_mb < GROWTH_LIMIT_MB and \
        run.linger_growth_mb < GROWTH_LIMIT_MB, \
        f"{what}: {run.summary()} (limit {GROWTH_LIMIT_MB:g} MB)"


def fallback_runtime(store: LocalStore, url: str) -> EdgeRuntime:
    """A runtime serving ``late`` with a cloud fallback through ``url`` and the device token."""
    return EdgeRuntime(store, "late", url, token=TOKEN,
                       policy=FallbackPolicy(timeout_ms=3000, cooldown_s=60))


def assert_local_answer(rt: EdgeRuntime, site: Site, what: str) -> None:
    """``ODD`` gets the degraded local answer of v1 and the failure is counted."""
    pred = rt.predict([ODD])[0]
    assert pred.source != "cloud", f"{what}: the device used the cloud's answer {pred!r}"
    assert pred.degraded and pred.model_version == 1 and pred.prediction in site.late_classes
    assert rt.cloud_failures == 1 and rt.breaker.state == "open", \
        f"{what}: not counted as a cloud failure ({rt.cloud_failures} failures, breaker " \
        f"{rt.breaker.state}, last error {rt.last_cloud_error!r})"
    assert rt.last_cloud_error


def token_leaks(other: OtherHost) -> list[str]:
    """Requests that reached ``other`` carrying the device's token."""
    return [f"{s.method} {s.path}" for s in other.seen
            if any(TOKEN in v for v in s.headers.values())]


# ------------------------------------------------------------------------------ gzip bombs
@pytest.mark.parametrize("compressed", [265_000, MIB], ids=["265KB", "1MB"])
def test_manifest_gzip_bomb_is_cut_off_with_body_too_large_in_bounded_memory(
        site: Site, attacker: Attacker, store: LocalStore, compressed: int) -> None:
    attacker.manifest_bomb(compressed)
    run = run_device({"op": "sync", "store": str(store.root), "url": attacker.url,
                      "name": "iris", "warmup_url": site.cloud.url})
    decoded = bomb_decoded_size(compressed)
    assert_bounded(run, f"sync under a {compressed:,}-byte manifest bomb ({decoded:,} decoded)")
    assert run.error_type == "BodyTooLargeError", run.summary()
    assert run.error is not None and run.error["code"] == "body_too_large"
    assert re.search(r"(?i)manifest", run.error["message"]), run.error["message"]
    assert_unchanged(store, site)


def test_error_body_bomb_on_the_manifest_request_is_a_typed_error_in_bounded_memory(
        site: Site, attacker: Attacker, store: LocalStore) -> None:
    attacker.error_bomb(MIB, 500, path=MANIFEST)
    run = run_device({"op": "sync", "store": str(store.root), "url": attacker.url,
                      "name": "iris", "warmup_url": site.cloud.url})
    assert_bounded(run, "sync under a 500 with a 1 MB gzip error body")
    assert run.error is not None and run.error["remote"], run.summary()
    assert re.search(r"(?i)too large|500", run.error["message"]), run.error["message"]
    assert_unchanged(store, site)


@dataclass(frozen=True)
class PredictBomb:
    """A gzip bomb answering the fallback's predict request, and how the device waits."""

    status: int
    shape: str
    timeout_ms: float
    slow_start: tuple[int, float] | None = None
    linger_s: float = 1.0


PREDICT_BOMBS = {
    # a 500 whose error body is a bomb; the caller would wait up to 8 s for it
    "500 bomb": PredictBomb(500, "error", timeout_ms=8000),
    # the same, but the gzip header drips in over 1 s (a byte every 0.1 s: no socket time-out)
    # and the caller's 300 ms timeout abandons the call mid-read; its thread must then stop
    # reading, not decode the gigabyte that follows while the process goes on
    "500 bomb, call abandoned mid-read": PredictBomb(500, "error", timeout_ms=300,
                                                     slow_start=(10, 1.0), linger_s=3.0),
    # a 200 whose prediction is a bomb (an answer is bounded in proportion to the rows)
    "200 bomb": PredictBomb(200, "predict", timeout_ms=8000),
}


@pytest.mark.parametrize("case", list(PREDICT_BOMBS))
def test_predict_gzip_bomb_leaves_local_answers_in_bounded_memory(
        site: Site, attacker: Attacker, store: LocalStore, case: str) -> None:
    b = PREDICT_BOMBS[case]
    attacker.bomb(PREDICT, MIB, status=b.status, shape=b.shape, slow_start=b.slow_start)
    run = run_device({"op": "predict", "store": str(store.root), "url": attacker.url,
                      "name": "late", "rows": [ODD], "timeout_ms": b.timeout_ms,
                      "warmup_url": site.cloud.url, "linger_s": b.linger_s})
    assert_bounded(run, f"fallback predict under a {case} (1 MB gzip)")
    assert run.ok, f"EdgeRuntime.predict raised: {run.summary()}"
    preds = run.result["predictions"]
    assert len(preds) == 1 and preds[0]["source"] != "cloud" and preds[0]["degraded"], \
        run.summary()
    assert preds[0]["model_version"] == 1
    assert run.result["cloud_failures"] == 1 and run.result["breaker"] == "open", run.summary()
    assert run.threads == [], f"the abandoned cloud call still runs: {run.summary()}"
    assert_unchanged(store, site)


# ---------------------------------------------------------- malformed and forged answers
def forged_answers(site: Site) -> dict[str, Any]:
    """Answers to the one row ``ODD``: each wrong in one way (bytes are sent as they are)."""
    g = site.late_answer
    c0, c1 = site.late_classes
    return {
        "empty list": {"predictions": []},
        "not a list": {"predictions": 5},
        "forged label and version": {"predictions": ["pwned"], "model_version": 999},
        "two answers for one row": dict(g, predictions=g["predictions"] * 2,
                                        probabilities=g["probabilities"] * 2),
        "label that is no class": dict(g, predictions=["pwned"]),
        "probabilities out of range": dict(g, probabilities=[{c0: 7.5, c1: -6.5}]),
        "probabilities of other classes": dict(g, probabilities=[{"pwned": 1.0}]),
        "NaN probabilities": json.dumps(dict(g, probabilities=[{c0: math.nan, c1: math.nan}])
                                        ).encode(),
        "another version": dict(g, model_version=2),
        "no version": {k: v for k, v in g.items() if k != "model_version"},
        "another model": dict(g, name="eta"),
        "not JSON": b"<html>pwned</html>",
    }


FORGED_CASES = ["empty list", "not a list", "forged label and version",
                "two answers for one row", "label that is no class",
                "probabilities out of range", "probabilities of other classes",
                "NaN probabilities", "another version", "no version", "another model",
                "not JSON"]


@pytest.mark.parametrize("case", FORGED_CASES)
def test_malformed_or_forged_predict_answer_gives_degraded_local_answer(
        site: Site, attacker: Attacker, store: LocalStore, case: str) -> None:
    attack = attacker.predict_answer(forged_answers(site)[case])
    rt = fallback_runtime(store, attacker.url)
    assert_local_answer(rt, site, f"answer with {case}")
    assert attack.hits == 1
    assert_unchanged(store, site)


# ------------------------------------------------------------------------------ signatures
@pytest.mark.parametrize("tamper", ["dropped signature", "untrusted key"])
def test_manifest_without_a_trusted_signature_is_refused_before_any_download(
        site: Site, attacker: Attacker, store: LocalStore, tmp_path: Path, tamper: str) -> None:
    if tamper == "dropped signature":
        attacker.drop_signature()
    else:
        attacker.resign(tmp_path / "evil")
    err = raised(lambda: sync(store, CloudClient(attacker.url), "iris"))
    assert isinstance(err, SignatureError), f"{tamper}: sync ended with {err!r}"
    expected = {"dropped signature": "not signed", "untrusted key": "does not trust"}[tamper]
    assert expected in err.message
    assert attacker.requests_to(ARTIFACTS) == []
    assert_unchanged(store, site)


def test_store_trusting_no_key_refuses_to_sync_unless_unsigned_is_allowed(
        site: Site, attacker: Attacker, tmp_path: Path) -> None:
    bare = LocalStore(tmp_path / "bare").ensure()
    client = CloudClient(attacker.url)
    err = raised(lambda: sync(bare, client, "iris"))
    assert isinstance(err, SignatureError), \
        f"a store that trusts no key synced a manifest it cannot verify: {err!r}"
    assert "trust" in err.message.lower(), err.message
    attacker.drop_signature()
    err = raised(lambda: sync(bare, client, "iris"))
    assert isinstance(err, SignatureError), f"an unsigned manifest was accepted: {err!r}"
    assert bare.active("iris") is None and leftovers(bare) == []
    assert list(bare.artifacts.iterdir()) == []
    # The explicit opt-out still works (a lab device, a cloud without keys).
    assert sync(bare, client, "iris", allow_unsigned=True).version == 1  # type: ignore[call-arg]


# ---------------------------------------------------------------------- header injection
REDIRECTS = [("manifest", "other port"), ("manifest", "other host"),
             ("artifact", "other host")]


@pytest.mark.parametrize(("where", "target"), REDIRECTS)
def test_redirect_during_sync_is_not_followed_and_the_token_stays_home(
        site: Site, attacker: Attacker, others: dict[str, OtherHost], store: LocalStore,
        tmp_path: Path, where: str, target: str) -> None:
    other = others[target]
    if where == "artifact":  # a device that must download: an empty store trusting the key
        store = trusting_store(tmp_path / "fresh", site.registry / "keys" /
                               f"{site.key.key_id}.pub")
        attacker.redirect(f"{other.url}{ARTIFACTS}stolen", 302, path=ARTIFACTS)
    else:
        attacker.redirect(f"{other.url}/v1/models/iris/manifest", 302, path=MANIFEST)
    err = raised(lambda: sync(store, CloudClient(attacker.url, token=TOKEN), "iris"))
    assert attacker.sent_headers()[0].get("Authorization") == f"Bearer {TOKEN}"
    assert token_leaks(other) == [], f"the device sent its token to {other.url}"
    assert other.seen == [], \
        f"the device followed a 302 to {other.url}: {[s.path for s in other.seen]}; " \
        f"sync ended with {err!r}"
    assert isinstance(err, RemoteError), f"sync ended with {err!r}"
    assert re.search(r"(?i)redirect|302", err.message), err.message
    if where == "artifact":
        assert store.active("iris") is None and leftovers(store) == []
    else:
        assert_unchanged(store, site)


@pytest.mark.parametrize(("status", "target"), [(302, "other host"), (307, "other port")])
def test_redirect_during_fallback_is_not_followed_and_counts_as_a_cloud_failure(
        site: Site, attacker: Attacker, others: dict[str, OtherHost], store: LocalStore,
        status: int, target: str) -> None:
    other = others[target]
    attacker.redirect(f"{other.url}/v1/models/late/predict", status, path=PREDICT)
    rt = fallback_runtime(store, attacker.url)
    pred = rt.predict([ODD])[0]
    assert token_leaks(other) == [], f"the device sent its token to {other.url}"
    assert other.seen == [], \
        f"the device followed a {status} to {other.url}: " \
        f"{[(s.method, s.path, s.body[:80]) for s in other.seen]}; it answered {pred!r}"
    assert pred.source != "cloud" and pred.degraded and pred.model_version == 1
    assert rt.cloud_failures == 1 and rt.breaker.state == "open", \
        f"a {status} was not counted as a failure (last error {rt.last_cloud_error!r})"
    assert re.search(rf"(?i)redirect|{status}", rt.last_cloud_error or ""), rt.last_cloud_error
    assert_unchanged(store, site)


HOSTILE_HEADERS: dict[str, tuple[list[tuple[str, str]], str]] = {
    "huge header": ([("X-Padding", "a" * 100_000)], r""),
    "200 headers": ([(f"X-Pad-{i}", "a") for i in range(200)], r""),
    "lying gzip": ([("Content-Encoding", "gzip")], r"(?i)decod|gzip|encod|corrupt"),
    "lying deflate": ([("Content-Encoding", "deflate")], r"(?i)decod|deflate|encod|corrupt"),
}


@pytest.mark.parametrize("case", list(HOSTILE_HEADERS))
def test_hostile_manifest_headers_give_a_typed_error(
        site: Site, attacker: Attacker, store: LocalStore, case: str) -> None:
    headers, says = HOSTILE_HEADERS[case]
    attacker.inject_headers(headers, path=MANIFEST, fresh=True)
    err = raised(lambda: sync(store, CloudClient(attacker.url), "iris"))
    assert isinstance(err, RemoteError), f"{case}: sync ended with {err!r}"
    assert re.search(says, err.message), err.message
    assert_unchanged(store, site)


POISON_ETAGS = {"control characters": '"v1\x00\x1b[2J\x07\x7f"', "9 KB": '"' + "e" * 9000 + '"'}


@pytest.mark.parametrize("case", list(POISON_ETAGS))
def test_etag_with_control_characters_leaves_sync_safe_and_working(
        site: Site, attacker: Attacker, store: LocalStore, case: str) -> None:
    attacker.inject_headers({"ETag": POISON_ETAGS[case]}, path=MANIFEST, fresh=True)
    client = CloudClient(attacker.url)
    err = raised(lambda: sync(store, client, "iris"))
    assert err is None or isinstance(err, HybridMLError), f"{case}: a raw {err!r}"
    assert_unchanged(store, site)
    attacker.reset()  # the attacker leaves: the device must be able to sync again
    err = raised(lambda: sync(store, client, "iris"))
    assert err is None, f"after one manifest with a {case} ETag, a clean sync fails: {err!r}"
    assert_unchanged(store, site)


# ------------------------------------------------------------------------- the tool itself
def test_attacker_downgrade_replay_and_freeze_shape_manifest_traffic(
        site: Site, attacker: Attacker) -> None:
    url = f"{attacker.url}/v1/models/iris/manifest?device=d1"
    attacker.downgrade(version=7, times=1)
    gone = requests.get(url, timeout=10)
    assert gone.status_code == 404 and "7" in gone.json()["error"]["message"]
    attacker.downgrade(version=None, alias="nosuchalias", times=1)
    assert "nosuchalias" in requests.get(url, timeout=10).json()["error"]["message"]
    attacker.record()
    genuine = requests.get(url, headers={"If-None-Match": "whatever"}, timeout=10)
    assert genuine.status_code == 200 and len(attacker.recorded) == 1
    attacker.replay(0)
    again = requests.get(url, timeout=10)
    assert again.content == genuine.content and again.headers["ETag"] == genuine.headers["ETag"]
    attacker.reset()
    attacker.freeze()
    frozen = requests.get(url, headers={"If-None-Match": '"old"'}, timeout=10)
    assert frozen.status_code == 304 and frozen.headers["ETag"] == '"old"'
    assert [e.fault for e in attacker.log] == [True]
