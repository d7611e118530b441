"""The text view of a rollout's analysis (``rollout status`` and ``rollout tick``).

The JSON (``--json``, the admin API) carries everything; this view is for a person: the
decision and why, one row per arm with what it reported, every check with its full detail,
and the statistical readout in words — effect, confidence interval, p-values.
"""

from __future__ import annotations

import json
from typing import Any

from hybridml.shared.text import format_table

# Per-arm numbers worth a column, in this order, with their headers.
ARM_COLUMNS = (("version", "version"), ("units", "units"), ("devices", "devices"),
               ("rows", "rows"), ("labels", "labels"), ("estimate", "correct"),
               ("mean_sq_error", "mse"), ("error_rate", "errors"), ("p99_ms", "p99 ms"),
               ("agreement", "agreement"), ("wins", "wins"), ("credited", "clicks"),
               ("ever_served", "ever served"))


def analysis_text(analysis: dict[str, Any] | None, state: str,
                  last: dict[str, Any] | None) -> str:
    """The decision, its reasons, the arms, the checks and the tests; with no fresh
    ``analysis``, the ``last`` recorded one, or why there is none."""
    head = "decision"
    if analysis is None:
        if last is None:
            return (f"no analysis: the rollout is {state}" if state != "running" else
                    "no analysis yet (run 'hybridml-cloud rollout tick' or the controller)")
        analysis, head = last, f"last decision ({last.get('time', '?')})"
    lines = [f"{head}: {analysis.get('action', '?')}"]
    lines += [f"  - {reason}" for reason in analysis.get("reasons") or ()]
    arms = analysis.get("arms") if isinstance(analysis.get("arms"), dict) else None
    if arms:
        lines += ["arms:", arms_table(arms)]
    checks = [c for c in analysis.get("checks") or () if isinstance(c, dict)]
    if checks:
        lines.append("checks:")
        lines += [f"  {_verdict(c.get('passed')):<7} {c.get('name', '?')}: "
                  f"{_num(c.get('value'))} (bound {_num(c.get('bound'))}) - {c.get('detail')}"
                  for c in checks]
    tests = analysis.get("tests") if isinstance(analysis.get("tests"), dict) else None
    if tests:
        lines += ["tests:", *(f"  {line}" for line in tests_lines(tests))]
    return "\n".join(lines)


def arms_table(arms: dict[str, Any]) -> str:
    """One row per arm that has a version; a column for each number any arm reported."""
    rows = {name: a for name, a in arms.items() if isinstance(a, dict) and "version" in a}
    cols = [(key, header) for key, header in ARM_COLUMNS
            if any(a.get(key) is not None for a in rows.values())
            and not all(a.get(key) in (0, 0.0) for a in rows.values())]
    body = [[name, *(_cell(key, a.get(key)) for key, _ in cols)] for name, a in rows.items()]
    return format_table(["arm", *(h for _, h in cols)], body,
                        align="l" + "r" * len(cols), indent="  ")


def tests_lines(tests: dict[str, Any]) -> list[str]:
    """The statistical results in words."""
    out = []
    for name, t in tests.items():
        if not isinstance(t, dict):
            continue
        if "fixed" in t:  # an A/B arm against the control
            f, s = t.get("fixed") or {}, t.get("msprt") or {}
            out.append(f"{name} vs A: {_effect(f)}; always-valid p (mSPRT) "
                       f"{_num(t.get('msprt_running_min', s.get('p_value')))}"
                       + (f", after Holm {_num(t['p_corrected'])}"
                          if t.get("p_corrected") is not None else ""))
        elif "mismatch" in t:
            out.append(f"{name.replace('_', ' ')}: observed {t.get('observed')} against "
                       f"{[round(e, 1) for e in t.get('expected') or ()]}, p "
                       f"{_num(t.get('p_value'))}"
                       + (" - SAMPLE RATIO MISMATCH" if t.get("mismatch") else ""))
        elif t.get("test") == "sign_test":
            out.append(f"sign test on decided impressions: B's share of wins - 0.5 = "
                       f"{_num(t.get('effect'))} (95 % CI {_num(t.get('ci_low'))} to "
                       f"{_num(t.get('ci_high'))}), p {_num(t.get('p_value'))}")
        elif "p_value" in t:
            out.append(f"{name.replace('_', ' ')}: {_effect(t)}")
    return out


def _effect(t: dict[str, Any]) -> str:
    return (f"{t.get('test', 'test')} effect {_num(t.get('effect'))} (95 % CI "
            f"{_num(t.get('ci_low'))} to {_num(t.get('ci_high'))}), p {_num(t.get('p_value'))}"
            + (" significant" if t.get("significant") else ""))


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key == "version":
        return f"v{value}"
    if key in ("estimate", "agreement", "error_rate") and isinstance(value, float):
        return f"{100 * value:.2f} %"
    return _num(value)


def _num(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e-3 and value else f"{value:.4g}"
    return value if isinstance(value, str) else json.dumps(value)


def _verdict(passed: Any) -> str:
    return "pass" if passed is True else "FAIL" if passed is False else "no data"


__all__ = ["analysis_text", "arms_table", "tests_lines"]
