"""A registry trained once per session, and a real gunicorn server over it."""

from __future__ import annotations

import csv
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hybridml.cloud.precompute import precompute
from hybridml.cloud.registry import Registry
from hybridml.cloud.signing import KeyRing
from hybridml.cloud.train import train
from hybridml.shared.schema import InputSchema
from tests.conftest import CloudServer, start_cloud
from tests.integration.attacker import Attacker

LATE_FEATURES = ["restaurant", "hour", "distance_km", "rain", "items"]


def attach_table(reg: Registry, name: str, log_csv: Path, top: int = 50) -> None:
    """Precompute a table for the stable version of ``name`` and attach it."""
    version = reg.resolve(name, "stable")
    manifest = reg.manifest(name, version)
    model = next(a for a in manifest["artifacts"] if a["role"] == "model")
    out = log_csv.parent / f"{name}.table"
    precompute(reg.blob_path(model["sha256"]).read_bytes(), model["sha256"],
               InputSchema.from_json(manifest["schema"]), manifest["output"]["task"], log_csv,
               top=top, out_path=out)
    sha, size = reg.put_blob(out)
    reg.attach_artifact(name, version, {"role": "table", "sha256": sha, "size": size,
                                        "media_type": "application/x-hybridml-table"})


def frequent_rows(orders_csv: Path, k: int = 10) -> list[dict[str, str]]:
    """The first ``k`` rows of the orders CSV, feature columns only (CSV text values)."""
    with open(orders_csv) as fh:
        rows = list(csv.DictReader(fh))[:k]
    return [{c: r[c] for c in LATE_FEATURES} for r in rows]


@pytest.fixture(scope="session")
def trained_registry(tmp_path_factory: pytest.TempPathFactory, orders_csv: Path) -> Path:
    """A registry with iris (logreg), late (hgb, binary, with a table) and eta (regression)."""
    root = tmp_path_factory.mktemp("registry") / "reg"
    reg = Registry(root)
    train(reg, "iris", dataset="iris", model="logreg")
    train(reg, "late", data=orders_csv, target="late", model="hgb", drop=["delivery_minutes"],
          params={"max_iter": 30})
    train(reg, "eta", data=orders_csv, target="delivery_minutes", model="logreg",
          drop=["late"])
    log_csv = root.parent / "late_log.csv"
    rows = frequent_rows(orders_csv)
    with open(log_csv, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=LATE_FEATURES)
        w.writeheader()
        for i, r in enumerate(rows):
            for _ in range(10 - i):
                w.writerow(r)
    attach_table(reg, "late", log_csv)
    reg.close()
    KeyRing(root).init()  # served manifests are signed; devices trust it (edgekit.trusting)
    return root


@pytest.fixture
def registry_copy(trained_registry: Path, tmp_path: Path) -> Path:
    """A private copy of the trained registry that a test may change."""
    dst = tmp_path / "reg"
    shutil.copytree(trained_registry, dst)
    return dst


@pytest.fixture(scope="module")
def cloud(trained_registry: Path) -> Iterator[CloudServer]:
    """gunicorn (2 workers) over the shared trained registry; read-only use."""
    server = start_cloud(trained_registry)
    yield server
    server.stop()


@pytest.fixture
def own_cloud(registry_copy: Path) -> Iterator[CloudServer]:
    """A server over a private registry copy, for tests that promote, tamper or stop it."""
    server = start_cloud(registry_copy)
    yield server
    server.stop()


# ------------------------------------------------------------------------- the attacker
@pytest.fixture(scope="module")
def module_attacker(site: Any) -> Iterator[Attacker]:
    """An :class:`Attacker` in front of the requesting module's ``site.cloud``, for the
    whole module (each attack test module defines its own module-scoped ``site``)."""
    with Attacker(site.cloud.url) as a:
        yield a


@pytest.fixture
def attacker(module_attacker: Attacker) -> Iterator[Attacker]:
    """The module's attacker, with no attack on at the start and the end of each test."""
    module_attacker.reset()
    yield module_attacker
    module_attacker.reset()
