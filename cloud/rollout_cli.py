"""``hybridml-cloud rollout``: start, watch, promote and abort rollouts (docs/rollouts.md).

Thin, like the rest of the CLI: parse, call :mod:`hybridml.cloud.rollouts`, print::

    hybridml-cloud rollout start eta --candidate 5 --strategy canary --steps 1,5,20,50,100 \\
        --dwell 24h [--min-devices 2] [--report-timeout 6h] [--sample 0.1] [--force]
    hybridml-cloud rollout start eta --strategy ab --arms 4,5 --split 50,50 --metric accuracy
    hybridml-cloud rollout status eta [--json]     rollout, cohorts, analysis, recent events
    hybridml-cloud rollout list eta [--json]
    hybridml-cloud rollout promote eta [--force] [--reason TEXT] [--version V]
    hybridml-cloud rollout abort eta [--reason TEXT]
    hybridml-cloud rollout tick eta [--json]       analyse and act now, as the controller does

Only the settings given are sent; the rest take the defaults of docs/rollouts.md §1.
"""

from __future__ import annotations

import argparse
import getpass
import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from hybridml.shared.clock import format_duration, from_iso, parse_duration, utc_iso
from hybridml.shared.errors import ConfigError
from hybridml.shared.text import format_table

from .registry import Registry
from .rollout_config import KEYS
from .rollout_view import analysis_text
from .rollouts import Rollout, Rollouts

if TYPE_CHECKING:
    from .telemetry import TelemetryStore

EVENTS_SHOWN = 10
AT_HELP = ("look as of this time (ISO 8601 or POSIX seconds; default now): to replay a "
           "decision, or to drive a simulated fleet")
