"""``hybridml-cloud policy``, ``triggers`` and ``controller``: the continuous-training commands.

Thin, like the rest of the CLI: parse, call :mod:`hybridml.cloud.policy` and
:mod:`hybridml.cloud.controller`, print.

::

    hybridml-cloud policy set eta --every 7d --min-metric 0.90 --min-labels 200 \\
        --new-data 5% --drift 0.2 --mode auto --cooldown 6h [--auto-promote]
    hybridml-cloud policy show eta [--json]
    hybridml-cloud triggers eta [--json] [--limit 20]
    hybridml-cloud controller --interval 60 [--once] [--json]

``policy set`` changes only the settings it is given (``off`` switches a trigger off), so a
policy can be adjusted one flag at a time.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from hybridml.shared.clock import format_duration
from hybridml.shared.errors import ConfigError, NotFoundError
from hybridml.shared.text import format_table

from .policy import (
    MODES,
    Policy,
    parse_duration_or_off,
    parse_new_data,
    parse_share,
)
from .registry import Registry

DECISIONS_SHOWN = 20


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add ``policy``, ``triggers`` and ``controller`` to the subcommands."""
    p = sub.add_parser("policy", help="the continuous-training policy of a model")
    psub = p.add_subparsers(dest="policy_command", required=True)
    ps = psub.add_parser("set", parents=[common],
                         help="set policy values (others keep theirs; 'off' disables)")
    ps.add_argument("name")
    ps.add_argument("--every", help="time trigger: train every 90m, 6h, 7d ... (or off)")
    ps.add_argument("--min-metric", help="performance trigger: the bound of the realised "
                    "primary metric (an upper bound for rmse), or off")
    ps.add_argument("--min-labels", type=int, help="labels the performance trigger needs "
                    "(default 200)")
    ps.add_argument("--new-data", help="data trigger: new labelled rows as a share of the "
                    "training rows (5%%) or a count (500), or off")
    ps.add_argument("--drift", help="drift trigger: share of reporting devices (by traffic) in "
                    "dataset drift for 2 windows, e.g. 0.2 or 20%%, or off")
    ps.add_argument("--drift-window", help="length of a drift window (default 1h)")
    ps.add_argument("--mode", choices=MODES, help="how to train a candidate (default auto)")
    ps.add_argument("--cooldown", help="no new candidate for this long after one (default 6h)")
    ps.add_argument("--window", help="labelled rows newer than this all go into a retrain; "
                    "older ones join the reservoir (default: off, all are kept)")
    ps.add_argument("--reservoir", type=int, help="rows kept of the older data in a retrain "
                    "(default 100000)")
    ps.add_argument("--auto-promote", action=argparse.BooleanOptionalAction, default=None,
                    help="make a blessed candidate stable at once (default: no); with "
                    "--rollout shadow, promote it when the shadow is ready")
    ps.add_argument("--rollout", help="ship a blessed candidate by a rollout instead: "
                    "canary, shadow or interleave (default settings; or off)")
    ps.set_defaults(func=cmd_policy_set)
    pw = psub.add_parser("show", parents=[common], help="show a model's policy")
    pw.add_argument("name")
    pw.set_defaults(func=cmd_policy_show)

    t = sub.add_parser("triggers", parents=[common],
                       help="a model's policy and its recorded decisions, newest first")
    t.add_argument("name")
    t.add_argument("--limit", type=int, default=DECISIONS_SHOWN,
                   help=f"decisions shown (default {DECISIONS_SHOWN}; 0: all)")
    t.set_defaults(func=cmd_triggers)

    c = sub.add_parser("controller", parents=[common],
                       help="evaluate triggers, train, gate and register candidates")
    c.add_argument("--interval", type=float, default=60.0,
                   help="seconds between passes (default 60)")
    c.add_argument("--once", action="store_true", help="one pass, then exit")
    c.set_defaults(func=cmd_controller)


def cmd_policy_set(args: argparse.Namespace) -> int:
    """``policy set``: merge the given values into the model's policy."""
    reg = Registry.from_env(args.registry)
    current = Policy.from_json(reg.policies().get(args.name, {}))
    changes: dict[str, Any] = {}
    if args.every is not None:
        changes["every_s"] = parse_duration_or_off(args.every, "every")
    if args.min_metric is not None:
        changes["min_metric"] = None if args.min_metric.strip().lower() == "off" \
            else _float(args.min_metric, "min_metric")
    if args.min_labels is not None:
        changes["min_labels"] = args.min_labels
    if args.new_data is not None:
        changes["new_data_fraction"], changes["new_data_rows"] = parse_new_data(args.new_data)
    if args.drift is not None:
        changes["drift_devices"] = parse_share(args.drift, "drift")
    if args.drift_window is not None:
        changes["drift_window_s"] = parse_duration_or_off(args.drift_window, "drift_window")
    if args.mode is not None:
        changes["mode"] = args.mode
    if args.cooldown is not None:
        changes["cooldown_s"] = parse_duration_or_off(args.cooldown, "cooldown") or 0.0
    if args.window is not None:
        changes["window_s"] = parse_duration_or_off(args.window, "window")
    if args.reservoir is not None:
        changes["reservoir_rows"] = args.reservoir
    if args.auto_promote is not None:
        changes["auto_promote"] = args.auto_promote
    if args.rollout is not None:
        changes["rollout"] = None if args.rollout == "off" else args.rollout
    policy = current.updated(**changes)
    reg.set_policy(args.name, policy.to_json())
    _emit(args, {"name": args.name, "policy": policy.to_json()},
          f"policy of {args.name}:\n{policy_table(policy)}")
    return 0


