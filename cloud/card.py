"""The model card: one page that says what a version is, how good it is and where it went.

``hybridml-cloud card eta --version 3 [--html FILE]`` (docs/quality.md §6). :func:`build`
gathers a version's card: its manifest and cloud-only metadata, the numbers computed now on
its stored holdout (:func:`hybridml.cloud.card_stats.holdout_stats`: metrics with bootstrap
95% intervals and permutation importance of the shipped model), its lineage and the rollouts
it took part in. :func:`assemble` is the pure part (a card from those pieces), so a card can
be drawn from any manifest; :func:`text` renders it for a terminal and
:func:`hybridml.cloud.card_html.render` as one self-contained HTML page.

Sections whose manifest key a version lacks (``decision``, ``calibration``, ``fairness``,
``gate``, a confusion matrix: older versions, or tasks without them) are kept, as None, and
rendered as "not recorded for this version".
"""

from __future__ import annotations

import logging
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

from hybridml.shared.clock import utc_iso
from hybridml.shared.errors import HybridMLError
from hybridml.shared.text import format_table

from .card_stats import LOWER_IS_BETTER, RESAMPLES, holdout_stats
from .labelled import holdout
from .lineage import display_labels, gate_summary
from .metrics import positive_of
from .registry import Ref, Registry
from .rollouts import Rollouts

log = logging.getLogger("hybridml.cloud.card")

CARD_FORMAT = 1
TOP_FEATURES = 10
NOT_RECORDED = "not recorded for this version"


def build(registry: Registry, name: str, ref: Ref = "stable", *, seed: int = 0,
          resamples: int = RESAMPLES) -> dict[str, Any]:
    """The card of version ``ref`` of ``name`` (NotFoundError when there is none)."""
    version = registry.resolve(name, ref)
    manifest, metadata = registry.manifest(name, version), registry.metadata(name, version)
    versions = registry.versions(name)
    info = next(v for v in versions if v.version == version)
    stats, note = None, None
    held = holdout(registry, name, version)
    if held is None or not len(held):
        note = "the holdout of this version is unavailable"
    else:
        try:
            stats = holdout_stats(registry.model_path(manifest), manifest, held,
                                  seed=seed, resamples=resamples)
        except HybridMLError as exc:  # e.g. every row refused: the card still shows the rest
            note = exc.message
            log.warning("card of %s v%d: no holdout numbers: %s", name, version, note)
    return assemble(manifest, metadata, stats, rollouts_of(registry, name, version),
                    label=display_labels(versions)[version], aliases=info.aliases,
                    stats_note=note)


def rollouts_of(registry: Registry, name: str, version: int) -> list[dict[str, Any]]:
    """The rollouts ``version`` took part in, oldest first: its role (candidate, arm or
    stable), strategy, state, start and end, and the outcome (the last audited action)."""
    ro = Rollouts(registry)
    found = []
    for r in reversed(ro.list(name)):
        if r.candidate == version:
            role = "candidate"
        elif r.strategy == "ab" and version in r.arms:
            role = f"arm {r.arms.index(version)}"
        elif r.stable == version:
            role = "stable"
        else:
            continue
        last = ro.events(r.id)[-1:] or [{}]
        evidence = last[0].get("evidence") or {}
        found.append({"id": r.id, "strategy": r.strategy, "role": role, "state": r.state,
                      "stable": r.stable, "candidate": r.candidate, "arms": list(r.arms),
                      "started": utc_iso(r.started),
                      "ended": None if r.ended is None else utc_iso(r.ended),
                      "forced": r.forced, "outcome": _outcome(r.state, last[0], evidence)})
    return found


