"""The edge stays light: sync and predict without sklearn, skl2onnx, onnx, scipy or flask."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.conftest import CloudServer

HEAVY = ("sklearn", "skl2onnx", "onnx", "scipy", "flask", "pandas")


def test_edge_syncs_and_predicts_without_heavy_imports(cloud: CloudServer,
                                                       tmp_path: Path) -> None:
    code = textwrap.dedent(f"""
        import json, sys
        from hybridml.edge import EdgeRuntime
        rt = EdgeRuntime({str(cloud.trust(tmp_path / 'store'))!r}, "late", {cloud.url!r})
        rt.sync()
        p = rt.predict([{{"restaurant": "r001", "hour": 12, "distance_km": 3.0,
                         "rain": "no", "items": 2}}])[0]
        heavy = sorted(m for m in {HEAVY!r} if m in sys.modules)
        print(json.dumps({{"heavy": heavy, "source": p.source, "version": p.model_version}}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=tmp_path)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"heavy": [], "source": "edge", "version": 1}


def test_edge_cli_imports_nothing_heavy() -> None:
    code = ("import sys, hybridml.edge.cli; "
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"