def cmd_policy_show(args: argparse.Namespace) -> int:
    """``policy show``: the stored policy."""
    policy = _policy(Registry.from_env(args.registry), args.name)
    _emit(args, {"name": args.name, "policy": policy.to_json()},
          f"policy of {args.name}:\n{policy_table(policy)}")
    return 0


def cmd_triggers(args: argparse.Namespace) -> int:
    """``triggers``: the policy and the decisions recorded for it."""
    reg = Registry.from_env(args.registry)
    policy = _policy(reg, args.name)
    decisions = reg.decisions(args.name, limit=args.limit or None)
    rows = [[str(d["id"]), d["time"], "fired" if d["fired"] else "held" if d.get("held")
             else "-", ", ".join(t["name"] for t in d["triggers"] if t["fired"]) or "-",
             _outcome(d)] for d in decisions]
    text = (f"policy of {args.name}: {_policy_line(policy)}\n" +
            (format_table(["id", "time", "decision", "triggers", "outcome"], rows) if rows
             else "no decisions yet: run 'hybridml-cloud controller --once'"))
    _emit(args, {"name": args.name, "policy": policy.to_json(), "decisions": decisions}, text)
    return 0


def cmd_controller(args: argparse.Namespace) -> int:
    """``controller``: one pass (``--once``) or a pass every ``--interval`` seconds."""
    from .controller import Controller

    ctl = Controller(Registry.from_env(args.registry))
    if not args.once:
        ctl.run(args.interval)
        return 0
    steps = ctl.run_once()
    rows = [[s.name, s.skipped or ("fired" if s.fired else "not fired"),
             _outcome({"fired": s.fired, "outcome": s.outcome})] for s in steps]
    text = (format_table(["model", "decision", "outcome"], rows) if rows
            else "no model has a policy: set one with 'hybridml-cloud policy set NAME ...'")
    _emit(args, [s.to_json() for s in steps], text)
    return 0


def policy_table(policy: Policy) -> str:
    """The policy as a two-column table of settings."""
    shown = {k: _setting(k, v) for k, v in policy.to_json().items()}
    return format_table(["setting", "value"], [[k, v] for k, v in shown.items()])


# -------------------------------------------------------------------------------- internals
def _policy(reg: Registry, name: str) -> Policy:
    doc = reg.policies().get(name)
    if doc is None:
        reg.resolve(name, "latest")  # NotFoundError naming the models for an unknown one
        raise NotFoundError(f"{name!r} has no policy: set one with 'hybridml-cloud policy set "
                            f"{name} --every 7d' (see --help)", field="name")
    return Policy.from_json(doc)


def _policy_line(policy: Policy) -> str:
    on = ", ".join(policy.enabled) or "no trigger on"
    cooldown = _setting("cooldown_s", policy.cooldown_s)
    return (f"triggers {on}; mode {policy.mode}; cooldown {cooldown}; auto-promote "
            f"{'on' if policy.auto_promote else 'off'}; rollout {policy.rollout or 'off'}")


def _setting(key: str, value: Any) -> str:
    if value is None:
        return "off"
    if key.endswith("_s"):
        return format_duration(value)
    if key in ("new_data_fraction", "drift_devices"):
        return f"{100 * value:g}%"
    return str(value).lower() if isinstance(value, bool) else str(value)


def _outcome(d: dict[str, Any]) -> str:
    out = d.get("outcome")
    if not d.get("fired"):
        return "-"
    if out is None:
        return "training (or interrupted)"
    if out.get("candidate"):
        return (f"v{out['candidate']} ({out.get('label')}, {out['mode']['mode']}): "
                f"{'blessed' if out.get('blessed') else 'not blessed'}"
                f"{', promoted' if out.get('promoted') else ''}")
    if out.get("error"):
        return f"error: {out['error'].get('message')}"
    return f"skipped: {out.get('skipped')}"


def _float(text: str, field: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"--{field.replace('_', '-')} {text!r} is not a number (or 'off')",
                          field=field) from None


def _emit(args: argparse.Namespace, payload: Any, text: str) -> None:
    print(json.dumps(payload, indent=2, sort_keys=True) if args.json else text)


__all__ = ["add_parser", "policy_table"]
