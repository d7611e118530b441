"""Fixtures shared by the cloud tests: one small iris registry, trained once per session."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from hybridml.cloud.registry import Registry
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
