"""Attacks on freshness: downgrade, replay and freeze, by a network between device and cloud.

A real gunicorn cloud signs its manifests; ``iris`` has versions 1 and 2 and ``stable`` is on 2.
Every device store trusts the cloud's key and syncs through an
:class:`~tests.integration.attacker.Attacker`. A validly signed manifest is not enough: it
must be the cloud's *current* answer for the alias the device asked for (the signed release
block: name, alias, version, a per-model sequence that only grows, issued-at and expiry). Each
test checks that the device keeps its active version, says what happened, and that an
operator's own rollback still reaches it.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hybridml.cloud.registry import Registry
from hybridml.cloud.signing import Signer
from hybridml.cloud.train import train
from hybridml.edge import EdgeRuntime
from hybridml.edge.agent import Agent
from hybridml.edge.client import CloudClient
from hybridml.edge.store import LocalStore
from hybridml.edge.sync import SyncOptions, sync
from hybridml.shared.errors import FreshnessError, ManifestError
from hybridml.shared.release import parse_time
from tests.conftest import CloudServer, start_cloud
from tests.edgekit import install, trusting
from tests.integration.attacker import Attacker
from tests.integration.faultkit import assert_intact
from tests.integration.proxy import Fault

NAME = "iris"
EDGE = str(Path(sys.executable).parent / "hybridml-edge")
DAY = 86400.0


@dataclass
class Site:
    """The cloud (stable on v2) and a template store on v2 that trusts its key."""

    cloud: CloudServer
    registry: Path
    template: Path
    row: list[float]


@pytest.fixture(scope="module")
def site(trained_registry: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """See the module docstring."""
    base = tmp_path_factory.mktemp("freshness")
    root = base / "reg"
    shutil.copytree(trained_registry, root)
    reg = Registry(root)
    train(reg, NAME, dataset="iris", model="logreg", seed=7, params={"C": 0.3})
    reg.set_alias(NAME, "stable", 2)
    reg.close()
    server = start_cloud(root)
    try:
        template = trusting(base / "template", root)
        assert sync(template, CloudClient(server.url), NAME).version == 2
        active = template.active(NAME)
        assert active is not None
        yield Site(server, root, template.root, list(active.golden["rows"][0]))
    finally:
        server.stop()


@pytest.fixture
def store(site: Site, tmp_path: Path) -> LocalStore:
    """A private copy of the template store (on v2, trusting the cloud's key)."""
    shutil.copytree(site.template, tmp_path / "store")
    return LocalStore(tmp_path / "store")


@pytest.fixture
def own_site(site: Site, tmp_path: Path) -> Iterator[Site]:
    """A private cloud (registry copy) for tests that promote or roll back."""
    root = tmp_path / "reg"
    shutil.copytree(site.registry, root)
    server = start_cloud(root)
    yield Site(server, root, site.template, site.row)
    server.stop()


def edge(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EDGE, *args], capture_output=True, text=True, timeout=60,
                          check=False)


def cloud_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(Path(sys.executable).parent / "hybridml-cloud"), *args],
                          capture_output=True, text=True, timeout=60, check=True)


# ------------------------------------------------------------------------------ downgrade
@pytest.mark.parametrize("rewrite", [{"version": 1}, {"version": None, "alias": "old"}])
def test_a_request_rewritten_to_an_older_version_is_refused(
        site: Site, attacker: Attacker, store: LocalStore, rewrite: dict[str, object]) -> None:
    reg = Registry(site.registry)
    reg.set_alias(NAME, "old", 1)  # an alias on v1 a proxy could ask for instead
    reg.close()
    attacker.downgrade(**rewrite)  # type: ignore[arg-type]
    rt = EdgeRuntime(store, NAME, attacker.url)
    with pytest.raises(FreshnessError, match="rewritten on the way") as info:
        rt.sync()
    assert "'stable'" in info.value.message
    assert rt.version == 2
    assert_intact(store, 2, site.row)
    assert "not_fresh" in store.sync_state(NAME)["last_error"]
    # status still says what is true: v2, verified, and the sync that failed
    st = json.loads(edge("status", "--store", str(store.root), "--json").stdout)["models"][0]
    assert st["active_version"] == 2 and st["signature"]["state"] == "verified"
    assert st["last_error"].startswith("not_fresh")


