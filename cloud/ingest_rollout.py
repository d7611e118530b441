"""The records a rollout adds to telemetry, checked strictly (docs/rollouts.md §4).

* ``shadow``: what a device (or the cloud's ``/predict``, device ``cloud``) learnt by running
  the other model of a rollout beside the served one, per window.
* ``interleave``: the clicks of team-draft interleaved rankings, per window.
* ``health`` with ``event: load_failed``: a rollout's model failed to load on a device; its
  ``version`` and ``rollout`` must be numbers the analysis can count.

:func:`check_rollout_event` returns the normalised body (stored as an event of its kind) or
None for a kind it does not check; a record it refuses is an :class:`InputError` naming the
field (``body.agree``, ``body.latency_ms.counts``), and the caller refuses that record alone.
"""

from __future__ import annotations

from typing import Any

from hybridml.shared.errors import InputError
from hybridml.shared.text import printable

from .facts import Facts
from .fields import (
    FORMAT,
    check_format,
    count,
    histogram,
    model_facts,
    number,
    short,
    window,
)

ROLLOUT_KINDS = ("shadow", "interleave")
ROLES = ("shadow", "canary")
TASKS = ("binary", "multiclass", "regression")
MAX_ROLLOUT = 10**12


def check_rollout_event(kind: str, body: dict[str, Any], facts: Facts
                        ) -> dict[str, Any] | None:
    """The checked body of a ``shadow``, ``interleave`` or ``load_failed`` health record;
    None for any other record (kept as sent)."""
    if kind == "shadow":
        return check_shadow(body, facts)
    if kind == "interleave":
        return check_interleave(body, facts)
    if kind == "health" and body.get("event") == "load_failed":
        return check_load_failed(body, facts)
    return None


def check_shadow(body: dict[str, Any], facts: Facts) -> dict[str, Any]:
    """A shadow body (format 1): counters of the companion model run beside the served one."""
    p = "body."
    check_format(body, p)
    served = model_facts(body, facts, p, version_required=True, key="served")
    model_facts(body, facts, p, version_required=True, key="shadow")
    if body["served"] == body["shadow"]:
        raise InputError("'shadow' is the served version: a shadow record compares two "
                         "versions", field=p + "shadow")
    role = body.get("role")
    if role not in ROLES:
        raise InputError(f"role {short(role)} is not one of {', '.join(ROLES)}",
                         field=p + "role")
    task = body.get("task")
    if task != served.task:
        raise InputError(f"task {short(task)} is not {served.name!r} v{served.version}'s "
                         f"task {served.task!r}", field=p + "task")
    _, _, win = window(body, p)
    out: dict[str, Any] = {"format": FORMAT, "model": served.name,
                           "rollout": rollout_id(body.get("rollout"), p + "rollout"),
                           "role": role, "served": served.version, "shadow": body["shadow"],
                           "task": task, "window": win}
    for key in ("calls", "sampled", "skipped", "rows", "errors", "agree"):
        out[key] = count(body.get(key), p + key)
    if out["sampled"] > out["calls"]:
        raise InputError("more calls sampled than made: 'sampled' must be at most 'calls'",
                         field=p + "sampled")
    if out["agree"] > out["rows"]:
        raise InputError("more rows agree than were compared: 'agree' must be at most "
                         "'rows'", field=p + "agree")
    regression = task == "regression"
    wanted, unwanted = ("abs_diff", "prob_diff") if regression else ("prob_diff", "abs_diff")
    if body.get(unwanted) is not None:
        raise InputError(f"'{unwanted}' must be null for a {task} model; send '{wanted}'",
                         field=p + unwanted)
    out[unwanted] = None
    diff = body.get(wanted)
    out[wanted] = None if diff is None else histogram(diff, p + wanted)
    if diff is not None and regression:
        for key in ("sum", "max"):
            value = diff.get(key)
            if not number(value) or value < 0:
                raise InputError(f"'abs_diff.{key}' must be a number ≥ 0 (absolute "
                                 "differences)", field=f"{p}abs_diff.{key}")
            out[wanted][key] = float(value)
    latency = body.get("latency_ms")
    out["latency_ms"] = None if latency is None else histogram(latency, p + "latency_ms")
    return out


def check_interleave(body: dict[str, Any], facts: Facts) -> dict[str, Any]:
    """An interleave body (format 1): impressions, clicks and wins of teams A and B."""
    p = "body."
    check_format(body, p)
    a = model_facts(body, facts, p, version_required=True, key="a")
    model_facts(body, facts, p, version_required=True, key="b")
    _, _, win = window(body, p)
    out: dict[str, Any] = {"format": FORMAT, "model": a.name,
                           "rollout": rollout_id(body.get("rollout"), p + "rollout"),
                           "a": body["a"], "b": body["b"], "window": win}
    for key in ("impressions", "clicks", "credited_a", "credited_b", "wins_a", "wins_b",
                "ties", "late_clicks"):
        out[key] = count(body.get(key, 0) if key == "late_clicks" else body.get(key), p + key)
    if out["wins_a"] + out["wins_b"] + out["ties"] > out["impressions"]:
        raise InputError("wins_a + wins_b + ties exceed 'impressions': an impression has at "
                         "most one outcome", field=p + "impressions")
    if out["credited_a"] + out["credited_b"] > out["clicks"]:
        raise InputError("credited_a + credited_b exceed 'clicks': a click is credited to "
                         "one team at most", field=p + "clicks")
    return out


def check_load_failed(body: dict[str, Any], facts: Facts) -> dict[str, Any]:
    """A health body with ``event: load_failed``: the version of a rollout that failed to
    load on the device, and why."""
    p = "body."
    check_format(body, p)
    f = model_facts(body, facts, p, version_required=True)
    out: dict[str, Any] = {"format": FORMAT, "model": f.name, "event": "load_failed",
                           "version": f.version,
                           "rollout": rollout_id(body.get("rollout"), p + "rollout")}
    error = body.get("error")
    if not isinstance(error, dict) or not isinstance(error.get("code"), str):
        raise InputError("'error' must be {\"code\": text, \"message\": text}",
                         field=p + "error")
    message = error.get("message", "")
    if not isinstance(message, str):
        raise InputError("'error.message' must be text", field=p + "error.message")
    out["error"] = {"code": printable(error["code"], 64), "message": printable(message, 500)}
    return out


def rollout_id(value: Any, field: str) -> int:
    """A rollout id: a whole number ≥ 1."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < MAX_ROLLOUT:
        raise InputError(f"rollout {short(value)} is not a rollout id (a whole number ≥ 1)",
                         field=field)
    return value
