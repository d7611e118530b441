"""Fixtures shared by the cloud tests: one small iris registry, trained once per session, and
the storage backends (embedded; PostgreSQL + SeaweedFS started by the tests)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from hybridml.cloud.migrate import migrate
from hybridml.cloud.registry import Registry
from hybridml.cloud.signing import PASSPHRASE_ENV
from hybridml.cloud.storage import Storage
from hybridml.cloud.train import train

IRIS_ROW = {"sepal_length_cm": 5.1, "sepal_width_cm": 3.5, "petal_length_cm": 1.4,
            "petal_width_cm": 0.2}


@pytest.fixture(scope="session")
def iris_registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registry with iris v1 (stable) and v2 (logreg: fast). Read-only: copy to change it."""
    root = tmp_path_factory.mktemp("iris") / "reg"
    reg = Registry(root)
    train(reg, "iris", dataset="iris", model="logreg")
    train(reg, "iris", dataset="iris", model="logreg", seed=1)
    reg.close()
    return root


@pytest.fixture
def iris_copy(iris_registry: Path, tmp_path: Path) -> Path:
    """A private copy of the iris registry that a test may change."""
    dst = tmp_path / "reg"
    shutil.copytree(iris_registry, dst)
    return dst


@pytest.fixture(params=["embedded", "fleet"])
def storage(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Storage:
    """The backends under test; the environment names them too, for CLI replicas."""
    monkeypatch.setenv(PASSPHRASE_ENV, "correct horse battery staple")
    for var in ("HYBRIDML_DB", "HYBRIDML_ARTIFACTS", "HYBRIDML_S3_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    if request.param == "embedded":
        return Storage()
    server = request.getfixturevalue("s3_server")
    store = Storage(db=request.getfixturevalue("pg_url"),
                    artifacts=request.getfixturevalue("s3_bucket"), s3_endpoint=server.endpoint)
    monkeypatch.setenv("HYBRIDML_DB", str(store.db))
    monkeypatch.setenv("HYBRIDML_ARTIFACTS", str(store.artifacts))
    monkeypatch.setenv("HYBRIDML_S3_ENDPOINT", str(store.s3_endpoint))
    return store


@pytest.fixture
def iris_on(iris_registry: Path, storage: Storage, tmp_path: Path) -> Iterator[Path]:
    """The session's iris registry (v1, v2) on the backends under test: migrated onto the
    fleet ones, copied for the embedded one."""
    root = tmp_path / "reg-on-backend"
    if storage.embedded:
        shutil.copytree(iris_registry, root)
    else:
        migrate(iris_registry, storage, cache=tmp_path / "migrate-cache")
        root.mkdir()
    yield root
