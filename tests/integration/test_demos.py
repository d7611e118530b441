"""The demos run end to end as a new user runs them (``make demo``, ``make demo-loop``,
``make demo-rollout``), each in a fresh work directory, and say what they promise."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def demo(module: str, workdir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", module, "--workdir", str(workdir)],
                          capture_output=True, text=True, timeout=300, check=False)


def test_the_demo_shows_table_hits_local_answers_and_the_fallback(tmp_path: Path) -> None:
    done = demo("hybridml.cloud.demo", tmp_path / "demo")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "online, out-of-range row    cloud (out_of_range)" in done.stdout
    assert "verified on the edge" in done.stdout


def test_the_loop_sees_the_drift_trains_v1_1_and_recovers(tmp_path: Path) -> None:
    done = demo("hybridml.cloud.demo_loop", tmp_path / "loop")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    out = done.stdout
    assert "monitor: alerts on hour, rain; dataset drift True" in out
    assert "v1.1 (version 2) fine-tuned, gated, promoted" in out
    assert "active v1.1" in out
    assert (tmp_path / "loop" / "drift.html").read_text().count("data:image/png;base64") >= 2


def test_the_rollout_demo_aborts_the_bad_canary_and_promotes_the_good_one(tmp_path: Path
                                                                         ) -> None:
    done = demo("hybridml.cloud.demo_rollout", tmp_path / "rollout")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    out = done.stdout
    assert "FAILED" not in out
    assert "abort: agreement broke its bound" in out or "abort: metric broke its bound" in out
    assert "every check passed at the last step (100 %): promote v3" in out
    assert "# after one more sync: {3: 30}" in out
