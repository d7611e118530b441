"""Shared set-up of the fault tests: a cloud with two versions and an edge store on the first.

``two_versions`` (module scope) copies the trained registry, trains ``iris`` v2 (a random
forest of a few hundred KB, so downloads span several chunks and gzip applies), serves it with
``stable`` on v1, syncs a template store to v1, then promotes v2. Each test copies the template
store (:func:`fresh_store`) and tries to reach v2 under some fault.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hybridml.cloud.quality import QualityOptions
from hybridml.cloud.registry import Registry
from hybridml.cloud.train import train
from hybridml.edge import EdgeRuntime
from hybridml.edge.client import CloudClient
from hybridml.edge.store import LocalStore
from hybridml.edge.sync import sync
from hybridml.shared.files import file_sha256
from hybridml.shared.manifest import Manifest
from tests.conftest import CloudServer, start_cloud

NAME = "iris"


@dataclass
class TwoVersions:
    """A running cloud whose stable ``iris`` is v2, and a store synced to v1."""

    cloud: CloudServer
    template: Path
    v1: Manifest
    v2: Manifest

    @property
    def model2(self) -> tuple[str, int]:
        """(sha256, size) of v2's edge model."""
        art = self.v2.artifact("model")
        assert art is not None
        return art.sha256, art.size

    def row(self) -> list[float]:
        """A valid input row (v1's first golden row, in schema order)."""
        return list(self.v1.golden["rows"][0])


@pytest.fixture(scope="module")
def two_versions(trained_registry: Path,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoVersions]:
    """See the module docstring."""
    base = tmp_path_factory.mktemp("faults")
    root = base / "reg"
    shutil.copytree(trained_registry, root)
    reg = Registry(root)
    # The model is the one artifact whose download the faults cut: no device explainer.
    train(reg, NAME, dataset="iris", model="rf", seed=3, params={"n_estimators": 300},
          quality=QualityOptions(explainer=False))
    server = start_cloud(root)
    try:
        template = base / "template"
        client = CloudClient(server.url)
        assert sync(LocalStore(server.trust(template)), client, NAME).version == 1
        client.close()
        reg.set_alias(NAME, "stable", 2)
        v1 = Manifest.from_json(reg.manifest(NAME, 1))
        v2 = Manifest.from_json(reg.manifest(NAME, 2))
        reg.close()
        yield TwoVersions(server, template, v1, v2)
    finally:
        server.stop()


def fresh_store(tv: TwoVersions, dst: Path) -> LocalStore:
    """A private copy of the template store (on v1)."""
    shutil.copytree(tv.template, dst)
    return LocalStore(dst)


def leftovers(store: LocalStore) -> list[str]:
    """Files that should not outlive a finished sync: ``.part`` and temp files."""
    return sorted(str(p.relative_to(store.root)) for p in store.root.rglob("*")
                  if p.name.endswith((".part", ".tmp")))


def assert_intact(store: LocalStore, version: int, row: list[float],
                  *, allow_part: bool = False) -> None:
    """The store is on ``version``, serves a prediction, and holds nothing half-written."""
    active = store.active(NAME)
    assert active is not None and active.version == version
    for p in store.artifacts.iterdir():
        if p.name.endswith(".part") and allow_part:
            continue
        assert file_sha256(p) == p.name, f"{p.name} in the store does not hash to its name"
    if not allow_part:
        assert leftovers(store) == []
    rt = EdgeRuntime(store, NAME)
    pred = rt.predict([row])[0]
    assert pred.model_version == version and pred.source == "edge" and not pred.degraded