# flag -> (config key, parser); the parser gets the text and the key (for its error)
_SETTINGS: dict[str, tuple[str, Callable[[str, str], Any]]] = {}


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add ``rollout`` and its subcommands."""
    p = sub.add_parser("rollout", help="shadow, canary, A/B and interleaving rollouts")
    rsub = p.add_subparsers(dest="rollout_command", required=True)
    s = rsub.add_parser("start", parents=[common], help="start a rollout of a model")
    s.add_argument("name")
    s.add_argument("--strategy", required=True, choices=["shadow", "canary", "ab", "interleave"])
    s.add_argument("--candidate", help="the version to roll out (shadow, canary, interleave)")
    s.add_argument("--arms", help="A/B: versions, the control first, e.g. 4,5")
    for flag, key, parse, text in (
            ("--sample", "sample", _float, "share of calls also run on the other model"),
            ("--devices", "devices", _float, "percent of devices in the experiment"),
            ("--min-predictions", "min_predictions", _int, "shadow: compared rows needed"),
            ("--min-devices", "min_devices", _int, "reporting devices needed"),
            ("--steps", "steps", _floats, "canary: percents, e.g. 1,5,20,50,100"),
            ("--dwell", "dwell_s", _duration, "canary: time per step, e.g. 24h"),
            ("--report-timeout", "report_timeout_s", _duration,
             "canary: a cohort device silent this long counts against the step"),
            ("--split", "split", _floats, "A/B: percents per arm, e.g. 50,50"),
            ("--metric", "metric", _text, "A/B: the metric compared"),
            ("--alpha", "alpha", _float, "significance level (A/B, interleave)"),
            ("--min-samples", "min_samples", _int, "A/B: labels per arm; interleave: "
             "impressions with a winner"),
            ("--max-duration", "max_duration_s", _duration, "then inconclusive, e.g. 14d"),
            ("--agreement", "agreement", _float, "shadow, canary: share of rows that must "
             "agree, e.g. 0.9"),
            ("--latency-ratio", "latency_ratio", _float, "shadow, canary: the candidate's p99 "
             "may be this many times stable's"),
            ("--latency-floor", "latency_floor_ms", _float, "shadow, canary: p99 differences "
             "below this many ms are never a regression")):
        assert key in KEYS
        _SETTINGS[flag] = (key, parse)
        s.add_argument(flag, dest=key, default=None, help=text)
    s.add_argument("--force", action="store_true",
                   help="roll out a version the gate did not bless (recorded as forced)")
    s.add_argument("--reason", help="why (kept in the audit trail)")
    s.add_argument("--at", help=AT_HELP)
    s.set_defaults(func=cmd_start)

    st = rsub.add_parser("status", parents=[common],
                         help="the rollout, its cohorts, analysis and recent events")
    st.add_argument("name")
    st.add_argument("--id", type=int, help="an earlier rollout of NAME (default: the running "
                    "one, else the newest; see 'rollout list')")
    st.add_argument("--at", help=AT_HELP)
    st.set_defaults(func=cmd_status)
    ls = rsub.add_parser("list", parents=[common], help="every rollout of a model")
    ls.add_argument("name")
    ls.set_defaults(func=cmd_list)
    pr = rsub.add_parser("promote", parents=[common], help="make the candidate stable")
    pr.add_argument("name")
    pr.add_argument("--force", action="store_true",
                    help="promote although the analysis did not say so")
    pr.add_argument("--version", help="A/B: the winning arm's version")
    pr.add_argument("--reason", help="why (kept in the audit trail)")
    pr.set_defaults(func=cmd_promote)
    ab = rsub.add_parser("abort", parents=[common], help="send every device back to stable")
    ab.add_argument("name")
    ab.add_argument("--reason", help="why (kept in the audit trail)")
    ab.set_defaults(func=cmd_abort)
    tk = rsub.add_parser("tick", parents=[common], help="analyse the rollout and act now")
    tk.add_argument("name")
    tk.add_argument("--at", help=AT_HELP)
    tk.set_defaults(func=cmd_tick)


def cmd_start(args: argparse.Namespace) -> int:
    """``rollout start``: the given settings over the defaults."""
    config = {key: parse(getattr(args, key), key) for key, parse in _SETTINGS.values()
              if getattr(args, key) is not None}
    arms = None if args.arms is None else [a.strip() for a in args.arms.split(",") if a.strip()]
    r = _rollouts(args).start(args.name, args.strategy, candidate=args.candidate, arms=arms,
                              config=config, force=args.force, actor=actor(),
                              reason=args.reason)
    _emit(args, {"rollout": r.to_json()}, f"started {describe(r)}\n{config_table(r)}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """``rollout status``: what the admin API's ``GET .../rollout`` answers."""
    from .rollout_api import status_of

    rollouts = _rollouts(args)
    status = status_of(rollouts, _telemetry(rollouts.registry), args.name, _at(args),
                       events=EVENTS_SHOWN, rollout_id=args.id)
    r = rollouts.get(status["rollout"]["id"])
    cohorts = status["cohorts"]
    lines = [describe(r), config_table(r), "",
             "cohorts (units assigned per arm):",
             format_table(["arm", "units"], [[a, n] for a, n in cohorts.items()], align="lr",
                          indent="  ") if cohorts else "  no unit has fetched a manifest yet",
             "", analysis_text(status["analysis"], r.state, r.decision), "", "recent events:",
             events_table(status["events"])]
    _emit(args, status, "\n".join(lines))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    """``rollout list``: newest first."""
    rollouts = _rollouts(args)
    found = rollouts.list(args.name)
    if not found:
        rollouts.registry.resolve(args.name, "latest")  # NotFoundError for an unknown model
    rows = [[r.id, r.strategy, r.state, _versions(r), utc_iso(r.started),
             utc_iso(r.ended) if r.ended else "-", "yes" if r.forced else "-"] for r in found]
    text = (format_table(["id", "strategy", "state", "versions", "started", "ended", "forced"],
                         rows) if rows else f"{args.name} has no rollouts yet")
    _emit(args, {"rollouts": [r.to_json() for r in found]}, text)
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    """``rollout promote``: stable moves to the candidate (audited)."""
    r = _rollouts(args).promote(args.name, actor=actor(), reason=args.reason, force=args.force,
                                version=args.version)
    _emit(args, {"rollout": r.to_json()}, f"{describe(r)}\n{args.name}: stable -> "
          f"v{_registry(args).resolve(args.name, 'stable')}")
    return 0


def cmd_abort(args: argparse.Namespace) -> int:
    """``rollout abort``: every device goes back to stable at its next sync."""
    r = _rollouts(args).abort(args.name, actor=actor(), reason=args.reason)
    _emit(args, {"rollout": r.to_json()}, describe(r))
    return 0


def cmd_tick(args: argparse.Namespace) -> int:
    """``rollout tick``: one look of the controller at the running rollout."""
    try:
        from .rollout_analysis import tick
    except ImportError:
        raise ConfigError("this installation has no rollout analysis "
                          "(hybridml.cloud.rollout_analysis); 'rollout tick' needs it",
                          field="rollout") from None
    rollouts = _rollouts(args)
    before = rollouts.active(args.name)
    result = tick(rollouts, _telemetry(rollouts.registry), args.name, _at(args),
                  actor=actor())
    if result is None or before is None:
        rollouts.registry.resolve(args.name, "latest")  # NotFoundError for an unknown model
        _emit(args, {"analysis": None, "rollout": None},
              f"{args.name} has no running rollout: nothing to do")
        return 0
    after = rollouts.get(before.id)
    analysis = result.to_json()
    _emit(args, {"analysis": analysis, "rollout": after.to_json()},
          f"{describe(after)}\n{analysis_text(analysis, after.state, None)}")
    return 0


