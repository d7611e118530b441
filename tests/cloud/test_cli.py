"""``hybridml-cloud`` commands: JSON output, tables, precompute, promote, clean errors."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path
from typing import cast

import pytest

from hybridml.cloud.cli import main

CLOUD = str(Path(sys.executable).parent / "hybridml-cloud")


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> object:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_train_json_has_the_documented_fields(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = run_json(capsys, "train", "--dataset", "digits", "--name", "digits", "--model",
                   "mlp", "--param", "hidden_layer_sizes=[32]", "--registry",
                   str(tmp_path / "r"))
    assert isinstance(out, dict)
    assert {"name", "version", "task", "metrics", "quantization", "artifacts"} <= set(out)
    assert out["name"] == "digits" and out["version"] == 1 and out["task"] == "multiclass"
    assert out["quantization"]["chosen"] in ("int8_dynamic", "int8_static", "fp32")
    assert {c["variant"] for c in out["quantization"]["candidates"]} == \
        {"fp32", "int8_dynamic", "int8_static"}
    assert all(len(a["sha256"]) == 64 and a["size"] > 0 for a in out["artifacts"])


def test_registry_comes_from_the_environment(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("HYBRIDML_REGISTRY", str(tmp_path / "envreg"))
    assert main(["train", "--dataset", "iris", "--name", "iris", "--model", "logreg",
                 "--quiet"]) == 0
    assert (tmp_path / "envreg" / "registry.db").exists()
    out = capsys.readouterr().out
    assert "registered iris v1" in out and "compression" in out


def test_models_table_and_promote(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reg = str(tmp_path / "r")
    for seed in ("0", "1"):
        main(["train", "--dataset", "iris", "--name", "iris", "--model", "logreg", "--seed",
              seed, "--registry", reg, "--quiet"])
    capsys.readouterr()
    assert main(["models", "--registry", reg]) == 0
    table = capsys.readouterr().out
    assert "iris" in table and "stable=v1" in table and "accuracy=" in table
    assert main(["promote", "iris", "2", "--registry", reg]) == 0
    assert "stable -> v2" in capsys.readouterr().out
    listed = run_json(capsys, "models", "iris", "--registry", reg)
    versions = cast("list[dict[str, object]]", listed)  # `models NAME --json`: one dict a version
    assert [v["aliases"] for v in versions] == [[], ["stable"]]


def test_precompute_attaches_a_table_and_reports_coverage(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], orders_csv: Path) -> None:
    reg = str(tmp_path / "r")
    main(["train", "--data", str(orders_csv), "--target", "late", "--drop",
          "delivery_minutes", "--name", "late", "--model", "logreg", "--registry", reg,
          "--quiet"])
    with open(orders_csv) as fh:
        rows = list(csv.DictReader(fh))
    log = tmp_path / "log.csv"
    with open(log, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows[:5] * 3 + rows[5:10]:
            w.writerow(r)
    capsys.readouterr()
    out = run_json(capsys, "precompute", "--name", "late", "--inputs", str(log), "--top", "5",
                   "--registry", reg)
    assert isinstance(out, dict)
    assert out["kept"] == 5 and out["requests"] == 20 and out["coverage"] == 0.75
    manifest = run_json(capsys, "models", "late", "--registry", reg)
    assert manifest  # the version still lists
    from hybridml.cloud.registry import Registry

    roles = [a["role"] for a in Registry(reg).manifest("late")["artifacts"]]
    assert roles.count("table") == 1


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["train", "--dataset", "mnist", "--name", "x"], "unknown dataset 'mnist'"),
        (["train", "--data", "nope.csv", "--target", "y", "--name", "x"], "no such file"),
        (["train", "--dataset", "iris", "--name", "x", "--param", "oops"], "KEY=VALUE"),
        (["promote", "ghost", "1"], "no model 'ghost'"),
        (["precompute", "--name", "ghost", "--inputs", "x.csv"], "no model 'ghost'"),
    ],
)
def test_bad_input_prints_one_clear_line_and_exits_2(tmp_path: Path, argv: list[str],
                                                     needle: str) -> None:
    proc = subprocess.run([CLOUD, *argv, "--registry", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=120, check=False,
                          cwd=tmp_path)
    assert proc.returncode == 2
    assert needle in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_json_errors_go_to_stdout_as_json(tmp_path: Path) -> None:
    proc = subprocess.run([CLOUD, "promote", "ghost", "1", "--json", "--registry",
                           str(tmp_path / "r")], capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == 2
    assert json.loads(proc.stdout)["error"]["code"] == "not_found"


def test_train_is_quiet_when_piped(tmp_path: Path, orders_csv: Path) -> None:
    proc = subprocess.run([CLOUD, "train", "--data", str(orders_csv), "--target", "late",
                           "--drop", "delivery_minutes", "--name", "late", "--model", "logreg",
                           "--registry", str(tmp_path / "r")], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0
    assert "\r" not in proc.stderr  # no progress line when stderr is not a terminal


def test_progress_line_is_drawn_only_when_enabled() -> None:
    import io

    from hybridml.cloud.progress import StepProgress

    buf = io.StringIO()
    p = StepProgress(enabled=True, stream=buf)
    p("fitting")
    p.bar(5, 10, "precompute")
    p.close()
    assert "fitting" in buf.getvalue() and "5/10" in buf.getvalue()
    quiet = io.StringIO()
    q = StepProgress(stream=quiet)  # StringIO is not a TTY
    q("fitting")
    q.close()
    assert quiet.getvalue() == ""
