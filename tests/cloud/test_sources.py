"""``DirectSources``: the URLs a served manifest names, and how long a presigned one is reused.

The presigning backend (``BlobBackend.presign``, S3) is stood in for by :class:`Signing`, which
makes a new URL per call and counts them; the clock is the test's.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from hybridml.cloud.app import create_app
from hybridml.cloud.signing import KeyRing
from hybridml.cloud.sources import DirectSources
from hybridml.cloud.storage import URLS_ENV, Storage
from hybridml.shared.errors import ConfigError
from hybridml.shared.manifest import EDGE_ROLES, Manifest
from hybridml.shared.rollout import RolloutBlock
from tests.cloud.rolloutkit import with_candidates

A, B, C = "a" * 64, "b" * 64, "c" * 64
MANIFEST = {"artifacts": [{"role": "model", "sha256": A}, {"role": "model_fp32", "sha256": B},
                          {"role": "table", "sha256": C}]}


class Signing:
    """A blob backend's ``presign``: a fresh URL per call (they differ, as S3's do)."""

    def __init__(self) -> None:
        self.calls = 0

    def presign(self, sha: str, expiry_s: int) -> str:
        self.calls += 1
        return f"https://bucket.example/{sha}?sig={self.calls}&ttl={expiry_s}"


class NoPresign:
    """A backend that cannot presign (the local directory)."""

    def presign(self, sha: str, expiry_s: int) -> str:
        raise ConfigError("a local blob directory cannot presign URLs", field="artifact_urls")


def presigning(blobs: object, clock: list[float]) -> DirectSources:
    storage = Storage(artifacts="s3://bucket/models", artifact_urls="presign",
                      presign_expiry_s=600)
    return DirectSources(blobs, storage, clock=lambda: clock[0])


def test_public_urls_name_the_edge_artifacts_under_the_base() -> None:
    src = DirectSources(None, Storage(artifact_urls="public:https://cdn.example/m/"))
    doc: dict[str, object] = {}
    src.add(doc, MANIFEST)
    assert doc == {"sources": {A: f"https://cdn.example/m/{A}", C: f"https://cdn.example/m/{C}"}}
    assert not DirectSources(None, Storage()).enabled


def test_a_presigned_url_is_reused_while_more_than_half_its_life_is_left() -> None:
    blobs, clock = Signing(), [1_000_000.0]
    src = presigning(blobs, clock)
    doc: dict[str, object] = {}
    src.add(doc, MANIFEST)
    assert blobs.calls == 2 and doc["sources"].keys() == {A, C}  # type: ignore[attr-defined]
    assert doc["sources_expire"] == "1970-01-12T13:56:40Z"  # 1_000_600
    clock[0] += 299
    again: dict[str, object] = {}
    src.add(again, MANIFEST)
    assert blobs.calls == 2 and again == doc  # from the cache: no signature made
    clock[0] += 2  # past half the life: a new URL, a later expiry
    later: dict[str, object] = {}
    src.add(later, MANIFEST)
    assert blobs.calls == 4 and later["sources"] != doc["sources"]
    assert later["sources_expire"] == "1970-01-12T14:01:41Z"  # 1_000_901


def test_the_expiry_is_the_earliest_of_the_urls_named() -> None:
    blobs, clock = Signing(), [1_000_000.0]
    src = presigning(blobs, clock)
    src.add({}, {"artifacts": [{"role": "model", "sha256": A}]})
    clock[0] += 100
    doc: dict[str, object] = {}
    src.add(doc, MANIFEST)  # A from the cache (expires at 1_000_600), C new (1_000_700)
    assert doc["sources_expire"] == "1970-01-12T13:56:40Z"


def test_a_url_the_store_cannot_make_is_left_out_and_logged(
        caplog: pytest.LogCaptureFixture) -> None:
    src = presigning(NoPresign(), [0.0])
    doc: dict[str, object] = {}
    with caplog.at_level("ERROR", logger="hybridml.cloud.sources"):
        src.add(doc, MANIFEST)
    assert doc == {}  # the device takes every artifact from /v1/artifacts
    assert "cannot presign" in caplog.text


def test_a_rollout_manifest_names_the_companion_artifacts_in_the_one_map(
        iris_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The companion is embedded without delivery keys (the outer signature covers it):
    its edge artifacts' URLs are in the outer ``sources``, beside the served version's."""
    monkeypatch.setenv("HYBRIDML_INSECURE", "1")
    monkeypatch.setenv(URLS_ENV, "public:https://cdn.example/m")
    with_candidates(iris_copy).close()
    KeyRing(iris_copy).init(activate=True)
    app = create_app(iris_copy)
    app.extensions["hybridml"]["rollouts"].start(
        "iris", "canary", candidate=3, config={"steps": [100]}, actor="cli:test")
    with app.test_client() as client:
        first = client.get("/v1/models/iris/manifest", headers={"Hybridml-Device": "dev-1"})
        doc = first.get_json()
        again = client.get("/v1/models/iris/manifest", headers={
            "Hybridml-Device": "dev-1", "If-None-Match": first.headers["ETag"]})
    served = Manifest.from_json(doc)
    block = RolloutBlock.of(served)
    assert block is not None and block.companion is not None
    assert "sources" not in block.companion
    edge = [a["sha256"] for m in (doc, block.companion) for a in m["artifacts"]
            if a["role"] in EDGE_ROLES]
    assert len(set(edge)) >= 2
    assert doc["sources"] == {sha: f"https://cdn.example/m/{sha}" for sha in edge}
    assert again.status_code == 304