def assemble(manifest: Mapping[str, Any], metadata: Mapping[str, Any],
             stats: Mapping[str, Any] | None, rollouts: Sequence[Mapping[str, Any]], *,
             label: str | None = None, aliases: Sequence[str] = (),
             stats_note: str | None = None) -> dict[str, Any]:
    """The card (a JSON-ready dict) of one version from its pieces; absent sections are None."""
    training = manifest.get("training") or {}
    recorded = (manifest.get("metrics") or {}).get("edge_test") or {}
    mode = training.get("mode") or {}
    tuned = training.get("finetune")
    model = manifest.get("model") or {}
    importance = dict(stats["importance"]) if stats else None
    if importance is not None:
        importance["features"] = list(importance["features"])[:TOP_FEATURES]
    return {
        "format": CARD_FORMAT, "name": manifest["name"], "version": manifest["version"],
        "label": label or f"v{manifest['version']}", "aliases": list(aliases),
        "created": manifest.get("created"), "task": manifest["output"]["task"],
        "classes": manifest["output"].get("classes"),
        "data": {"source": training.get("source"), "target": training.get("target"),
                 "sha256": training.get("data_sha256"), "rows": training.get("rows"),
                 "dropped_rows": training.get("dropped_rows"), "split": training.get("split"),
                 "imbalance": training.get("imbalance")},
        "model": {"family": metadata.get("family") or model.get("family"),
                  "variant": model.get("variant"), "params": metadata.get("params") or {}},
        "quantization": _quantization(manifest.get("compression")
                                      or manifest.get("quantization")),
        "artifacts": [{"role": a["role"], "variant": a.get("variant"), "size": a["size"],
                       "sha256": a["sha256"]} for a in manifest.get("artifacts", [])],
        "metrics": {"primary": (manifest.get("metrics") or {}).get("primary"),
                    "positive": positive_of(manifest),
                    "recorded": {k: v for k, v in recorded.items()
                                 if isinstance(v, (int, float))},
                    "holdout": None if stats is None else
                    {k: stats[k] for k in ("rows", "refused", "seed", "resamples",
                                           "confidence", "primary", "metrics")},
                    "note": stats_note},
        "confusion": recorded.get("confusion"),
        "decision": manifest.get("decision"),
        "calibration": manifest.get("calibration"),
        "features": importance,
        "fairness": manifest.get("fairness"),
        "lineage": {"parent": manifest.get("parent"), "lineage": manifest.get("lineage"),
                    "mode": mode.get("mode"), "reason": mode.get("reason"),
                    "finetune": tuned.get("method") if isinstance(tuned, Mapping) else None},
        "gate": manifest.get("gate"), "gate_summary": gate_summary(manifest.get("gate")),
        "rollouts": [dict(r) for r in rollouts],
    }


def text(card: Mapping[str, Any]) -> str:
    """The card as a compact page of text for a terminal."""
    d, m = card["data"], card["model"]
    split = d.get("split") or {}
    aliases = f" ({', '.join(card['aliases'])})" if card["aliases"] else ""
    out = [f"{card['name']} {card['label']} = version {card['version']}{aliases}: "
           f"{card['task']}, {m['family']} ({m['variant']}), created {card['created']}",
           "",
           f"data         {d['source']} -> {d['target']}; {d['rows']} rows ({d['dropped_rows']} "
           f"dropped); train {split.get('train')} / validation {split.get('validation')} / "
           f"test {split.get('test')} (seed {split.get('seed')})",
           f"{'':12} sha256 {d['sha256']}",
           *_imbalance_lines(d.get("imbalance")),
           *_section("model", textwrap.wrap(_params(m["params"]), 90)),
           f"shipped      {card['quantization']}",
           "artifacts    " + "; ".join(f"{a['role']} ({a['variant'] or '-'}) {a['size']:,} B"
                                       for a in card["artifacts"]),
           "", *_metrics_lines(card), "",
           *_section("decision", _decision_lines(card["decision"])),
           *_section("calibration", _calibration_lines(card["calibration"])),
           *_section("confusion", _confusion_lines(card["confusion"])),
           *_section("top features", _feature_lines(card["features"])),
           *_section("fairness", _fairness_lines(card["fairness"])),
           *_section("lineage", [_lineage_line(card["lineage"])]),
           *_section("gate", [card["gate_summary"]] if card["gate"] else []),
           *_section("rollouts", _rollout_lines(card["rollouts"]), none="none")]
    return "\n".join(out).rstrip() + "\n"


