"""A model that needs a newer onnxruntime than the device has is refused before it is fetched.

The cloud's compression guard records ``compression.requires_onnxruntime`` (docs/device.md §4).
Version 2 of iris here is version 1's model with a requirement no onnxruntime meets; the real
cloud app serves it and the edge syncs it over HTTP, as a device would.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from hybridml.cloud.registry import Registry
from hybridml.cloud.train import train
from hybridml.edge import compat
from hybridml.edge.runtime import EdgeRuntime
from hybridml.edge.store import LocalStore
from hybridml.shared.errors import ModelLoadError
from hybridml.shared.manifest import Manifest
from tests.edgekit import ThreadCloud

ROW = [5.1, 3.5, 1.4, 0.2]
FUTURE = "99.0"


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """iris v1 (logreg), and v2: the same model, needing onnxruntime 99.0 (stable is v1)."""
    root = tmp_path_factory.mktemp("compat") / "reg"
    reg = Registry(root)
    first = train(reg, "iris", dataset="iris", model="logreg").manifest
    doc = {k: v for k, v in first.items()
           if k not in ("name", "version", "parent", "lineage", "created", "format")}
    doc["compression"] = {**doc["compression"], "requires_onnxruntime": FUTURE}
    reg.create_version("iris", doc, reg.metadata("iris", 1), parent=1)
    reg.close()
    return root


@pytest.fixture(scope="module")
def cloud(registry: Path) -> Iterator[ThreadCloud]:
    """The cloud app over the registry."""
    server = ThreadCloud(registry)
    yield server
    server.close()


def test_sync_refuses_a_model_needing_a_newer_onnxruntime_and_keeps_serving(
        registry: Path, cloud: ThreadCloud, tmp_path: Path) -> None:
    store = LocalStore(cloud.trust(tmp_path / "store"))
    rt = EdgeRuntime(store, "iris", cloud.url, token=cloud.token)
    assert rt.sync().version == 1
    reg = Registry(registry)
    reg.set_alias("iris", "stable", 2)
    reg.close()
    with pytest.raises(ModelLoadError, match=r"needs onnxruntime >= 99\.0") as err:
        rt.sync()
    assert err.value.details["required"] == FUTURE
    assert err.value.details["installed"] == compat.installed_onnxruntime()
    assert store.require_active("iris").version == 1
    assert rt.predict([ROW])[0].model_version == 1


def test_a_manifest_without_a_compression_block_needs_nothing(registry: Path) -> None:
    reg = Registry(registry, create=False)
    doc = dict(reg.manifest("iris", 1))
    reg.close()
    doc.pop("compression")
    compat.check(Manifest.from_json(doc), installed="1.17.0")
    doc["compression"] = {"requires_onnxruntime": "1.21"}
    with pytest.raises(ModelLoadError, match=r"this device has 1\.20\.1"):
        compat.check(Manifest.from_json(doc), installed="1.20.1")
    compat.check(Manifest.from_json(doc), installed="1.21.0")
