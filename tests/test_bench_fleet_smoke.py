"""The fleet benchmark (items 7 and 13) on tiny settings: real PostgreSQL, SeaweedFS and
three replicas, so it cannot rot. No timing is asserted; what is checked is that it runs,
loses and double-counts nothing, injects its faults and writes its JSON, plot and section.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_bench_smoke import run_tiny


@pytest.mark.timeout(420)  # starts PostgreSQL, SeaweedFS and three replicas
def test_fleet_suite_on_tiny_settings_loses_nothing_and_writes_its_section(tmp_path: Path
                                                                         ) -> None:
    results = run_tiny(tmp_path, "fleet")
    scale = json.loads((results / "fleet_scale.json").read_text())  # the fleet suite's item 13
    assert scale["suite"] == "fleet_scale" and scale["mode"] == "tiny"
    for run in ("fleet", "baseline"):  # no error outside the injected faults, on either
        assert scale[run]["errors_outside_faults"] == 0, scale[run]["error_examples"]
        integrity = scale[run]["integrity"]
        assert integrity["records_sent"] > 0
        assert integrity["lost"] == integrity["stored_twice"] == integrity["counted_twice"] == 0
    assert {f["name"] for f in scale["fleet"]["faults"]} == {
        "pg_restart", "slow_object_store", "replica_kill"}
    assert (results / "fleet_scale.png").exists()
    assert "## 13. A fleet at scale" in (results / "REPORT.md").read_text()
