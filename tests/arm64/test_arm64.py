"""The edge on an emulated Raspberry Pi against a real cloud on this machine.

Each emulated board (:data:`tests.arm64.rootfs.CPUS` × :data:`tests.arm64.matrix.VERSION_SETS`)
and a native x86 reference run the same scenario through :mod:`tests.arm64.device`, against
one real cloud on loopback: sync, offline predictions (batch and single-row routes), table
hits, fallback to the cloud and offline degradation, a newer version, rollback, store GC, and
the telemetry spool and push. The answers must equal the reference's:

* labels, sources, versions, table hits and the cloud's answers: equal;
* probabilities and regression outputs: bit-identical for tree models on the reference's
  onnxruntime (the same float32 sums in the same order on every CPU); within :data:`MAX_ULPS`
  (regression) or one step of the 6th decimal (probabilities, which the edge rounds) where
  onnxruntime's matrix kernels differ by CPU (MLAS's NEON and AVX2 GEMMs accumulate in another
  order) or where the board runs another onnxruntime release. The test prints how many values
  are bit-identical and the largest difference.

Run with ``make test-arm64`` (marker ``arm64``; not part of ``make test``). ``ARM64_MATRIX``
picks entries, e.g. ``cortex-a72/newest``.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hybridml.cloud.registry import Registry
from hybridml.cloud.signing import KeyRing
from hybridml.cloud.train import train
from tests.arm64 import rootfs
from tests.arm64.matrix import VERSION_SETS
from tests.conftest import CloudServer, start_cloud, write_orders_csv
from tests.integration.conftest import LATE_FEATURES, attach_table, frequent_rows

pytestmark = pytest.mark.arm64

DEVICE = Path(__file__).with_name("device.py")
#: How far a float may be from the reference, in units in the last place of float32 (the
#: model's precision): 8 ulps is a relative 1e-6, on probabilities and regression outputs.
MAX_ULPS = 8
ROUNDING_STEP = 1.0000001e-6  # one step of a probability's 6th decimal (and float noise)
MATRIX = [f"{cpu}/{vs}" for cpu in rootfs.CPUS for vs in VERSION_SETS]
SELECTED = [m for m in MATRIX if m in os.environ.get("ARM64_MATRIX", " ".join(MATRIX)).split()]
DEAD = "http://127.0.0.1:9"  # nothing listens on the discard port


class DeviceProcess:
    """A running :mod:`tests.arm64.device`; :meth:`call` sends one command."""

    def __init__(self, cmd: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self._err = log.open("wb")
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._err, text=True)

    def call(self, op: str, **kw: Any) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the device died ({self.proc.wait()}):\n"
                               f"{self.log.read_text(errors='replace')[-3000:]}")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write('{"op": "quit"}\n')
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        self._err.close()


# ----------------------------------------------------------------------------- the cloud
@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A cloud over a registry with late v1 (hgb, a table), late v2 (logreg) and eta
    (regression), and the rows the scenario sends."""
    work = tmp_path_factory.mktemp("arm64")
    orders = write_orders_csv(work / "orders.csv", n=400)
    root = work / "reg"
    reg = Registry(root)
    train(reg, "late", data=orders, target="late", model="hgb", drop=["delivery_minutes"],
          params={"max_iter": 30})
    log_csv = work / "late_log.csv"
    with open(log_csv, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=LATE_FEATURES)
        w.writeheader()
        for i, r in enumerate(frequent_rows(orders)):
            w.writerows([r] * (10 - i))
    attach_table(reg, "late", log_csv)
    train(reg, "late", data=orders, target="late", model="logreg", drop=["delivery_minutes"])
    train(reg, "eta", data=orders, target="delivery_minutes", model="mlp", drop=["late"],
          params={"max_iter": 200})
    reg.close()
    KeyRing(root).init()
    server = start_cloud(root)
    with open(orders) as fh:
        rows = [{c: typed(c, r[c]) for c in LATE_FEATURES} for r in csv.DictReader(fh)][:200]
    yield {"cloud": server, "registry": root, "rows": rows,
           "hits": [{c: typed(c, r[c]) for c in LATE_FEATURES}
                    for r in frequent_rows(orders, 3)]}
    server.stop()


