"""``hybridml-edge doctor``: one line per check, exit 1 when any fails.

A store synced from the real cloud app (``ThreadCloud``, tokens required) is checked whole;
then one thing is broken at a time: a byte of an artifact, the token, the cloud's port. The
CPU, memory and clock checks also take their inputs as arguments: a Pi's ``/proc/cpuinfo``,
a small ``/proc/meminfo``, a clock before the install date.
"""

from __future__ import annotations

import json
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from hybridml.edge.cli import main
from hybridml.edge.client import CloudClient
from hybridml.edge.doctor import (
    FAIL,
    OK,
    WARN,
    check_clock,
    check_cpu,
    check_memory,
    check_wheels,
)
from hybridml.edge.store import LocalStore
from hybridml.edge.sync import sync
from tests.edgekit import ThreadCloud, iris_registry

NAME = "iris"
PI4_CPUINFO = ("processor\t: 0\nBogoMIPS\t: 108.00\n"
               "Features\t: fp asimd evtstrm crc32 cpuid\nCPU part\t: 0xd08\n")
PI5_CPUINFO = ("processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 "
               "atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp\nCPU part\t: 0xd0b\n")


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadCloud]:
    """The cloud app (tokens required) over a registry with one iris version."""
    server = ThreadCloud(iris_registry(tmp_path_factory.mktemp("doctor") / "reg"))
    yield server
    server.close()


@pytest.fixture(scope="module")
def synced(cloud: ThreadCloud, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store synced to iris v1 (read-only: copy it to break it)."""
    store = LocalStore(cloud.trust(tmp_path_factory.mktemp("doctor") / "store"))
    client = CloudClient(cloud.url, token=cloud.token)
    assert sync(store, client, NAME).version == 1
    client.close()
    return store.root


def doctor(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, str]]:
    """Run ``hybridml-edge doctor``; (exit code, {check: line}) (the last line per check)."""
    code = main(["doctor", *args])
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    return code, {line[6:14].strip(): line for line in lines}


def test_a_healthy_store_and_cloud_pass_every_check(
        cloud: ThreadCloud, synced: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("HYBRIDML_TOKEN", cloud.token)
    code, lines = doctor(capsys, "--store", str(synced), "--name", NAME, "--cloud", cloud.url)
    assert code == 0
    assert sorted(lines) == sorted(["python", "wheels", "cpu", "disk", "memory", "store",
                                    "clock", "cloud", "token"])
    assert all(line.startswith("ok    ") for line in lines.values()), lines
    assert "verified" in lines["store"] and "from the cloud's Date (bound 300 s)" in lines["clock"]
    assert "onnxruntime" in lines["wheels"] and ">=" in lines["wheels"]

    assert main(["doctor", "--store", str(synced), "--cloud", cloud.url, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is True and {c["status"] for c in doc["checks"]} == {OK}


def test_a_corrupted_artifact_fails_the_store_check_naming_the_file(
        synced: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = LocalStore(tmp_path / "store")
    shutil.copytree(synced, store.root)
    model = store.require_active(NAME).artifact("model")
    assert model is not None
    path = store.artifact_path(model.sha256)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    code, lines = doctor(capsys, "--store", str(store.root))
    assert code == 1
    assert lines["store"].startswith("FAIL  store   ")
    assert str(path) in lines["store"] and "corrupted" in lines["store"]
    assert lines["cloud"].startswith("skip") and lines["token"].startswith("skip")


def test_a_rejected_token_fails_the_token_check(
        cloud: ThreadCloud, synced: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("HYBRIDML_TOKEN", "hml_not_a_real_token")
    code, lines = doctor(capsys, "--store", str(synced), "--cloud", cloud.url)
    assert code == 1
    assert lines["cloud"].startswith("ok")  # /healthz is open
    assert lines["token"].startswith("FAIL  token   token rejected by")


def test_an_unreachable_cloud_fails_the_cloud_check(
        synced: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as held:  # bound, never listening: connections are refused
        held.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{held.getsockname()[1]}"
        code, lines = doctor(capsys, "--store", str(synced), "--cloud", url)
    assert code == 1
    assert lines["cloud"].startswith(f"FAIL  cloud   {url}: cannot reach")
    assert lines["token"].startswith("skip")


@pytest.mark.parametrize(("machine", "cpuinfo", "ort", "status", "says"), [
    ("aarch64", PI4_CPUINFO, "1.32.0", OK, "dotprod no"),
    ("aarch64", PI5_CPUINFO, "1.32.0", OK, "dotprod yes"),
    ("aarch64", PI4_CPUINFO, "1.21.0", FAIL, "onnxruntime#23957"),
    ("aarch64", "Features\t: fp evtstrm\n", "1.32.0", FAIL, "without asimd"),
    ("armv7l", PI4_CPUINFO, "1.32.0", FAIL, "32-bit"),
    ("x86_64", "flags\t\t: fpu sse sse2 ssse3\n", "1.32.0", OK, "avx no"),
    ("riscv64", "", "1.32.0", WARN, "not a CPU hybridml is tested on"),
])
def test_cpu_check_reads_the_features_onnxruntime_needs(
        machine: str, cpuinfo: str, ort: str, status: str, says: str) -> None:
    check = check_cpu(machine, cpuinfo, ort)
    assert check.status == status and says in check.detail


def test_memory_and_clock_checks_fail_or_warn_with_the_numbers(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HYBRIDML_MEMORY_BUDGET_MB", raising=False)
    assert check_memory("MemAvailable:   40000 kB\n").status == FAIL
    big = check_memory("MemAvailable:  204800 kB\n", [("eta v3", 300.0)])
    assert big.status == WARN and "eta v3 needs about 300 MB" in big.detail
    monkeypatch.setenv("HYBRIDML_MEMORY_BUDGET_MB", "256")
    low = check_memory("MemAvailable:  204800 kB\n")
    assert low.status == WARN and "MemAvailable 200 MB; budget 256 MB" in low.detail
    assert check_memory("MemAvailable: 2048000 kB\n", [("eta v3", 150.0)]).status == OK
    monkeypatch.setenv("HYBRIDML_MEMORY_BUDGET_MB", "lots")
    assert check_memory("MemAvailable: 2048000 kB\n").status == FAIL
    floor = 1_790_000_000.0
    before = check_clock(floor - 86400 * 365 * 50, floor, [], False)
    assert before.status == FAIL and "before this installation" in before.detail
    skewed = check_clock(floor + 1000, floor, [("https://c", floor + 100)], True)
    assert skewed.status == WARN and "900 s ahead of the clock of https://c" in skewed.detail
    assert check_clock(floor + 1000, floor, [("https://c", floor + 990)], True).status == OK


def test_wheels_outside_the_required_ranges_or_missing_fail() -> None:
    requires = ["numpy>=1.24", "onnxruntime>=1.19,!=1.21.0", "requests>=2.31",
                "cryptography>=42", 'scikit-learn>=1.4; extra == "cloud"']
    good = {"numpy": "2.4.6", "onnxruntime": "1.32.0", "requests": "2.34.2",
            "cryptography": "50.0.2"}
    ok = check_wheels(good, requires)
    assert ok.status == OK and "scikit-learn" not in ok.detail
    bad = check_wheels(dict(good, onnxruntime="1.21.0"), requires)
    assert bad.status == FAIL and "onnxruntime 1.21.0 is outside !=1.21.0,>=1.19" in bad.detail
    gone = check_wheels(dict(good, numpy=None), requires)
    assert gone.status == FAIL and "numpy not installed" in gone.detail