# ---------------------------------------------------------------------------- text views
def actor() -> str:
    """``cli:<user>``: who runs this command, for the audit trail."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no user name in this environment (a bare container)
        return "cli"


def describe(r: Rollout) -> str:
    """One line: ``rollout 7 of eta: canary of v5 (stable v4), running, step 2 (20%)``."""
    what = (f"A/B of {', '.join(f'v{v}' for v in r.arms)} (control v{r.arms[0]})"
            if r.strategy == "ab" else f"{r.strategy} of v{r.candidate} (stable v{r.stable})")
    step = (f", step {(r.step or 0) + 1} of {len(r.config.steps or ())} ({r.percent:g}%)"
            if r.strategy == "canary" else "")
    return (f"rollout {r.id} of {r.name}: {what}, {r.state}{step}"
            f"{', forced' if r.forced else ''}; started {utc_iso(r.started)}"
            + (f", ended {utc_iso(r.ended)}" if r.ended else ""))


def config_table(r: Rollout) -> str:
    """The rollout's settings, durations as ``6h``/``14d``."""
    rows = [[k, _setting(k, v)] for k, v in r.config.to_json().items()]
    return format_table(["setting", "value"], rows, indent="  ")


def events_table(events: list[dict[str, Any]]) -> str:
    """The audit trail as a table."""
    rows = [[utc_iso(e["time"]), e["actor"], e["action"],
             f"{e['from_state'] or '-'} -> {e['to_state'] or '-'}",
             "-" if e["step"] is None else e["step"], _short(e["reason"], 60)] for e in events]
    return format_table(["time", "actor", "action", "state", "step", "reason"], rows,
                        indent="  ") if rows else "  none"


# -------------------------------------------------------------------------------- parsing
def _float(text: str, key: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"--{_flag(key)} {text[:40]!r} is not a number",
                          field=f"config.{key}") from None


def _int(text: str, key: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"--{_flag(key)} {text[:40]!r} is not a whole number",
                          field=f"config.{key}") from None


def _floats(text: str, key: str) -> list[float]:
    return [_float(part.strip(), key) for part in text.split(",") if part.strip()]


def _duration(text: str, key: str) -> float:
    return parse_duration(text, f"config.{key}")


def _text(text: str, key: str) -> str:
    return text


def _flag(key: str) -> str:
    return next((f[2:] for f, (k, _) in _SETTINGS.items() if k == key), key)


def _setting(key: str, value: Any) -> str:
    if key.endswith("_s") and isinstance(value, (int, float)):
        return format_duration(value)
    if isinstance(value, list):
        return ",".join(f"{v:g}" for v in value)
    return str(value).lower() if isinstance(value, bool) else str(value)


def _short(value: Any, limit: int = 40) -> str:
    text = "-" if value is None else value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _versions(r: Rollout) -> str:
    return ",".join(f"v{v}" for v in r.arms) if r.strategy == "ab" else \
        f"v{r.stable}->v{r.candidate}"


def _registry(args: argparse.Namespace) -> Registry:
    return Registry.from_env(args.registry)


def _telemetry(registry: Registry) -> TelemetryStore:
    """The registry's telemetry store, opened as :func:`hybridml.cloud.evidence.open_telemetry`
    does (typed as the store itself: the analysis asks it for more than the loop does)."""
    from .telemetry import TelemetryStore

    return TelemetryStore(registry)


def _at(args: argparse.Namespace) -> float:
    """``--at`` as POSIX seconds (default: now)."""
    at = getattr(args, "at", None)
    if at is None:
        return time.time()
    try:
        return float(at)
    except ValueError:
        pass
    try:
        return from_iso(at)
    except ValueError:
        raise ConfigError(f"--at {at[:40]!r} is not a time: give ISO 8601 "
                          "(2026-12-01T16:00:00Z) or POSIX seconds", field="at") from None


def _rollouts(args: argparse.Namespace) -> Rollouts:
    """The registry's rollouts; with ``--at``, what they record happens at that time."""
    if getattr(args, "at", None) is None:
        return Rollouts(_registry(args))
    at = _at(args)
    return Rollouts(_registry(args), clock=lambda: at)


def _emit(args: argparse.Namespace, payload: Any, text: str) -> None:
    print(json.dumps(payload, indent=2, sort_keys=True) if args.json else text)


__all__ = ["actor", "add_parser", "config_table", "describe", "events_table"]