def typed(column: str, text: str) -> Any:
    """A CSV cell as JSON: numbers for the numeric columns, None for empty cells."""
    if not text:
        return None
    return float(text) if column in {"hour", "distance_km", "items"} else text


# ----------------------------------------------------------------------------- the scenario
def scenario(dev: DeviceProcess, site: dict[str, Any], work: Path) -> dict[str, Any]:
    """Everything the device answers, in order; the cloud's aliases are set here."""
    cloud: CloudServer = site["cloud"]
    reg = Registry(site["registry"])
    out: dict[str, Any] = {"versions": dev.call("versions")}
    try:
        reg.set_alias("late", "stable", 1)
        store = cloud.trust(work / "store")
        dev.call("open", store=str(store), name="late", cloud=cloud.url)
        out["sync_v1"] = dev.call("sync")
        rows, hits = site["rows"], site["hits"]
        out["v1_batch"] = dev.call("predict", rows=rows)
        out["v1_one"] = dev.call("predict_one", rows=rows[:40])
        out["hits"] = dev.call("predict", rows=hits)
        out["feedback"] = dev.call("feedback", id=out["v1_batch"][0]["prediction_id"],
                                   label="late")
        out["push"] = dev.call("push")
        # A generous deadline: an emulated board under load must not time out into a
        # degraded answer that the reference did not give.
        dev.call("open", store=str(store), name="late", cloud=cloud.url,
                 policy={"min_confidence": 0.95, "timeout_ms": 20000})
        out["fallback"] = dev.call("predict", rows=rows[:60])
        dev.call("open", store=str(store), name="late", cloud=DEAD,
                 policy={"min_confidence": 0.95, "timeout_ms": 500})
        out["offline"] = dev.call("predict", rows=rows[:60])
        dev.call("open", store=str(store), name="late", cloud=cloud.url)
        reg.set_alias("late", "stable", 2)
        out["sync_v2"] = dev.call("sync")
        out["v2_batch"] = dev.call("predict", rows=rows)
        out["rollback"] = dev.call("rollback")
        out["rolled_back"] = dev.call("predict", rows=rows)
        out["gc"] = dev.call("gc")
        out["doctor"] = dev.call("doctor", store=str(store), name="late", cloud=cloud.url)
        out["spool"] = dev.call("spool")
        eta = cloud.trust(work / "eta")
        dev.call("open", store=str(eta), name="eta", cloud=cloud.url)
        out["sync_eta"] = dev.call("sync")
        out["eta"] = dev.call("predict", rows=rows)
        out["eta_one"] = dev.call("predict_one", rows=rows[:40])
    finally:
        reg.set_alias("late", "stable", 1)
        reg.close()
    return out


@pytest.fixture(scope="module")
def reference(site: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
              ) -> dict[str, Any]:
    """The scenario on this machine's Python (x86): what every board must answer."""
    work = tmp_path_factory.mktemp("x86")
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    dev = DeviceProcess([sys.executable, str(DEVICE)], env, work / "device.log")
    try:
        return scenario(dev, site, work)
    finally:
        dev.close()


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This checkout, built into a wheel and unpacked once for every board."""
    rootfs.cache_dir().mkdir(parents=True, exist_ok=True)
    return rootfs.project(rootfs.cache_dir())


@pytest.fixture(scope="module", params=SELECTED)
def board(request: pytest.FixtureRequest, site: dict[str, Any], project: Path,
          tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The scenario on one emulated board."""
    cpu, versions = request.param.split("/")
    target = rootfs.device(cpu, VERSION_SETS[versions], project)
    work = tmp_path_factory.mktemp(f"{cpu}-{versions}")
    dev = DeviceProcess(target.command(str(DEVICE)), target.env(), work / "device.log")
    try:
        return scenario(dev, site, work)
    finally:
        dev.close()