# --------------------------------------------------------------------------------- replay
def test_a_replayed_older_manifest_is_refused_and_an_operator_rollback_is_followed(
        own_site: Site, tmp_path: Path) -> None:
    reg = Registry(own_site.registry)
    with Attacker(own_site.cloud.url) as attacker:
        store = trusting(tmp_path / "s", own_site.registry)
        reg.set_alias(NAME, "stable", 1)
        attacker.record()  # the attacker keeps the genuine, signed answer "stable is v1"
        assert sync(store, CloudClient(attacker.url), NAME).version == 1
        first = store.sync_state(NAME)["sequence"]
        cloud_cli("promote", NAME, "2", "--registry", str(own_site.registry))  # it follows
        assert sync(store, CloudClient(attacker.url), NAME).version == 2
        assert store.sync_state(NAME)["sequence"] > first
        attacker.replay(0)  # ...and the attacker answers with the recorded v1 manifest
        with pytest.raises(FreshnessError, match="lower than") as info:
            sync(store, CloudClient(attacker.url), NAME)
        assert "replayed or rolled-back" in info.value.message
        assert_intact(store, 2, own_site.row)
        attacker.reset()
    # The operator's own rollback to v1 is a higher sequence: the device follows it.
    done = cloud_cli("rollback", NAME, "--registry", str(own_site.registry))
    assert "stable -> v1" in done.stdout
    result = sync(store, CloudClient(own_site.cloud.url), NAME)
    assert result.changed and result.version == 1 and result.previous_version == 2
    assert store.sync_state(NAME)["sequence"] > first + 1
    reg.close()


def test_a_signed_manifest_without_a_release_block_is_refused(
        site: Site, attacker: Attacker, store: LocalStore) -> None:
    # What a recording from before this release looks like: validly signed, but it names no
    # alias, sequence or expiry, so it could be any earlier manifest.
    reg = Registry(site.registry)
    old = Signer(site.registry).sign(reg.manifest(NAME, 1))
    reg.close()
    attacker.add(Fault(path="/manifest", transform=lambda _body: json.dumps(old).encode()))
    with pytest.raises(FreshnessError, match="no signed release block"):
        sync(store, CloudClient(attacker.url), NAME)
    assert_intact(store, 2, site.row)


def test_a_manifest_for_another_model_is_refused(
        site: Site, attacker: Attacker, store: LocalStore) -> None:
    attacker.add(Fault(path="/manifest", reroute=("/models/iris/", "/models/eta/")))
    with pytest.raises(ManifestError, match="asked for 'iris'"):
        sync(store, CloudClient(attacker.url), NAME)
    assert_intact(store, 2, site.row)


# ------------------------------------------------------------------------- clocks, expiry
def test_an_expired_manifest_is_refused_and_a_clock_in_the_past_only_warns(
        site: Site, store: LocalStore, caplog: pytest.LogCaptureFixture) -> None:
    client = CloudClient(site.cloud.url)
    # Two days ahead, every manifest has expired: refused, and the message points at the clock.
    ahead = SyncOptions(clock=lambda: time.time() + 2 * DAY)
    store.save_sync_state(NAME, {})  # no ETag: the cloud sends the manifest again
    with pytest.raises(FreshnessError, match="expired") as info:
        sync(store, client, NAME, ahead)
    assert "clock" in info.value.message
    assert_intact(store, 2, site.row)
    # A Pi without a real-time clock boots in the past: before the newest issued-at it has
    # seen, the clock is implausible — the sync goes on, on the sequence alone, with a warning.
    behind = SyncOptions(clock=lambda: time.time() - 30 * DAY)
    store.save_sync_state(NAME, {"sequence": 1})
    with caplog.at_level(logging.WARNING, "hybridml.edge.freshness"):
        result = sync(store, client, NAME, behind)
    assert result.version == 2 and not result.changed
    assert "clock" in caplog.text and "not checked" in caplog.text
    st = json.loads(edge("status", "--store", str(store.root), "--json").stdout)["models"][0]
    assert st["freshness"]["state"] == "fresh"


