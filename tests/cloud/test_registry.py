"""Tests of the model registry: numbering, aliases, blobs, attach, gc, real multi-process use."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import random
import re
import sqlite3
import stat
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from hybridml.cloud.registry import ModelSummary, Registry
from hybridml.shared.errors import (
    ConfigError,
    ConflictError,
    ManifestError,
    NotFoundError,
    RegistryError,
)
from hybridml.shared.manifest import Manifest, canonical_json

SPAWN = mp.get_context("spawn")
CHILD_TIMEOUT = 60.0


def make_manifest(reg: Registry, payload: bytes = b"onnx model bytes") -> dict[str, Any]:
    """Store ``payload`` as the model blob and return a manifest body referring to it."""
    sha, size = reg.put_blob(payload)
    return {
        "artifacts": [{"role": "model", "sha256": sha, "size": size,
                       "media_type": "application/onnx", "variant": "fp32"}],
        "schema": [{"name": "hour", "kind": "numeric", "dtype": "float32", "min": 0, "max": 23},
                   {"name": "city", "kind": "categorical", "dtype": "string",
                    "categories": ["a", "b"]}],
        "output": {"task": "binary", "classes": ["no", "yes"],
                   "outputs": ["label", "probabilities"]},
        "metrics": {"accuracy": 0.9},
    }


def add_version(reg: Registry, name: str = "eta", payload: bytes | None = None,
                **kwargs: Any) -> dict[str, Any]:
    payload = payload if payload is not None else os.urandom(16)
    return reg.create_version(name, make_manifest(reg, payload), {"params": {"C": 1.0}},
                              **kwargs)


def assert_consistent(root: Path, name: str = "eta") -> int:
    """Every visible version is numbered 1..N, valid, and its blobs hash to their names."""
    reg = Registry(root, create=False)
    if not any(m.name == name for m in reg.models()):
        return 0
    numbers = [v.version for v in reg.versions(name)]
    assert numbers == list(range(1, len(numbers) + 1))
    for v in numbers:
        parsed = Manifest.from_json(reg.manifest(name, v))
        assert parsed.version == v
        for art in parsed.artifacts:
            data = reg.blob_path(art.sha256).read_bytes()
            assert hashlib.sha256(data).hexdigest() == art.sha256
            assert len(data) == art.size
    reg.close()
    return len(numbers)


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "reg")


# ------------------------------------------------------------------------ numbering, refs
def test_versions_are_numbered_from_one_per_model_and_manifest_fields_are_filled(
        registry: Registry) -> None:
    body = make_manifest(registry)
    first = registry.create_version("eta", body, {"params": {}})
    assert "version" not in body  # the caller's dict is not modified
    add_version(registry, parent=1)
    third = add_version(registry, parent=2, lineage="finetune")
    other = add_version(registry, "wine")
    assert (first["version"], third["version"], other["version"]) == (1, 3, 1)
    assert third["parent"] == 2 and third["lineage"] == "finetune" and third["format"] == 1
    assert third["name"] == "eta"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", third["created"])
    assert first["parent"] is None and first["lineage"] == "retrain"
    assert registry.manifest("eta", 3) == third
    info = registry.versions("eta")
    assert [(v.version, v.parent, v.lineage, v.task) for v in info] == [
        (1, None, "retrain", "binary"), (2, 1, "retrain", "binary"), (3, 2, "finetune", "binary")]
    assert info[0].metrics == {"accuracy": 0.9} and info[0].model_size == 16
    assert registry.models() == [ModelSummary("eta", 3, 3, {"stable": 1}),
                                 ModelSummary("wine", 1, 1, {"stable": 1})]


def test_refs_accept_int_digit_string_alias_and_latest(registry: Registry) -> None:
    for _ in range(3):
        add_version(registry)
    registry.set_alias("eta", "canary", 3)
    assert [registry.resolve("eta", r) for r in (2, "2", "stable", "canary", "latest")] == [
        2, 2, 1, 3, 3]
    assert registry.manifest("eta")["version"] == 1  # the default ref is "stable"


def test_parent_must_be_an_existing_version(registry: Registry) -> None:
    add_version(registry)
    with pytest.raises(NotFoundError, match="version 9 of model 'eta'"):
        add_version(registry, parent=9)
    with pytest.raises(ManifestError, match="lineage"):
        add_version(registry, lineage="transplant")
    assert [v.version for v in registry.versions("eta")] == [1]


# --------------------------------------------------------------------------------- aliases
def test_first_version_becomes_stable_and_later_versions_need_a_promote(
        registry: Registry) -> None:
    add_version(registry)
    add_version(registry)
    assert registry.aliases("eta") == {"stable": 1}
    assert registry.set_alias("eta", "canary", "latest") == 2
    assert registry.set_alias("eta", "stable", "canary") == 2  # promote canary to stable
    assert registry.manifest("eta")["version"] == 2
    assert registry.versions("eta")[1].aliases == ("canary", "stable")
    registry.delete_alias("eta", "canary")
    assert registry.aliases("eta") == {"stable": 2}
    with pytest.raises(NotFoundError, match="alias 'canary' of model 'eta'"):
        registry.delete_alias("eta", "canary")


def test_deleted_stable_alias_is_set_again_by_the_next_version(registry: Registry) -> None:
    add_version(registry)
    registry.delete_alias("eta", "stable")
    add_version(registry)
    assert registry.aliases("eta") == {"stable": 2}


@pytest.mark.parametrize("alias", ["Stable", "latest", "1", "a b", "../x", "", "x" * 40])
def test_invalid_alias_names_are_rejected(registry: Registry, alias: str) -> None:
    add_version(registry)
    with pytest.raises(ConfigError) as err:
        registry.set_alias("eta", alias, 1)
    assert err.value.code == "config" and err.value.details["field"] == "alias"
    assert registry.aliases("eta") == {"stable": 1}


# ------------------------------------------------------------------------ not found, names
def test_not_found_messages_list_what_exists(registry: Registry) -> None:
    with pytest.raises(NotFoundError, match="the registry is empty"):
        registry.manifest("eta")
    for _ in range(3):
        add_version(registry)
    registry.set_alias("eta", "stable", 2)
    registry.set_alias("eta", "canary", 3)
    with pytest.raises(NotFoundError) as err:
        registry.manifest("eta", 7)
    assert "model 'eta' has versions 1-3 and aliases canary->3, stable->2" in err.value.message
    assert err.value.code == "not_found" and err.value.status == 404
    with pytest.raises(NotFoundError, match="alias 'beta' of model 'eta' not found"):
        registry.resolve("eta", "beta")
    with pytest.raises(NotFoundError, match="not a version reference"):
        registry.resolve("eta", "v1!")
    with pytest.raises(NotFoundError, match="no model 'wine' in the registry; models: eta"):
        registry.versions("wine")


@pytest.mark.parametrize("name", ["../x", "", "a/b", "eta\n", ".hidden", "x" * 65, 7])
def test_invalid_model_names_are_rejected_on_write_and_not_found_on_read(
        registry: Registry, name: Any) -> None:
    with pytest.raises(ManifestError) as err:
        registry.create_version(name, make_manifest(registry), {})
    assert err.value.details["field"] == "name"
    with pytest.raises(NotFoundError, match="no model can exist under"):
        registry.manifest(name)
    assert registry.models() == []


# ----------------------------------------------------------------------------------- blobs
@pytest.mark.parametrize("sha", ["../x", "../" + "a" * 61, "A" * 64, "a" * 64 + "\n", "a" * 63,
                                 "/etc/passwd", "..", ""])
def test_malformed_blob_names_cannot_reach_the_filesystem(registry: Registry, sha: str) -> None:
    with pytest.raises(NotFoundError, match="invalid blob name") as err:
        registry.blob_path(sha)
    assert err.value.details["field"] == "sha256"
    assert registry.has_blob(sha) is False


def test_put_blob_is_idempotent_and_streams_paths(registry: Registry, tmp_path: Path) -> None:
    data = os.urandom(3 * (1 << 20) + 5)  # more than one streaming chunk
    src = tmp_path / "model.onnx"
    src.write_bytes(data)
    expected = (hashlib.sha256(data).hexdigest(), len(data))
    assert registry.put_blob(src) == expected
    assert registry.put_blob(data) == expected
    assert registry.put_blob(src) == expected
    path = registry.blob_path(expected[0])
    assert path.read_bytes() == data
    assert not path.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
    assert sorted(p.name for p in path.parent.iterdir()) == [expected[0]]  # no temp files
    with pytest.raises(NotFoundError, match="no blob"):
        registry.blob_path("0" * 64)
    with pytest.raises(RegistryError, match="wrap a file name in Path"):
        registry.put_blob(str(src))  # type: ignore[arg-type]


def test_a_blob_whose_content_does_not_match_its_name_is_a_conflict(
        registry: Registry) -> None:
    data = b"the real model"
    sha = hashlib.sha256(data).hexdigest()
    forged = registry.blobs.dir / sha
    forged.write_bytes(b"something else")
    with pytest.raises(ConflictError, match="different content") as err:
        registry.put_blob(data)
    assert err.value.code == "conflict"
    assert forged.read_bytes() == b"something else"  # never silently replaced


def test_version_referring_to_a_missing_blob_is_rejected_and_leaves_nothing(
        registry: Registry) -> None:
    body = make_manifest(registry)
    body["artifacts"][0]["sha256"] = "f" * 64
    with pytest.raises(RegistryError, match="put_blob"):
        registry.create_version("eta", body, {})
    assert registry.models() == []
    add_version(registry)
    wrong_size = make_manifest(registry, b"abc")
    wrong_size["artifacts"][0]["size"] = 4
    with pytest.raises(RegistryError, match="says size 4 but blob"):
        registry.create_version("eta", wrong_size, {})
    invalid = make_manifest(registry)
    del invalid["output"]
    with pytest.raises(ManifestError, match="output"):
        registry.create_version("eta", invalid, {})
    with pytest.raises(RegistryError, match="metadata is not valid JSON"):
        registry.create_version("eta", make_manifest(registry), {"loss": float("nan")})
    assert [v.version for v in registry.versions("eta")] == [1]
    assert add_version(registry)["version"] == 2


# ------------------------------------------------------------------- attach, etag, metadata
def test_attach_artifact_adds_then_replaces_the_table_and_changes_the_etag(
        registry: Registry) -> None:
    add_version(registry)
    etag = registry.manifest_etag("eta", 1)
    sha1, size1 = registry.put_blob(b"table one")
    table = {"role": "table", "sha256": sha1, "size": size1, "rows": 10}
    updated = registry.attach_artifact("eta", "stable", table)
    assert [a["role"] for a in updated["artifacts"]] == ["model", "table"]
    assert updated["artifacts"][1]["rows"] == 10  # extra fields are kept
    assert registry.manifest("eta", 1) == updated
    etag2 = registry.manifest_etag("eta", 1)
    assert etag2 != etag
    assert registry.attach_artifact("eta", 1, table) == updated  # same entry: no change
    assert registry.manifest_etag("eta", 1) == etag2
    sha2, size2 = registry.put_blob(b"table two")
    replaced = registry.attach_artifact("eta", 1, {"role": "table", "sha256": sha2,
                                                   "size": size2})
    assert [(a["role"], a["sha256"]) for a in replaced["artifacts"]][1:] == [("table", sha2)]
    assert registry.gc(min_age_seconds=0) == 1  # the replaced table's blob
    assert not registry.has_blob(sha1) and registry.has_blob(sha2)
    with pytest.raises(RegistryError, match="not in the registry"):
        registry.attach_artifact("eta", 1, {"role": "table", "sha256": "e" * 64, "size": 1})


def test_attach_artifact_never_replaces_model_artifacts(registry: Registry) -> None:
    stored = add_version(registry)
    sha, size = registry.put_blob(b"another model")
    for role in ("model", "model_fp32"):
        with pytest.raises(ConflictError, match="register a new version") as err:
            registry.attach_artifact("eta", 1, {"role": role, "sha256": sha, "size": size})
        assert err.value.status == 409
    assert registry.attach_artifact("eta", 1, stored["artifacts"][0]) == stored
    assert registry.manifest("eta", 1) == stored


def test_manifest_etag_is_the_sha256_of_the_canonical_manifest(registry: Registry) -> None:
    stored = add_version(registry)
    expected = hashlib.sha256(canonical_json(stored)).hexdigest()
    assert registry.manifest_etag("eta") == registry.manifest_etag("eta", 1) == expected


def test_metadata_is_stored_per_version(registry: Registry) -> None:
    registry.create_version("eta", make_manifest(registry), {"params": {"C": 2}, "data": "x"})
    assert registry.metadata("eta", "1") == {"params": {"C": 2}, "data": "x"}


# ---------------------------------------------------------------------------------- gc, env
def test_gc_removes_only_unreferenced_blobs_and_old_temp_files(registry: Registry) -> None:
    stored = add_version(registry)
    pickle_sha, _ = registry.put_blob(b"sklearn pickle")
    registry.create_version("eta", make_manifest(registry, b"m2"), {"pickle_sha256": pickle_sha})
    orphan, _ = registry.put_blob(b"orphan from a crashed run")
    old_tmp = registry.blobs.dir / ".tmp-123-dead"
    new_tmp = registry.blobs.dir / ".tmp-456-live"
    old_tmp.write_bytes(b"half")
    new_tmp.write_bytes(b"in progress")
    an_hour_ago = time.time() - 3700
    os.utime(old_tmp, (an_hour_ago, an_hour_ago))
    assert registry.gc() == 1  # fresh orphans survive the grace period: a run may be mid-way
    assert registry.has_blob(orphan) and not old_tmp.exists() and new_tmp.exists()
    assert registry.gc(min_age_seconds=0) == 2
    assert not registry.has_blob(orphan) and not new_tmp.exists()
    assert registry.has_blob(pickle_sha)  # mentioned by metadata only: kept
    assert registry.has_blob(stored["artifacts"][0]["sha256"])
    assert assert_consistent(registry.root) == 2


def test_open_without_create_and_from_env(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(NotFoundError, match="no registry at"):
        Registry(tmp_path / "missing", create=False)
    assert not (tmp_path / "missing").exists()
    monkeypatch.setenv("HYBRIDML_REGISTRY", str(tmp_path / "env"))
    add_version(Registry.from_env())
    assert Registry(tmp_path / "env", create=False).resolve("eta", "latest") == 1
    assert Registry.from_env(tmp_path / "explicit").root == tmp_path / "explicit"
    monkeypatch.delenv("HYBRIDML_REGISTRY")
    monkeypatch.chdir(tmp_path)
    assert Registry.from_env().root == (tmp_path / "registry").resolve()
    conn = sqlite3.connect(tmp_path / "env" / "registry.db")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # persistent in the file
    conn.close()


def test_one_registry_object_is_safe_across_threads(registry: Registry) -> None:
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(5):
                add_version(registry)
                registry.manifest("eta", "latest")
        except BaseException as exc:  # collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert assert_consistent(registry.root) == 20


# --------------------------------------------------------------------- separate processes
def _writer(root: str, writer: int, count: int, start: Any) -> None:
    reg = Registry(root)  # every writer opens the (possibly brand new) registry itself
    start.wait()
    for i in range(count):
        reg.create_version("eta", make_manifest(reg, f"model {writer}-{i}".encode()),
                           {"writer": writer, "i": i})


def _reader(root: str, stop: Any, results: Any) -> None:
    reg = Registry(root, create=False)
    reads, errors = 0, []
    while not stop.is_set():
        try:
            latest = Manifest.from_json(reg.manifest("eta", "latest"))
            assert reg.has_blob(latest.artifacts[0].sha256)
            reg.versions("eta")
            reg.manifest_etag("eta", "stable")
            reads += 1
        except Exception as exc:  # reported to the parent, which fails the test
            errors.append(repr(exc))
    results.put((reads, errors[:3], len(errors)))


def _join_all(processes: list[Any]) -> None:
    for p in processes:
        p.join(CHILD_TIMEOUT)
        if p.exitcode is None:
            p.kill()
            p.join()
    assert [p.exitcode for p in processes] == [0] * len(processes)


def test_four_processes_creating_versions_at_once_get_exactly_1_to_20(tmp_path: Path) -> None:
    root = str(tmp_path / "reg")
    start = SPAWN.Barrier(4)
    writers = [SPAWN.Process(target=_writer, args=(root, w, 5, start)) for w in range(4)]
    for p in writers:
        p.start()
    _join_all(writers)
    assert assert_consistent(Path(root)) == 20
    reg = Registry(root, create=False)
    made = sorted((reg.metadata("eta", v)["writer"], reg.metadata("eta", v)["i"])
                  for v in range(1, 21))
    assert made == [(w, i) for w in range(4) for i in range(5)]  # each call stored once


def test_readers_never_hit_database_is_locked_while_writers_write(tmp_path: Path) -> None:
    root = tmp_path / "reg"
    add_version(Registry(root))
    start, stop, results = SPAWN.Barrier(2), SPAWN.Event(), SPAWN.Queue()
    readers = [SPAWN.Process(target=_reader, args=(str(root), stop, results)) for _ in range(2)]
    writers = [SPAWN.Process(target=_writer, args=(str(root), w, 8, start)) for w in range(2)]
    for p in readers + writers:
        p.start()
    _join_all(writers)
    stop.set()
    outcomes = [results.get(timeout=CHILD_TIMEOUT) for _ in readers]
    _join_all(readers)
    assert [(errors, n) for _, errors, n in outcomes] == [([], 0), ([], 0)]
    assert all(reads > 0 for reads, _, _ in outcomes)
    assert assert_consistent(root) == 17


def _pause_before_commit(root: str, paused: Any) -> None:
    """Create a version but stop, holding the write lock, just before COMMIT runs."""
    reg = Registry(root)
    body = make_manifest(reg, b"the version that never was")

    def on_statement(sql: str) -> None:
        if sql.strip().upper() == "COMMIT":
            paused.set()
            time.sleep(CHILD_TIMEOUT)  # killed here

    reg._db._conn().set_trace_callback(on_statement)
    reg.create_version("eta", body, {"doomed": True})


def test_sigkill_before_commit_leaves_no_partial_version(tmp_path: Path) -> None:
    root = tmp_path / "reg"
    reg = Registry(root)
    add_version(reg)
    paused = SPAWN.Event()
    child = SPAWN.Process(target=_pause_before_commit, args=(str(root), paused))
    child.start()
    assert paused.wait(CHILD_TIMEOUT)
    # The child holds the write lock with its rows inserted: readers still work, see only v1.
    assert [v.version for v in reg.versions("eta")] == [1]
    child.kill()  # SIGKILL
    child.join()
    assert child.exitcode == -9
    assert assert_consistent(root) == 1
    assert add_version(reg)["version"] == 2
    assert reg.gc(min_age_seconds=0) == 1  # the dead child's model blob
    assert assert_consistent(root) == 2


def _write_forever(root: str, seed: int, started: Any) -> None:
    reg = Registry(root)
    started.set()
    i = 0
    while True:
        payload = f"{seed}-{i}-".encode() * 20000  # ~150 kB: kills land inside put_blob too
        reg.create_version("eta", make_manifest(reg, payload), {"seed": seed, "i": i})
        i += 1


def test_sigkill_at_random_points_never_exposes_a_partial_version(tmp_path: Path) -> None:
    root = tmp_path / "reg"
    rng = random.Random(20261127)
    for seed in range(6):
        started = SPAWN.Event()
        child = SPAWN.Process(target=_write_forever, args=(str(root), seed, started))
        child.start()
        assert started.wait(CHILD_TIMEOUT)
        time.sleep(rng.uniform(0.0, 0.3))
        child.kill()
        child.join()
        assert_consistent(root)
    reg = Registry(root)
    n = assert_consistent(root)
    assert add_version(reg)["version"] == n + 1
    reg.gc(min_age_seconds=0)
    assert assert_consistent(root) == n + 1
    left = sorted(p.name for p in reg.blobs.dir.iterdir())
    referenced = {a["sha256"] for v in range(1, n + 2) for a in reg.manifest("eta", v)
                  ["artifacts"]}
    assert left == sorted(referenced)  # no temp files, no orphans
    assert json.loads(json.dumps(reg.aliases("eta"))) == {"stable": 1}


def _use_inherited_registry(reg: Registry) -> None:
    add_version(reg)  # must open its own connection, not reuse the parent's
    assert reg.manifest("eta", "latest")["version"] == 2


def test_a_registry_object_survives_fork_like_gunicorn_preload(registry: Registry) -> None:
    add_version(registry)  # the parent now holds an open connection
    child = mp.get_context("fork").Process(target=_use_inherited_registry, args=(registry,))
    child.start()
    _join_all([child])
    assert add_version(registry)["version"] == 3
    assert assert_consistent(registry.root) == 3


def test_a_database_from_a_newer_hybridml_is_refused(tmp_path: Path) -> None:
    Registry(tmp_path / "reg")
    conn = sqlite3.connect(tmp_path / "reg" / "registry.db")
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(RegistryError, match=r"schema version 99.*upgrade hybridml"):
        Registry(tmp_path / "reg")


def test_gc_deletes_orphaned_training_csvs_and_keeps_a_versions_source(
        tmp_path: Path, orders_csv: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    from hybridml.cloud.cli import main
    from hybridml.cloud.train import train

    reg = Registry(tmp_path / "reg")
    folder = reg.root / "training" / "late"
    folder.mkdir(parents=True)
    source = Path(shutil.copy(orders_csv, folder / "20261201T160000Z-retrain.csv"))
    train(reg, "late", data=source, target="late", drop=["delivery_minutes"], model="logreg")
    orphan = Path(shutil.copy(orders_csv, folder / "20261201T170000Z-finetune.csv"))
    young = Path(shutil.copy(orders_csv, folder / "20261201T180000Z-retrain.csv"))
    hours_ago = time.time() - 2 * 3600
    for p in (source, orphan):
        os.utime(p, (hours_ago, hours_ago))
    assert main(["gc", "--registry", str(reg.root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["removed"] >= 1
    # the version's source stays (a retrain reads it again); a young one may be in training
    assert source.exists() and young.exists() and not orphan.exists()
