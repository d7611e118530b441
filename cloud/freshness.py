"""The value of fresh data: how much a model gains from newer data, and from retraining more often.

``hybridml-cloud freshness --data orders.csv --target late --time-column ts --windows 30d,7d,1d``
answers two questions on time-stamped data, so a user can choose how often to retrain:

* **Trailing windows.** The most recent ``--eval`` period (default: the shortest window) is held
  out. For each window length W the model is trained on the W of data just before it, and
  scored on it. A model that gains from a short, recent window lives in a world that changes; one
  that gains from a long window wants volume more than freshness.
* **Retraining intervals** (``--intervals 1d,7d``). Walking forward through the data after a
  warm-up, the model is retrained every I on the ``--train-window`` before that moment (default:
  the longest window) and scores the rows until the next retraining; the rows-weighted mean
  over the walk is the metric of retraining every I.

With ``--compare FAMILY`` both families run on every window and interval: *model iteration*
(a better family on the same data) set against *data iteration* (the same family on fresher
data), in one table.

Models are scikit-learn pipelines built and scored as ``train`` builds them (the kit's own
families and primary metrics), without ONNX export or registration: this is an analysis.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hybridml.shared.clock import format_duration, from_iso, parse_duration, utc_iso
from hybridml.shared.errors import ConfigError, DataError
from hybridml.shared.text import format_table

from . import metrics
from .data import Dataset, load_csv
from .models import build_pipeline, combine, family

log = logging.getLogger("hybridml.cloud.freshness")
MIN_TRAIN_ROWS = 20
MIN_EVAL_ROWS = 5


@dataclass(frozen=True)
class Point:
    """One trained-and-scored setting."""

    study: str  # "window" or "interval"
    family: str
    span: str  # the window or interval as written ("7d")
    seconds: float
    train_rows: int
    eval_rows: int
    metric: str
    value: float | None  # None: too few rows to train or score
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        """JSON form."""
        return {"study": self.study, "family": self.family, "span": self.span,
                "seconds": self.seconds, "train_rows": self.train_rows,
                "eval_rows": self.eval_rows, "metric": self.metric, "value": self.value,
                "note": self.note}


@dataclass
class Freshness:
    """Every point of a study, with what was held out."""

    source: str
    task: str
    metric: str
    higher_is_better: bool
    eval_start: str
    eval_end: str
    points: list[Point] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """JSON form for ``--json``."""
        return {"source": self.source, "task": self.task, "metric": self.metric,
                "higher_is_better": self.higher_is_better,
                "eval": {"start": self.eval_start, "end": self.eval_end},
                "points": [p.to_json() for p in self.points], "iteration": self.iteration()}

    def iteration(self) -> dict[str, Any] | None:
        """Data iteration against model iteration, on the window study: the first family's
        gain from its longest window to its best one, and the second family's gain over the
        first on the longest window. None without two families."""
        fams = list(dict.fromkeys(p.family for p in self.points))
        wins = [p for p in self.points if p.study == "window" and p.value is not None]
        if len(fams) < 2 or not wins:
            return None
        sign = 1.0 if self.higher_is_better else -1.0
        first = [p for p in wins if p.family == fams[0]]
        longest = max(first, key=lambda p: p.seconds)
        best = max(first, key=lambda p: sign * (p.value or 0.0))
        other = next((p for p in wins if p.family == fams[1] and p.span == longest.span), None)
        if other is None:
            return None
        assert longest.value is not None and best.value is not None and other.value is not None
        return {"data": {"family": fams[0], "from": longest.span, "to": best.span,
                         "gain": round(sign * (best.value - longest.value), 6)},
                "model": {"from": fams[0], "to": fams[1], "window": longest.span,
                          "gain": round(sign * (other.value - longest.value), 6)}}

    def table(self) -> str:
        """A terminal table, one row per point."""
        rows = [[p.study, p.family, p.span, f"{p.train_rows:,}", f"{p.eval_rows:,}",
                 "-" if p.value is None else f"{p.value:.4f}", p.note] for p in self.points]
        better = "higher" if self.higher_is_better else "lower"
        text = (f"{self.metric} ({better} is better); held out {self.eval_start} .. "
                f"{self.eval_end}\n" + format_table(
                    ["study", "model", "span", "train rows", "scored rows", self.metric, ""],
                    rows))
        it = self.iteration()
        if it:
            d, m = it["data"], it["model"]
            text += (f"\ndata iteration:  {d['family']} on the last {d['to']} instead of "
                     f"{d['from']}: {d['gain']:+.4f}\nmodel iteration: {m['to']} instead of "
                     f"{m['from']} on the last {m['window']}: {m['gain']:+.4f}")
        return text


# ------------------------------------------------------------------------------------ api
def study(data: str | os.PathLike[str], target: str, time_column: str, *,
          windows: Sequence[str], intervals: Sequence[str] = (), model: str = "hgb",
          compare: str | None = None, eval_span: str | None = None,
          train_window: str | None = None, drop: Sequence[str] = (), seed: int = 0,
          params: dict[str, Any] | None = None) -> Freshness:
    """Run the window study (and the interval study when ``intervals``); see the module doc."""
    if not windows:
        raise ConfigError("--windows needs at least one length, e.g. 30d,7d,1d",
                          field="windows")
    families = [family(model).name] + ([family(compare).name] if compare else [])
    spans = {w: parse_duration(w, "windows") for w in windows}
    steps = {i: parse_duration(i, "intervals") for i in intervals}
    hold = parse_duration(eval_span, "eval") if eval_span else min(spans.values())
    warm = parse_duration(train_window, "train_window") if train_window else max(spans.values())
    times, ds = _load(Path(data), target, time_column, drop)
    end = float(times[-1])
    eval_start = end - hold
    scored = np.flatnonzero(times > eval_start)
    if scored.size < MIN_EVAL_ROWS:
        raise DataError(f"only {scored.size} rows fall in the last {format_duration(hold)} "
                        "of the data; hold out a longer --eval period", field="eval")
    name = metrics.PRIMARY[ds.task]
    result = Freshness(str(data), ds.task, name, name != "rmse", utc_iso(eval_start),
                       utc_iso(end))
    for fam in families:
        for span, seconds in sorted(spans.items(), key=lambda kv: -kv[1]):
            train_idx = np.flatnonzero((times > eval_start - seconds) & (times <= eval_start))
            result.points.append(_point("window", fam, span, seconds, ds, train_idx, scored,
                                        seed, params))
        for span, seconds in sorted(steps.items(), key=lambda kv: -kv[1]):
            result.points.append(_walk(fam, span, seconds, times, ds, warm, seed, params))
    return result


def plot(result: Freshness, path: str | os.PathLike[str]) -> Path:
    """A PNG of the metric against window length (and retraining interval), one line a model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    studies = [s for s in ("window", "interval") if any(p.study == s for p in result.points)]
    fig, axes = plt.subplots(1, len(studies), figsize=(5.5 * len(studies), 4), squeeze=False)
    for ax, what in zip(axes[0], studies):
        for fam in dict.fromkeys(p.family for p in result.points):
            pts = sorted((p for p in result.points if p.study == what and p.family == fam
                          and p.value is not None), key=lambda p: p.seconds)
            if pts:
                ax.plot([p.seconds / 86400 for p in pts], [p.value for p in pts], marker="o",
                        label=fam)
        ax.set_xscale("log")
        marks = sorted({p.seconds: p.span for p in result.points if p.study == what}.items())
        ax.set_xticks([sec / 86400 for sec, _ in marks], [span for _, span in marks])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(("trailing window" if what == "window" else "retraining interval")
                      + " (days)")
        ax.set_ylabel(result.metric)
        ax.set_title("training on the last W" if what == "window" else "retraining every I")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# ------------------------------------------------------------------------------------ cli