# --------------------------------------------------------------------------------- freeze
def test_a_frozen_device_says_stale_and_the_agent_logs_it(
        site: Site, attacker: Attacker, store: LocalStore,
        caplog: pytest.LogCaptureFixture) -> None:
    assert sync(store, CloudClient(attacker.url), NAME).version == 2  # fresh: just signed
    st = json.loads(edge("status", "--store", str(store.root), "--json").stdout)["models"][0]
    assert st["freshness"]["state"] == "fresh" and st["freshness"]["sequence"] >= 1
    attacker.freeze()  # 304 Not Modified forever: no new signed manifest ever arrives
    later = time.time() + 2 * DAY
    frozen = SyncOptions(clock=lambda: later)
    result = sync(store, CloudClient(attacker.url), NAME, frozen)
    assert not result.changed and result.version == 2  # nothing fails...
    agent = Agent(store, CloudClient(attacker.url), NAME, options=frozen)
    with caplog.at_level(logging.WARNING, "hybridml.edge.agent"):
        agent.step()
    assert agent.failures == 0
    assert "STALE" in caplog.text and "withholds updates" in caplog.text  # ...but it shows
    assert agent.freshness()["state"] == "stale"
    time.sleep(0.6)
    text = edge("status", "--store", str(store.root), "--stale-after", "0.5")
    assert "freshness: STALE since" in text.stdout, text.stdout
    assert_intact(store, 2, site.row)


def test_an_honest_cloud_re_signs_so_a_syncing_device_stays_fresh(
        site: Site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A manifest lifetime of 8 s re-signs every 2 s (a quarter of it): a new issued-at.
    root = tmp_path / "reg"
    shutil.copytree(site.registry, root)
    monkeypatch.setenv("HYBRIDML_MANIFEST_LIFETIME_S", "8")  # read by the server it starts
    server = start_cloud(root)
    try:
        store = trusting(tmp_path / "s", root)
        client = CloudClient(server.url)
        sync(store, client, NAME)
        first = store.sync_state(NAME)
        time.sleep(2.1)
        assert not sync(store, client, NAME).changed  # the same model, re-signed
        second = store.sync_state(NAME)
        assert second["issued"] > first["issued"] and second["fresh_at"] >= first["fresh_at"]
        assert second["sequence"] == first["sequence"]
        assert store.previous(NAME) is None  # a re-signed manifest is no new version
        active = store.active(NAME)  # the stored manifest carries the newer signature
        assert active is not None and active.release is not None
        assert active.release.issued == parse_time(second["issued"], "issued")
        assert active.release.expires - active.release.issued == 8
    finally:
        server.stop()


# ---------------------------------------------------------------------------------- upgrade
def test_a_store_of_the_previous_release_upgrades_without_downloading(
        site: Site, tmp_path: Path) -> None:
    # Yesterday's device: an active manifest without a release block, no sequence recorded.
    store = trusting(tmp_path / "s", site.registry)
    reg = Registry(site.registry)
    install(reg, NAME, store, 2)
    reg.close()
    assert store.active(NAME).release is None  # type: ignore[union-attr]
    result = sync(store, CloudClient(site.cloud.url), NAME)
    assert not result.changed and result.downloaded == () and result.bytes_downloaded == 0
    active = store.active(NAME)
    assert active is not None and active.version == 2 and active.release is not None
    assert store.sync_state(NAME)["sequence"] == active.release.sequence
    assert store.previous(NAME) is None


# ------------------------------------------------------------------------------ the agent
def test_a_manifest_nested_200000_deep_is_a_typed_error_and_the_agent_lives_on(
        site: Site, attacker: Attacker, store: LocalStore) -> None:
    attacker.add(Fault(path="/manifest", transform=lambda _body: b"[" * 200_000))
    store.save_sync_state(NAME, {})  # no ETag: the cloud answers with a body to rewrite
    with pytest.raises(ManifestError, match="nests"):
        sync(store, CloudClient(attacker.url), NAME)
    agent = Agent(store, CloudClient(attacker.url), NAME, seed=1)
    delays = [agent.step() for _ in range(3)]  # each step fails, none kills the loop
    assert agent.failures == 3 and delays[2] < agent.settings.interval  # backing off
    attacker.reset()
    agent.step()
    assert agent.failures == 0
    assert_intact(store, 2, site.row)