# ----------------------------------------------------------------------------- comparisons
def floats(answer: dict[str, Any]) -> tuple[list[float], bool]:
    """The floating-point outputs of one answer and whether they are rounded: probabilities
    (rounded to 6 decimals by :class:`~hybridml.edge.prediction.Prediction`), or a
    regression's float32 value."""
    probs = answer.get("probabilities")
    if probs is not None:
        return [float(v) for _, v in sorted(probs.items())], True
    pred = answer["prediction"]
    return ([float(pred)] if isinstance(pred, float) else []), False


def ulps(a: float, b: float) -> int:
    """How many float32 values lie between ``a`` and ``b`` (0: the same float32)."""
    ia, ib = (int(np.array(x, dtype=np.float32).view(np.int32)) for x in (a, b))
    # Map the sign-magnitude bit patterns onto a line where adjacent floats differ by 1.
    ia, ib = (i if i >= 0 else -(i & 0x7FFFFFFF) for i in (ia, ib))
    return abs(ia - ib)


def same_answers(ref: list[dict[str, Any]], got: list[dict[str, Any]], *, exact: bool
                 ) -> dict[str, Any]:
    """Assert ``got`` answers as ``ref`` does; returns how close the floats are.

    Labels, sources, versions and flags must be equal. Floats must be bit-identical with
    ``exact``; otherwise a regression's float32 output may be :data:`MAX_ULPS` away, and a
    probability (rounded to 6 decimals) one step of its last decimal: a few ulps of difference
    before rounding can round the other way."""
    assert len(got) == len(ref)
    n = identical = worst_ulps = 0
    worst_rounded = 0.0
    for r, g in zip(ref, got, strict=True):
        r_fixed = {k: v for k, v in r.items() if k not in ("prediction_id", "probabilities")}
        g_fixed = {k: v for k, v in g.items() if k not in ("prediction_id", "probabilities")}
        if isinstance(r_fixed.get("prediction"), float):
            r_fixed.pop("prediction"), g_fixed.pop("prediction")
        assert g_fixed == r_fixed
        (fr, rounded), (fg, _) = floats(r), floats(g)
        assert len(fr) == len(fg)
        for a, b in zip(fr, fg, strict=True):
            n += 1
            identical += a == b
            if rounded:
                worst_rounded = max(worst_rounded, abs(a - b))
            else:
                worst_ulps = max(worst_ulps, ulps(a, b))
    stats = {"values": n, "bit_identical": identical, "max_ulps": worst_ulps,
             "max_rounded_diff": worst_rounded}
    print(json.dumps(stats))
    if exact:
        assert identical == n, stats
    assert worst_ulps <= MAX_ULPS and worst_rounded <= ROUNDING_STEP, stats
    return stats


def test_board_runs_arm64_with_the_versions_under_test(board: dict[str, Any],
                                                       request: pytest.FixtureRequest) -> None:
    v = board["versions"]
    assert v["machine"] == "aarch64"
    wanted = VERSION_SETS[request.node.callspec.params["board"].split("/")[1]]
    for dist, pin in wanted.pins:
        assert v[dist] == pin
    print(json.dumps(v))


def test_the_boards_run_the_compressed_tree_graph(site: dict[str, Any]) -> None:
    """late v1 (hgb) ships as ai.onnx.ml opset 5's TreeEnsemble (docs/device.md §4): the
    floor of the onnxruntime range must run it, and the lowest set does."""
    reg = Registry(site["registry"])
    try:
        assert reg.manifest("late", 1)["compression"]["chosen"] == "trees_v5"
    finally:
        reg.close()


