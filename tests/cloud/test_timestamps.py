"""One timestamp format (shared.clock) across the cloud, and registries written before it."""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

import pytest

from hybridml.cloud.auth import AuditLog, promote
from hybridml.cloud.cli import main as cloud_main
from hybridml.cloud.registry import Registry
from hybridml.cloud.signing import KeyRing
from hybridml.cloud.tokens import DB_NAME, TokenStore

STAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")


def test_tokens_versions_aliases_audit_and_keys_share_one_format(iris_copy: Path) -> None:
    info, _ = TokenStore(iris_copy).create("admin", "ops")
    key = KeyRing(iris_copy).init()
    reg = Registry(iris_copy)
    try:
        promote(reg, "iris", "canary", 2, actor="test")
        versions = reg.versions("iris")
    finally:
        reg.close()
    [entry] = AuditLog(iris_copy).entries("iris")
    for stamp in (info.created, key.created, entry["time"], *(v.created for v in versions)):
        assert STAMP.fullmatch(stamp), stamp


def test_tokens_from_before_the_change_still_read_list_and_sort(
        iris_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = TokenStore(iris_copy)
    first, _ = store.create("device", "edge-1")
    # Earlier releases wrote microseconds; such a row must still read, sort and display.
    with sqlite3.connect(iris_copy / DB_NAME) as db:
        db.execute("UPDATE tokens SET created = '2020-01-02T03:04:05.123456Z' WHERE id = ?",
                   (first.id,))
    second, _ = store.create("device", "edge-2")
    third, _ = store.create("device", "edge-3")  # most likely within the same second
    assert [t.id for t in store.list()] == [first.id, second.id, third.id]
    assert cloud_main(["tokens", "list", "--registry", str(iris_copy)]) == 0
    out = capsys.readouterr().out
    assert "2020-01-02T03:04:05Z" in out and second.created in out
    assert cloud_main(["tokens", "list", "--registry", str(iris_copy), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed[0]["created"] == "2020-01-02T03:04:05.123456Z"  # stored values are kept
