"""The registry under concurrent writers: real ``hybridml-cloud`` processes at once.

Two ``train`` runs of the same model (different families, so each version can be traced back to
its run) start together while a loop of ``promote`` commands moves an alias to ``latest``. No
version may be lost, duplicated or mixed up: each run's reported version holds that run's
model, every manifest's artifacts are stored and hash to their names, and every promote saw a
version that existed.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
import time
from pathlib import Path

from hybridml.cloud.registry import Registry
from tests.conftest import BIN

RUNS = {"rf": ["--model", "rf", "--seed", "11", "--param", "n_estimators=20"],
        "logreg": ["--model", "logreg", "--seed", "12"]}


def cloud_cli(registry: Path, *args: str) -> list[str]:
    """The ``hybridml-cloud`` command line for ``args`` on ``registry``."""
    return [str(BIN / "hybridml-cloud"), args[0], "--registry", str(registry), "--json",
            "--quiet", *args[1:]]


def test_two_trainings_and_promotes_at_once_lose_and_mix_up_nothing(
        registry_copy: Path) -> None:
    before = Registry(registry_copy)
    assert [v.version for v in before.versions("iris")] == [1]
    before.close()

    trains = {family: subprocess.Popen(
        cloud_cli(registry_copy, "train", "--name", "iris", "--dataset", "iris", *extra),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for family, extra in RUNS.items()}
    promoted: list[int] = []
    deadline = time.monotonic() + 120
    while any(p.poll() is None for p in trains.values()) and time.monotonic() < deadline:
        done = subprocess.run(cloud_cli(registry_copy, "promote", "iris", "latest", "--alias",
                                        "candidate"),
                              capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        promoted.append(int(json.loads(done.stdout)["version"]))
    reported: dict[str, int] = {}
    for family, proc in trains.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        reported[family] = int(json.loads(out)["version"])
    final = subprocess.run(cloud_cli(registry_copy, "promote", "iris", "latest", "--alias",
                                     "candidate"), capture_output=True, text=True, check=True)
    promoted.append(int(json.loads(final.stdout)["version"]))

    assert sorted(reported.values()) == [2, 3]  # one version each, none lost or shared
    assert promoted and promoted == sorted(promoted) and set(promoted) <= {1, 2, 3}
    assert promoted[-1] == 3
    print(f"FAULTLOG registry: {len(promoted)} promotes during 2 trainings, saw {promoted}")

    reg = Registry(registry_copy)
    try:
        assert [v.version for v in reg.versions("iris")] == [1, 2, 3]
        aliases = reg.aliases("iris")
        assert aliases["stable"] == 1 and aliases["candidate"] == 3
        for family, version in reported.items():
            manifest = reg.manifest("iris", version)
            assert manifest["version"] == version and manifest["model"]["family"] == family
            assert reg.metadata("iris", version)["family"] == family
            for art in manifest["artifacts"]:
                blob = reg.blob_path(art["sha256"])
                assert blob.stat().st_size == art["size"]
                assert hashlib.sha256(blob.read_bytes()).hexdigest() == art["sha256"]
        models = {m["sha256"] for v in reported.values()
                  for m in reg.manifest("iris", v)["artifacts"] if m["role"] == "model"}
        assert len(models) == 2  # two different models, not one stored twice
    finally:
        reg.close()
    db = sqlite3.connect(registry_copy / "registry.db")
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        db.close()
