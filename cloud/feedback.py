"""``hybridml-cloud feedback --name eta --data labelled.csv``: ground truth from a CSV.

A CSV row is one of two things:

* a **labelled row**: every feature column of the model plus the target column the model
  was trained on (``manifest["training"]["target"]``, e.g. ``delivery_minutes``) — kept as
  training data for the next retrain;
* a **label for a prediction**: ``prediction_id`` and ``label`` columns (the target's name
  works for ``label`` too), with ``prediction`` and ``version`` columns when the CSV has them,
  so the label can be scored against what the model said.

Rows go through the same checks as ``POST /v1/models/<name>/feedback``
(:func:`hybridml.cloud.ingest.check_feedback_item`) into the same store; a bad row is refused
alone, naming its line and column. Each row's id is ``csv-<sha256 of the file>:<line>``, so
loading the same file twice adds nothing the second time. The device recorded is ``cli``
(``--device`` to name another).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import sys
from pathlib import Path
from typing import Any

from hybridml.shared import cells
from hybridml.shared.errors import DataError
from hybridml.shared.schema import NUMERIC

from .facts import ModelFacts
from .ingest import MAX_RECORDS
from .registry import Registry
from .telemetry import IngestResult, TelemetryStore

DEVICE = "cli"


def read_feedback_csv(path: str | Path, facts: ModelFacts, target: str) -> list[dict[str, Any]]:
    """The feedback items of a CSV, one per row, in line order (see the module docstring)."""
    raw = Path(path).read_bytes()
    tag = "csv-" + hashlib.sha256(raw).hexdigest()[:16]
    try:
        reader = csv.DictReader(raw.decode("utf-8-sig").splitlines())
        header = list(reader.fieldnames or [])
        rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path} is not a UTF-8 CSV: {exc}", field="data") from None
    names = facts.schema.names
    labelled = target in header and all(n in header for n in names)
    label_col = "label" if "label" in header else target
    if not labelled and not ("prediction_id" in header and label_col in header):
        raise DataError(f"{path} needs the feature columns ({', '.join(names)}) and {target!r}"
                        f", or 'prediction_id' and 'label' columns; it has "
                        f"{', '.join(header) or 'no header'}", field="data")
    items = []
    for line, row in enumerate(rows, start=2):
        item: dict[str, Any] = {"id": f"{tag}:{line}", "format": 1, "model": facts.name}
        if labelled:
            item["features"] = {n: _typed(facts, n, row.get(n)) for n in names}
            item["label"] = _label(facts, row.get(target))
        else:
            item["prediction_id"] = row.get("prediction_id") or None
            item["label"] = _label(facts, row.get(label_col))
            if row.get("prediction"):
                item["prediction"] = _label(facts, row["prediction"])
            if (row.get("version") or "").strip().isdigit():
                item["version"] = int(row["version"])
        items.append(item)
    return items


def load_feedback(store: TelemetryStore, model: str, path: str | Path,
                  device: str = DEVICE) -> IngestResult:
    """Read ``path`` and store its rows as feedback for ``model``; refused rows name their
    CSV line (``index`` is the line number)."""
    facts = store.facts(model)
    target = str((store.registry.manifest(model, facts.version).get("training") or {})
                 .get("target") or "label")
    items = read_feedback_csv(path, facts, target)
    total = IngestResult()
    for i in range(0, len(items), MAX_RECORDS):
        part = store.add_feedback(model, device, items[i:i + MAX_RECORDS])
        total.accepted += part.accepted
        total.duplicates += part.duplicates
        total.refused += [{**r, "index": r["index"] + i + 2} for r in part.refused]
    return total


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add ``feedback`` to the ``hybridml-cloud`` subcommands."""
    f = sub.add_parser("feedback", parents=[common],
                       help="load ground truth (labelled rows, or labels of predictions)")
    f.add_argument("--name", required=True, help="model name")
    f.add_argument("--data", required=True, help="CSV: features + target, or prediction_id + "
                   "label")
    f.add_argument("--device", default=DEVICE, help=f"device recorded (default {DEVICE})")
    f.set_defaults(func=cmd_feedback)


def cmd_feedback(args: argparse.Namespace) -> int:
    """``feedback``: counts on stdout, the first refusals on stderr; exit 2 if any refused."""
    store = TelemetryStore(Registry.from_env(args.registry, create=False))
    result = load_feedback(store, args.name, args.data, args.device)
    out = {"accepted": len(result.accepted), "duplicates": len(result.duplicates),
           "refused": len(result.refused), "refusals": result.refused[:20]}
    if args.json:
        print(json.dumps(out, indent=2, sort_keys=True))
    else:
        print(f"{args.name}: accepted {out['accepted']}, duplicates {out['duplicates']}, "
              f"refused {out['refused']}")
        for r in result.refused[:10]:
            print(f"  line {r['index']}: {r.get('field', '-')}: {r['error']}", file=sys.stderr)
    return 2 if result.refused else 0


def _typed(facts: ModelFacts, name: str, text: str | None) -> Any:
    """A CSV cell as the typed value the feedback rules check: numbers for numeric columns
    (text that is no number stays text, and is refused naming the column)."""
    if text is None:
        return None
    if facts.schema.features[facts.schema.names.index(name)].kind != NUMERIC:
        return text
    try:
        value = cells.number_text(text)
    except cells.CellRefused:
        return text
    return None if math.isnan(value) else value


def _label(facts: ModelFacts, text: str | None) -> Any:
    if text is None or not text.strip():
        return None
    if facts.task != "regression":
        return text.strip()
    try:
        return float(text)
    except ValueError:
        return text
