"""The serving path's resolve memo: fast, yet a promote anywhere is seen by the next request."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import requests

from hybridml.cloud.registry import Registry
from hybridml.shared.errors import NotFoundError
from tests.cloud.conftest import IRIS_ROW as ROW
from tests.conftest import start_cloud

BIN = Path(sys.executable).parent


def cli(root: Path, *args: str) -> None:
    """Run ``hybridml-cloud`` in its own process (its own SQLite connection)."""
    subprocess.run([str(BIN / "hybridml-cloud"), *args, "--registry", str(root)], check=True,
                   capture_output=True, timeout=60)


def test_cached_resolve_sees_a_promote_made_by_another_process(iris_copy: Path) -> None:
    reg = Registry(iris_copy)
    assert reg.resolve_cached("iris") == 1
    assert reg.resolve_cached("iris") == 1  # from the memo
    cli(iris_copy, "promote", "iris", "2")
    assert reg.resolve_cached("iris") == 2
    cli(iris_copy, "rollback", "iris")
    assert reg.resolve_cached("iris", "stable") == 1


def test_cached_resolve_sees_writes_of_another_connection_in_this_process(iris_copy: Path) -> None:
    serving, admin = Registry(iris_copy), Registry(iris_copy)
    assert serving.resolve_cached("iris", "latest") == 2
    with pytest.raises(NotFoundError):
        serving.resolve_cached("iris", "canary")
    admin.set_alias("iris", "canary", 2)
    assert serving.resolve_cached("iris", "canary") == 2  # a failure was not remembered
    admin.delete_alias("iris", "canary")
    with pytest.raises(NotFoundError):
        serving.resolve_cached("iris", "canary")


def test_cached_resolve_sees_writes_made_through_the_same_connection(iris_copy: Path) -> None:
    # SQLite's data_version ignores a connection's own commits: the write counter covers them.
    reg = Registry(iris_copy)
    assert reg.resolve_cached("iris") == 1
    reg.set_alias("iris", "stable", 2)
    assert reg.resolve_cached("iris") == 2


def test_cached_resolve_keeps_version_refs_apart_by_type(iris_copy: Path) -> None:
    reg = Registry(iris_copy)
    assert reg.resolve_cached("iris", 1) == 1
    assert reg.resolve_cached("iris", "2") == 2
    with pytest.raises(NotFoundError):
        reg.resolve_cached("iris", True)  # equal to 1 as a dict key, but no version


def test_every_gunicorn_worker_predicts_with_the_version_promoted_from_the_cli(
        iris_copy: Path) -> None:
    server = start_cloud(iris_copy, "--workers", "2")
    try:
        url = server.url + "/v1/models/iris/predict"

        def versions(n: int) -> set[int]:
            # A new connection per call, so both workers answer some of them.
            return {requests.post(url, json={"inputs": [ROW]}, timeout=10).json()
                    ["model_version"] for _ in range(n)}

        assert versions(20) == {1}  # both workers now hold v1 in their memos
        cli(iris_copy, "promote", "iris", "2")
        assert versions(20) == {2}
        cli(iris_copy, "rollback", "iris")
        assert versions(20) == {1}
    finally:
        server.stop()