def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add ``freshness`` to the ``hybridml-cloud`` subcommands."""
    f = sub.add_parser("freshness", parents=[common],
                       help="how much fresher data and more frequent retraining are worth")
    f.add_argument("--data", required=True, help="time-stamped CSV")
    f.add_argument("--target", required=True, help="the column to predict")
    f.add_argument("--time-column", required=True,
                   help="ISO 8601 times (2026-11-30T08:00:00Z) or POSIX seconds")
    f.add_argument("--windows", required=True, help="trailing windows, e.g. 30d,7d,1d")
    f.add_argument("--intervals", default="", help="retraining intervals, e.g. 1d,7d")
    f.add_argument("--model", default="hgb", help="model family (default hgb)")
    f.add_argument("--compare", default=None, help="a second family: model vs data iteration")
    f.add_argument("--eval", default=None, help="held-out recent period (default: the "
                   "shortest window)")
    f.add_argument("--train-window", default=None,
                   help="trailing data each interval retrains on (default: the longest window)")
    f.add_argument("--drop", action="append", default=[], help="a column to ignore")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--plot", default=None, help="write a PNG of the metric to this file")
    f.set_defaults(func=cmd_freshness)


def cmd_freshness(args: argparse.Namespace) -> int:
    """``freshness``: the table (or JSON), and the plot if asked."""
    result = study(args.data, args.target, args.time_column,
                   windows=_list(args.windows), intervals=_list(args.intervals),
                   model=args.model, compare=args.compare, eval_span=args.eval,
                   train_window=args.train_window, drop=args.drop, seed=args.seed)
    out: dict[str, Any] = result.to_json()
    if args.plot:
        out["plot"] = str(plot(result, args.plot))
    if args.json:
        import json

        print(json.dumps(out))
    else:
        print(result.table())
        if args.plot:
            print(f"plot: {out['plot']}")
    return 0


# ------------------------------------------------------------------------------ internals
def _list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _parse_time(text: str, row: int, column: str) -> float:
    raw = text.strip()
    try:
        return float(raw)
    except ValueError:
        pass
    try:
        return from_iso(raw)
    except ValueError:
        raise DataError(f"row {row}: {column} {raw[:40]!r} is not a time; write ISO 8601 "
                        "(2026-11-30T08:00:00Z) or POSIX seconds", field=column,
                        row=row) from None


def _load(path: Path, target: str, time_column: str,
          drop: Sequence[str]) -> tuple[np.ndarray, Dataset]:
    """Times (sorted) and the dataset in the same order. Rows without a target are left out
    here, so the rows ``load_csv`` keeps are exactly these, in this order."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = list(reader.fieldnames or [])
            records = list(reader)
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}", field="data") from exc
    for col in (time_column, target):
        if col not in header:
            raise DataError(f"{path} has no column {col!r}; columns: {', '.join(header)}",
                            field=col)
    kept = [(i, r) for i, r in enumerate(records) if (r.get(target) or "").strip()]
    stamped = sorted(((_parse_time(r[time_column] or "", i, time_column), i, r)
                      for i, r in kept), key=lambda t: (t[0], t[1]))
    if len(stamped) < MIN_TRAIN_ROWS + MIN_EVAL_ROWS:
        raise DataError(f"{path} has {len(stamped)} labelled rows; a freshness study needs "
                        f"at least {MIN_TRAIN_ROWS + MIN_EVAL_ROWS}", field="data")
    columns = [h for h in header if h != time_column]
    with tempfile.TemporaryDirectory(prefix="hybridml-fresh-") as tmp:
        ordered = Path(tmp) / path.name
        with open(ordered, "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
            w.writeheader()
            w.writerows(r for _, _, r in stamped)
        ds = load_csv(ordered, target, drop=drop)
    if len(ds) != len(stamped):  # pragma: no cover - load_csv drops only rows without a target
        raise DataError(f"{path}: {len(stamped) - len(ds)} rows were dropped while loading; "
                        "fill or remove them", field="data")
    return np.array([t for t, _, _ in stamped], dtype=np.float64), ds


def _fit_score(fam: str, ds: Dataset, train_idx: np.ndarray, eval_idx: np.ndarray, seed: int,
               params: dict[str, Any] | None) -> float:
    y_train = ds.y[train_idx]
    pipe = build_pipeline(fam, ds.task, ds.schema.n_numeric, ds.schema.n_categorical, seed,
                          params)
    if ds.task != "regression" and np.unique(y_train).size < 2:
        raise DataError("one class only", field="target")
    pipe.fit(combine(ds.num[train_idx], ds.cat[train_idx]), y_train)
    pred = pipe.predict(combine(ds.num[eval_idx], ds.cat[eval_idx]))
    return round(metrics.primary(ds.task, ds.y[eval_idx], pred), 6)


def _point(what: str, fam: str, span: str, seconds: float, ds: Dataset,
           train_idx: np.ndarray, eval_idx: np.ndarray, seed: int,
           params: dict[str, Any] | None) -> Point:
    def done(value: float | None, note: str = "") -> Point:
        return Point(what, fam, span, seconds, int(train_idx.size), int(eval_idx.size),
                     metrics.PRIMARY[ds.task], value, note)

    if train_idx.size < MIN_TRAIN_ROWS:
        return done(None, f"under {MIN_TRAIN_ROWS} rows to train on")
    try:
        return done(_fit_score(fam, ds, train_idx, eval_idx, seed, params))
    except DataError as exc:
        return done(None, exc.message)


def _walk(fam: str, span: str, step: float, times: np.ndarray, ds: Dataset, warm: float,
          seed: int, params: dict[str, Any] | None) -> Point:
    """Retrain every ``step`` after a warm-up of ``warm``; the rows-weighted mean score."""
    start, end = float(times[0]) + warm, float(times[-1])
    total = weight = 0.0
    trained = scored = rows = 0
    t = start
    began = time.perf_counter()
    while t < end:
        train_idx = np.flatnonzero((times > t - warm) & (times <= t))
        eval_idx = np.flatnonzero((times > t) & (times <= t + step))
        t += step
        if train_idx.size < MIN_TRAIN_ROWS or eval_idx.size == 0:
            continue
        try:
            value = _fit_score(fam, ds, train_idx, eval_idx, seed, params)
        except DataError:
            continue
        total += value * eval_idx.size
        weight += eval_idx.size
        trained += 1
        scored += int(eval_idx.size)
        rows += int(train_idx.size)
    log.info("retraining every %s: %d fits in %.1f s", span, trained,
             time.perf_counter() - began)
    metric = metrics.PRIMARY[ds.task]
    per_fit = rows // trained if trained else 0  # train rows: the mean per retraining
    if not weight:
        return Point("interval", fam, span, step, 0, 0, metric, None,
                     "no period had enough rows to retrain")
    return Point("interval", fam, span, step, per_fit, scored, metric,
                 round(total / weight, 6), f"{trained} retrainings")


__all__ = ["Freshness", "Point", "add_parser", "cmd_freshness", "plot", "study"]
