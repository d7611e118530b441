"""``hybridml-cloud rollout``: start, status, list, promote, abort and tick, in-process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hybridml.cloud.auth import AuditLog
from hybridml.cloud.cli import main
from hybridml.cloud.registry import Registry
from hybridml.cloud.rollouts import Rollouts
from tests.cloud.rolloutkit import with_candidates


@pytest.fixture
def reg(iris_copy: Path) -> list[str]:
    """``--registry`` of iris v1 (stable), v2 (not blessed), v3 and v4 (blessed)."""
    with_candidates(iris_copy).close()
    return ["--registry", str(iris_copy)]


def test_a_canary_from_start_to_promote(reg: list[str], iris_copy: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rollout", "start", "iris", "--candidate", "3", "--strategy", "canary",
                 "--steps", "1,5,20,50,100", "--dwell", "2h", "--report-timeout", "30m",
                 "--min-devices", "3", "--sample", "0.2", "--reason", "weekly", *reg]) == 0
    out = capsys.readouterr().out
    assert "rollout 1 of iris: canary of v3 (stable v1), running, step 1 of 5 (1%)" in out
    assert "dwell_s           2h" in out and "report_timeout_s  30m" in out
    r = Rollouts(Registry(iris_copy)).get(1)
    assert r.config.min_devices == 3 and r.config.sample == 0.2
    assert r.config.dwell_s == 7200 and r.config.report_timeout_s == 1800
    event = Rollouts(Registry(iris_copy)).events(1)[0]
    assert event["actor"].startswith("cli:") and event["reason"] == "weekly"

    Rollouts(Registry(iris_copy)).assign("iris", "dev-1")
    assert main(["rollout", "status", "iris", *reg]) == 0
    out = capsys.readouterr().out
    assert "cohorts (units assigned per arm):" in out and "recent events:" in out
    assert "decision:" in out or "no analysis" in out
    assert main(["rollout", "status", "iris", "--json", *reg]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["rollout"]["id"] == 1 and sum(status["cohorts"].values()) == 1

    assert main(["rollout", "promote", "iris", *reg]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["rollout", "promote", "iris", "--force", "--reason", "ok", *reg]) == 0
    assert "stable -> v3" in capsys.readouterr().out
    assert Registry(iris_copy).resolve("iris", "stable") == 3
    assert AuditLog(iris_copy).entries("iris")[-1]["by"].startswith("cli:")

    assert main(["rollout", "list", "iris", *reg]) == 0
    out = capsys.readouterr().out
    assert "canary" in out and "promoted" in out and "v1->v3" in out
    assert main(["rollout", "list", "iris", "--json", *reg]) == 0
    assert json.loads(capsys.readouterr().out)["rollouts"][0]["state"] == "promoted"


def test_ab_and_abort(reg: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rollout", "start", "iris", "--strategy", "ab", "--arms", "1,3,4",
                 "--split", "50,25,25", "--metric", "accuracy", "--min-samples", "300",
                 "--max-duration", "7d", "--json", *reg]) == 0
    started = json.loads(capsys.readouterr().out)["rollout"]
    assert started["arms"] == [1, 3, 4] and started["config"]["split"] == [50, 25, 25]
    assert started["config"]["max_duration_s"] == 7 * 86400
    assert main(["rollout", "abort", "iris", "--reason", "wrong metric", *reg]) == 0
    assert "aborted" in capsys.readouterr().out
    assert main(["rollout", "abort", "iris", *reg]) == 2
    assert "no running or held rollout" in capsys.readouterr().err


def test_tick_analyses_and_acts(reg: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rollout", "tick", "iris", *reg]) in (0, 2)
    capsys.readouterr()
    assert main(["rollout", "start", "iris", "--candidate", "3", "--strategy", "shadow",
                 "--min-predictions", "10", *reg]) == 0
    capsys.readouterr()
    code = main(["rollout", "tick", "iris", "--json", *reg])
    out = capsys.readouterr()
    if code == 2:  # an installation without hybridml.cloud.rollout_analysis
        assert "rollout analysis" in out.err
        return
    assert code == 0
    doc = json.loads(out.out)
    assert doc["analysis"]["action"] in ("hold", "ready", "abort", "promote")


@pytest.mark.parametrize(("argv", "words"), [
    (["--candidate", "3", "--strategy", "canary", "--steps", "5,1,100"], "must increase"),
    (["--candidate", "3", "--strategy", "canary", "--dwell", "soon"], "not a duration"),
    (["--candidate", "3", "--strategy", "canary", "--sample", "lots"], "not a number"),
    (["--candidate", "3", "--strategy", "shadow", "--steps", "100"], "applies to canary"),
    (["--candidate", "2", "--strategy", "canary"], "--force"),
    (["--candidate", "1", "--strategy", "canary"], "already iris's stable"),
    (["--strategy", "ab", "--arms", "1,3", "--split", "70,20"], "sum to 100"),
    (["--strategy", "canary"], "needs a candidate"),
])
def test_bad_flags_exit_2_with_the_reason(reg: list[str], argv: list[str], words: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rollout", "start", "iris", *argv, *reg]) == 2
    assert words in capsys.readouterr().err


def test_reads_of_a_model_without_rollouts(reg: list[str],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rollout", "list", "iris", *reg]) == 0
    assert "no rollouts yet" in capsys.readouterr().out
    assert main(["rollout", "status", "iris", *reg]) == 2
    assert "has no rollout" in capsys.readouterr().err
    assert main(["rollout", "status", "ghost", "--json", *reg]) == 2
    assert json.loads(capsys.readouterr().out)["error"]["code"] == "not_found"