# -------------------------------------------------------------------------------- internals
def _outcome(state: str, event: Mapping[str, Any], evidence: Mapping[str, Any]) -> str:
    if state == "running":
        return "running"
    winner = f" v{evidence['winner']}" if evidence.get("winner") else ""
    reason = f": {event['reason']}" if event.get("reason") else ""
    return f"{state}{winner}{reason}"


def _quantization(q: Any) -> str | None:
    if not isinstance(q, Mapping):
        return None
    chosen: Mapping[str, Any] = next(
        (c for c in q.get("candidates", []) if c.get("status") == "chosen"), {})
    why = f": {chosen['reason']}" if chosen.get("reason") else ""
    return f"{q.get('chosen')}{why}"


def _params(params: Mapping[str, Any]) -> str:
    shown = [f"{k}={v}" for k, v in sorted(params.items()) if v is not None]
    return ", ".join(shown) or "defaults"


def _section(title: str, lines: list[str], none: str = NOT_RECORDED) -> list[str]:
    body = lines or [none]
    return [f"{title:<12} {body[0]}", *(f"{'':12} {line}" for line in body[1:])]


def _num(v: Any) -> str:
    return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


def metric_rows(card: Mapping[str, Any]) -> list[list[Any]]:
    """``[metric, on holdout, 95% low, 95% high, recorded at training]`` rows (text and HTML
    use the same ones); the primary metric first."""
    mt = card["metrics"]
    held = (mt["holdout"] or {}).get("metrics", {})
    recorded = mt["recorded"]
    names = list(dict.fromkeys([*(k for k in (mt["primary"],) if k), *held, *recorded]))
    rows = []
    for k in names:
        h = held.get(k) or {}
        rows.append([k + (" (lower is better)" if k in LOWER_IS_BETTER else ""),
                     h.get("value"), h.get("low"), h.get("high"), recorded.get(k)])
    return rows


def _metrics_lines(card: Mapping[str, Any]) -> list[str]:
    mt = card["metrics"]
    h = mt["holdout"]
    head = (f"metrics on the holdout ({h['rows']} rows"
            + (f", {h['refused']} refused" if h["refused"] else "")
            + f"; {h['resamples']} bootstrap resamples, seed {h['seed']}) and at training:"
            if h else f"metrics at training (holdout: {mt['note'] or NOT_RECORDED}):")
    if mt.get("positive") is not None:
        head += f" (F1, PR-AUC: of the positive class {mt['positive']})"
    table = format_table(["metric", "holdout", "95% low", "95% high", "training test"],
                         [[_num(v) for v in r] for r in metric_rows(card)], align="lrrrr",
                         indent="  ")
    return [head, table]


def _imbalance_lines(imb: Mapping[str, Any] | None) -> list[str]:
    if not imb:
        return []
    counts = ", ".join(f"{k} {v:,}" for k, v in (imb.get("counts") or {}).items())
    share = imb.get("minority_share")
    how = imb.get("how")
    weighted = f"class weight {imb.get('class_weight')}" + (
        f" ({how})" if how not in (None, "none", imb.get("class_weight")) else "")
    return [f"{'':12} training classes {counts}; smallest share "
            f"{'-' if share is None else f'{share:.1%}'}"
            f"{' (imbalanced)' if imb.get('imbalanced') else ''}; {weighted}"]


def _decision_lines(dec: Mapping[str, Any] | None) -> list[str]:
    if not dec:
        return []
    tuned = f", tuned for {dec['tuned_for']}" if dec.get("tuned_for") else ""
    return [f"label {dec.get('positive')!s} when P({dec.get('positive')!s}) >= "
            f"{dec.get('threshold')} ({dec.get('source')}{tuned})"]