def test_sync_installs_the_same_version_and_artifacts(board: dict[str, Any],
                                                      reference: dict[str, Any]) -> None:
    for step in ("sync_v1", "sync_v2", "sync_eta"):
        got, ref = board[step], reference[step]
        assert got["changed"] and got["version"] == ref["version"]
        assert got["downloaded"] == ref["downloaded"]
        assert got["bytes_downloaded"] == ref["bytes_downloaded"]


def same_runtime(board: dict[str, Any], reference: dict[str, Any]) -> bool:
    """True when the board runs the reference's onnxruntime: then a tree model's answers
    are bit-identical across CPUs. Between releases, kernels change (1.21's TreeEnsemble and
    1.32's differ in a probability's last rounded decimal on a few rows)."""
    return bool(board["versions"]["onnxruntime"] == reference["versions"]["onnxruntime"])


def test_tree_model_answers_bit_identical_offline(board: dict[str, Any],
                                                  reference: dict[str, Any]) -> None:
    exact = same_runtime(board, reference)
    same_answers(reference["v1_batch"], board["v1_batch"], exact=exact)
    same_answers(reference["v1_one"], board["v1_one"], exact=exact)
    same_answers(board["v1_batch"][:40], board["v1_one"], exact=True)  # two routes, one rule


def test_linear_and_mlp_answers_within_float_tolerance(board: dict[str, Any],
                                                       reference: dict[str, Any]) -> None:
    same_answers(reference["v2_batch"], board["v2_batch"], exact=False)
    same_answers(reference["eta"], board["eta"], exact=False)
    same_answers(reference["eta_one"], board["eta_one"], exact=False)


def test_precomputed_rows_are_table_hits(board: dict[str, Any],
                                         reference: dict[str, Any]) -> None:
    assert [a["source"] for a in board["hits"]] == ["precomputed"] * 3
    same_answers(reference["hits"], board["hits"], exact=True)  # the table's stored answers


def test_unsure_rows_fall_back_to_the_cloud(board: dict[str, Any],
                                            reference: dict[str, Any]) -> None:
    sources = [a["source"] for a in board["fallback"]]
    assert "cloud" in sources and ("edge" in sources or "precomputed" in sources)
    same_answers(reference["fallback"], board["fallback"], exact=False)


def test_offline_fallback_answers_locally_marked_degraded(board: dict[str, Any],
                                                          reference: dict[str, Any]) -> None:
    assert any(a.get("degraded") for a in board["offline"])
    same_answers(reference["offline"], board["offline"], exact=same_runtime(board, reference))


def test_rollback_reactivates_v1_with_its_answers(board: dict[str, Any],
                                                  reference: dict[str, Any]) -> None:
    assert board["rollback"] == {"version": 1, "loaded": 1}
    same_answers(board["v1_batch"], board["rolled_back"], exact=True)


def test_store_gc_keeps_exactly_the_reference_artifacts(board: dict[str, Any],
                                                        reference: dict[str, Any]) -> None:
    assert board["gc"] == reference["gc"]


def test_telemetry_is_spooled_and_pushed(board: dict[str, Any],
                                         reference: dict[str, Any]) -> None:
    push, ref = board["push"], reference["push"]
    assert push["error"] is None and push["pending"] == 0
    assert push["accepted"] == ref["accepted"] > 0
    assert board["spool"] == reference["spool"]


def test_doctor_finds_the_board_fit(board: dict[str, Any]) -> None:
    doctor = board["doctor"]
    checks = {c["check"]: c for c in doctor["checks"]}
    print("\n".join(f"{c['status']:<6}{n:<8}{c['detail']}" for n, c in checks.items()))
    assert doctor["exit"] == 0 and doctor["ok"]
    assert checks["cpu"]["status"] == "ok" and checks["cpu"]["detail"].startswith("aarch64")
    assert checks["store"]["status"] == "ok" and checks["python"]["status"] == "ok"