def _calibration_lines(cal: Mapping[str, Any] | None) -> list[str]:
    if not cal:
        return []
    before = (f" (uncalibrated {_num(cal['brier_uncalibrated'])})"
              if cal.get("brier_uncalibrated") is not None else "")
    curve = cal.get("curve") or {}
    pts = [f"{p:.2f}->{f:.2f}" for p, f in zip(curve.get("mean_predicted", []),
                                               curve.get("fraction_positive", []))
           if p is not None and f is not None]
    lines = [f"{cal.get('method')}; Brier {_num(cal.get('brier'))}{before}"]
    if pts:
        lines += textwrap.wrap("reliability (predicted->observed): " + " ".join(pts), 90)
    return lines


def _confusion_lines(conf: Mapping[str, Any] | None) -> list[str]:
    if not conf or not conf.get("matrix"):
        return []
    labels = [str(x) for x in conf.get("labels", [])]
    rows = [[f"true {lab}", *map(str, row)] for lab, row in zip(labels, conf["matrix"])]
    return format_table(["", *(f"pred {x}" for x in labels)], rows,
                        align="l" + "r" * len(labels)).splitlines()


def _feature_lines(feats: Mapping[str, Any] | None) -> list[str]:
    if not feats or not feats.get("features"):
        return []
    head = (f"{feats['method']}: how much worse {feats['metric']} gets when the column is "
            f"shuffled ({feats['repeats']} times)")
    return [head, *(f"{f['name']:<24} {f['importance']:+.4f} ± {f['std']:.4f}"
                    for f in feats["features"])]


def fairness_rows(fair: Mapping[str, Any]) -> list[list[Any]]:
    """``[column, group, n, selection rate, TPR, FPR, <other metrics>]`` rows and the gaps."""
    rows: list[list[Any]] = []
    for col, block in (fair.get("by_column") or {}).items():
        for group, g in (block.get("groups") or {}).items():
            extra = {k: v for k, v in g.items() if k not in ("n", "selection_rate", "tpr",
                                                              "fpr")}
            rows.append([col, group, g.get("n"), g.get("selection_rate"), g.get("tpr"),
                         g.get("fpr"), ", ".join(f"{k} {_num(v)}" for k, v in extra.items())])
    return rows


def fairness_gaps(fair: Mapping[str, Any]) -> list[str]:
    """One line per column: its demographic parity and equalized odds differences."""
    gap = fair.get("max_parity_gap")
    verdict = "" if gap is None else \
        f" (max allowed {gap}: {'passed' if fair.get('passed') else 'FAILED'})"
    return [f"{col}: demographic parity difference "
            f"{_num(b.get('demographic_parity_difference'))}, equalized odds difference "
            f"{_num(b.get('equalized_odds_difference'))}{verdict}"
            for col, b in (fair.get("by_column") or {}).items()]


def _fairness_lines(fair: Mapping[str, Any] | None) -> list[str]:
    if not fair:
        return []
    excluded = fair.get("excluded") or []
    head = (f"columns {', '.join(map(str, fair.get('columns') or []))}"
            + (f"; positive class {fair['positive']}" if fair.get("positive") else "")
            + (f"; not model inputs: {', '.join(map(str, excluded))}" if excluded else ""))
    table = format_table(["column", "group", "n", "selection", "TPR", "FPR", "metric"],
                         [[_num(v) for v in r] for r in fairness_rows(fair)],
                         align="llrrrrl")
    return [head, *table.splitlines(), *fairness_gaps(fair)]


def _lineage_line(lin: Mapping[str, Any]) -> str:
    how = f" ({lin['finetune']})" if lin.get("finetune") else ""
    parent = f" from v{lin['parent']}" if lin.get("parent") else ""
    reason = f"; {lin['reason']}" if lin.get("reason") else ""
    return f"{lin.get('lineage')}{how}{parent}{reason}"


def _rollout_lines(rollouts: Sequence[Mapping[str, Any]]) -> list[str]:
    return [f"#{r['id']} {r['strategy']} as {r['role']}: {r['started']} .. "
            f"{r['ended'] or 'now'}: {r['outcome']}" + (" (forced)" if r["forced"] else "")
            for r in rollouts]


__all__ = ["CARD_FORMAT", "NOT_RECORDED", "TOP_FEATURES", "assemble", "build",
           "fairness_gaps", "fairness_rows", "metric_rows", "rollouts_of", "text"]
