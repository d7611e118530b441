"""``hybridml-edge``: sync, predict, status, rollback, push, the sync agent and trusted keys.

The store defaults to ``$HYBRIDML_STORE``, else ``~/.hybridml``; the cloud URL to
``$HYBRIDML_CLOUD`` (several replicas: ``URL1,URL2``, tried in turn when one cannot answer).
Exit codes: 0 ok, 2 bad input or failure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from hybridml.shared.drift import Profile, drift_report, merge_counts
from hybridml.shared.errors import ConfigError, HybridMLError
from hybridml.shared.manifest import Manifest
from hybridml.shared.rollout import RolloutBlock
from hybridml.shared.settings import env_flag

from . import batch, doctor, freshness, service
from .agent import Agent, AgentSettings
from .budget import budget_mb
from .client import CloudClient, read_token_file
from .fallback import FallbackPolicy
from .freshness import FreshnessSettings
from .push import PushResult, push
from .runtime import EdgeRuntime
from .spool import SPOOL_FILE, Spool
from .store import LocalStore
from .sync import SyncOptions, SyncResult, health_of, sync
from .trust import TrustStore, describe

log = logging.getLogger("hybridml.edge.cli")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except HybridMLError as exc:
        if args.json:
            print(json.dumps(exc.to_json()))
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    """The argument parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--store", default=os.environ.get("HYBRIDML_STORE", "~/.hybridml"),
                        help="local store directory (default: $HYBRIDML_STORE or ~/.hybridml)")
    common.add_argument("--cloud", default=os.environ.get("HYBRIDML_CLOUD"),
                        help="cloud base URL, e.g. http://127.0.0.1:8000; several replicas "
                        "comma-separated, URL1,URL2, tried in turn ($HYBRIDML_CLOUD)")
    common.add_argument("--token-file", default=None, metavar="PATH",
                        help="file holding the device token, readable by its owner only "
                        "(chmod 600); default: $HYBRIDML_TOKEN")
    common.add_argument("--token", nargs="?", action=_RefuseToken, help=argparse.SUPPRESS)
    common.add_argument("--ca-bundle", default=None, metavar="PEM",
                        help="check the cloud's TLS certificate against the CAs in this file "
                        "only ($HYBRIDML_CA_BUNDLE; default: the system CAs)")
    common.add_argument("--allow-http", action="store_true",
                        help="allow plain http:// to a cloud off this machine, on a network "
                        "you trust ($HYBRIDML_ALLOW_HTTP)")
    common.add_argument("--json", action="store_true", help="machine-readable output")
    common.add_argument("--verbose", "-v", action="store_true", help="log INFO messages")

    p = argparse.ArgumentParser(prog="hybridml-edge", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    trust_flag = argparse.ArgumentParser(add_help=False)
    trust_flag.add_argument("--trust", action="append", default=[], metavar="PUBKEY_FILE",
                            help="trust this cloud signing key from now on, as 'trust add' "
                            "does (repeatable)")
    trust_flag.add_argument("--allow-unsigned", action="store_true",
                            default=env_flag("HYBRIDML_ALLOW_UNSIGNED", False),
                            help="accept unsigned manifests while this device trusts no key "
                            "(unsafe off a trusted network; $HYBRIDML_ALLOW_UNSIGNED)")
    trust_flag.add_argument("--alias", default="stable",
                            help="the alias this device follows (default: stable)")
    trust_flag.add_argument("--memory-budget-mb", type=float, default=None, metavar="MB",
                            help="refuse a version estimated to need more memory than this, "
                            "before downloading it ($HYBRIDML_MEMORY_BUDGET_MB)")
    stale_flag = argparse.ArgumentParser(add_help=False)
    stale_flag.add_argument("--stale-after", type=float, default=None, metavar="SECONDS",
                            help="call a model stale after this long without a newer signed "
                            "manifest (default 86400, $HYBRIDML_STALE_AFTER_S)")

    s = sub.add_parser("sync", parents=[common, trust_flag],
                       help="fetch and activate the cloud's version")
    s.add_argument("--name", required=True)
    s.set_defaults(func=cmd_sync)

    pr = sub.add_parser("predict", parents=[common], help="predict rows from a file or stdin")
    pr.add_argument("--name", required=True)
    pr.add_argument("--input", default="-",
                    help="JSON lines, a JSON array, or CSV with a header (default: stdin)")
    pr.add_argument("--errors", choices=["raise", "report"], default="raise",
                    help="'report' answers bad rows with an error and predicts the rest")
    pr.add_argument("--min-confidence", type=float, default=None,
                    help="ask the cloud when a classifier's top probability is lower")
    pr.add_argument("--timeout-ms", type=float, default=None,
                    help="how long to wait for the cloud (default 250)")
    pr.add_argument("--no-fallback", action="store_true", help="never ask the cloud")
    pr.add_argument("--explain", action="store_true",
                    help="print each row's attributions per column from the version's device "
                         "explainer (docs/quality.md §3)")
    pr.add_argument("--chunk-rows", type=int, default=batch.DEFAULT_CHUNK_ROWS, metavar="N",
                    help="read, predict and write N rows at a time; memory stays flat "
                    f"whatever the input's size (default {batch.DEFAULT_CHUNK_ROWS})")
    pr.set_defaults(func=cmd_predict)

    st = sub.add_parser("status", parents=[common, stale_flag],
                        help="what is active, synced, fresh and reachable")
    st.add_argument("--name", default=None, help="one model (default: every model in store)")
    st.set_defaults(func=cmd_status)

    rb = sub.add_parser("rollback", parents=[common], help="re-activate the previous version")
    rb.add_argument("--name", required=True)
    rb.set_defaults(func=cmd_rollback)

    tr = sub.add_parser("trust", help="the cloud keys this device accepts manifests from")
    tsub = tr.add_subparsers(dest="trust_command", required=True)
    ta = tsub.add_parser("add", parents=[common], help="trust a public key file (PEM)")
    ta.add_argument("file", metavar="PUBKEY_FILE")
    ta.set_defaults(func=cmd_trust_add)
    tl = tsub.add_parser("list", parents=[common], help="list trusted key ids")
    tl.set_defaults(func=cmd_trust_list)
    trm = tsub.add_parser("remove", parents=[common], help="stop trusting a key id")
    trm.add_argument("key_id")
    trm.set_defaults(func=cmd_trust_remove)

    pu = sub.add_parser("push", parents=[common],
                        help="upload the spooled telemetry and feedback to the cloud")
    pu.add_argument("--name", default=None,
                    help="only this model's records (default: every record in the store)")
    pu.set_defaults(func=cmd_push)

    ag = sub.add_parser("agent", parents=[common, trust_flag, stale_flag],
                        help="sync and push in a loop (for systemd)")
    ag.add_argument("--name", required=True)
    ag.add_argument("--interval", type=float, default=300.0, help="seconds between syncs")
    ag.add_argument("--max-cycles", type=int, default=None, help="stop after N syncs")
    ag.set_defaults(func=cmd_agent)
    service.add_commands(sub)  # service print|install (hybridml.edge.service)
    doctor.add_command(sub)  # doctor (hybridml.edge.doctor)
    return p


def _freshness(args: argparse.Namespace) -> FreshnessSettings:
    settings = FreshnessSettings.from_env()
    if getattr(args, "stale_after", None) is not None:
        if args.stale_after <= 0:
            raise ConfigError("--stale-after must be a positive number of seconds",
                              field="stale_after")
        settings = dataclasses.replace(settings, stale_after_s=args.stale_after)
    return settings


def _sync_options(args: argparse.Namespace) -> SyncOptions:
    return SyncOptions(alias=args.alias, allow_unsigned=args.allow_unsigned,
                       freshness=_freshness(args),
                       memory_budget_mb=budget_mb(args.memory_budget_mb))


class _RefuseToken(argparse.Action):
    """``--token``: refused, saying where a token goes instead."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        parser.error("--token is not accepted: a token on the command line is visible to every "
                     "user of this machine (ps, /proc, shell history). Set $HYBRIDML_TOKEN, or "
                     "write the token to a file only you can read (chmod 600 FILE) and pass "
                     "--token-file FILE")


def _client(args: argparse.Namespace) -> CloudClient:
    """The cloud client the flags describe: ``--cloud`` (required), ``--token-file`` (else
    $HYBRIDML_TOKEN), ``--ca-bundle`` and ``--allow-http``."""
    token = read_token_file(args.token_file) if args.token_file else None
    return CloudClient(_need_cloud(args), token=token, ca_bundle=args.ca_bundle,
                       allow_http=args.allow_http)


def _need_cloud(args: argparse.Namespace) -> str:
    if not args.cloud:
        raise ConfigError("this command needs --cloud URL (or $HYBRIDML_CLOUD)", field="cloud")
    return str(args.cloud)


def cmd_sync(args: argparse.Namespace) -> int:
    """``sync``: one verified sync."""
    store = LocalStore(args.store)
    client = _client(args)
    _add_trusted(store, args.trust)
    r = sync(store, client, args.name, _sync_options(args))
    if r.changed:
        text = (f"{args.name}: activated v{r.version}"
                + (f" (previous v{r.previous_version})" if r.previous_version else "")
                + f"; downloaded {r.bytes_downloaded:,} B ({', '.join(r.downloaded) or 'none'})"
                + (f", {r.bytes_direct:,} B of it from direct URLs" if r.bytes_direct else ""))
    else:
        text = f"{args.name}: up to date at v{r.version}"
    print(json.dumps(r.to_json()) if args.json else text)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """``predict``: read rows, print one answer per row."""
    changes: dict[str, Any] = {"enabled": not args.no_fallback}
    if args.min_confidence is not None:
        changes["min_confidence"] = args.min_confidence
    if args.timeout_ms is not None:
        changes["timeout_ms"] = args.timeout_ms
    policy = dataclasses.replace(FallbackPolicy.from_env(), **changes)
    rt = EdgeRuntime(args.store, args.name, policy=policy,
                     client=_client(args) if args.cloud else None)
    if args.explain:  # attributions from the device explainer (hybridml.edge.explain)
        from hybridml.edge.explain import explanation_text

        answers = rt.explain(batch.explain_input(args.input))  # capped, read whole
        print("\n".join(json.dumps(a) for a in answers) if args.json
              else explanation_text(answers))
        return 0
    # Streamed: read, predict and write --chunk-rows rows at a time (docs/device.md §3).
    done = batch.score(rt, args.input, sys.stdout, errors=args.errors, as_json=args.json,
                       chunk_rows=args.chunk_rows)
    _flush_telemetry(rt)
    if args.cloud and rt.last_cloud_error and done.degraded:
        print(f"note: the cloud did not answer ({rt.last_cloud_error}); answered locally and "
              "marked those rows degraded", file=sys.stderr)
    return 2 if done.errors else 0


def _rollout_entry(store: LocalStore, active: Manifest) -> dict[str, Any] | None:
    """The rollout role of the active manifest for ``status``, or None outside a rollout."""
    block = RolloutBlock.of(active)
    if block is None:
        return None
    kept = store.companion(active.name)
    return {"id": block.id, "strategy": block.strategy, "role": block.role,
            "companion": block.companion_version,
            "companion_in_store": kept is not None and kept.version == block.companion_version}


def cmd_status(args: argparse.Namespace) -> int:
    """``status``: per model, the active and previous versions, table, last sync."""
    store = LocalStore(args.store)
    names = [args.name] if args.name else store.model_names()
    client = _client(args) if args.cloud else None
    reachable = client.healthy() if client is not None else None
    in_use = client.base_url if client is not None else None  # the replica that answered
    models: list[dict[str, Any]] = []
    fresh_settings = _freshness(args)
    spool = _spool_if_any(store)
    for name in names:
        active, prev = store.active(name), store.previous(name)
        entry: dict[str, Any] = {"name": name, "active_version": active.version if active else None,
                                 "previous_version": prev.version if prev else None}
        if active is not None:
            model = active.artifact("model")
            table = active.artifact("table")
            entry["task"] = active.task
            entry["model_bytes"] = model.size if model else None
            entry["variant"] = model.variant if model else None
            entry["table_bytes"] = table.size if table else 0
            entry["signature"] = describe(store.root, active)
            entry["rollout"] = _rollout_entry(store, active)
        state = store.sync_state(name)
        entry["freshness"] = freshness.describe(
            freshness.Seen.load(state, active, prev), time.time(), fresh_settings)
        entry.update({k: v for k, v in state.items()
                      if k not in ("etag", "sequence", "issued", "fresh_at")})
        entry["drift"] = spooled_drift(spool, active) if spool is not None else None
        models.append(entry)
    disk = store.disk_bytes()
    spooled = spool.stats() if spool is not None else {
        "pending": 0, "quarantined": 0, "bytes": 0, "oldest": None, "dropped": {}}
    if args.json:
        print(json.dumps({"store": str(store.root), "disk_bytes": disk, "cloud": args.cloud,
                          "cloud_in_use": in_use, "cloud_reachable": reachable,
                          "models": models, "spool": spooled}))
        return 0
    print(f"store: {store.root} ({disk:,} B on disk)")
    if client is not None:
        others = len(client.urls) - 1
        print(f"cloud: {in_use} ({'reachable' if reachable else 'unreachable'})"
              + (f"; {others} other replica(s) in --cloud" if others else ""))
    print(f"spool: {spooled['pending']} record(s) to upload ({spooled['bytes']:,} B"
          + (f", oldest {spooled['oldest']}" if spooled["oldest"] else "") + ")"
          + (f"; {spooled['quarantined']} quarantined" if spooled["quarantined"] else "")
          + (f"; dropped {spooled['dropped']}" if spooled["dropped"] else ""))
    if not models:
        print("no models yet: run 'hybridml-edge sync --cloud URL --name NAME'")
    for e in models:
        active = f"v{e['active_version']}" if e["active_version"] else "none (run sync)"
        line = f"{e['name']}: active {active}"
        if e.get("previous_version"):
            line += f", previous v{e['previous_version']}"
        if e["active_version"]:
            line += (f"; {e['variant']} model {e['model_bytes']:,} B, "
                     f"table {e['table_bytes']:,} B")
        print(line)
        if e.get("signature"):
            print(f"  signature: {_signature_text(e['signature'])}")
        if e.get("rollout"):
            r = e["rollout"]
            print(f"  rollout: #{r['id']} {r['strategy']}, role {r['role']}"
                  + (f", companion v{r['companion']}"
                     + ("" if r["companion_in_store"] else " (not in the store)")
                     if r["companion"] else ""))
        if e["active_version"]:
            print(f"  freshness: {freshness.text(e['freshness'])}")
        if e.get("drift"):
            print(f"  drift: {_drift_text(e['drift'])}")
        print(f"  last sync: {e.get('last_sync', 'never')}"
              + (f"; last error: {e['last_error']}" if e.get("last_error") else ""))
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    """``rollback``: swap active and previous."""
    store = LocalStore(args.store)
    with store.lock(args.name):
        m = store.rollback(args.name)
    print(json.dumps({"name": args.name, "active_version": m.version}) if args.json
          else f"{args.name}: rolled back to v{m.version}")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    """``push``: upload the spool; exit 2 when the cloud could not take it all."""
    store = LocalStore(args.store)
    client = _client(args)
    spool = _spool_if_any(store)
    result = PushResult() if spool is None else push(spool, client, model=args.name)
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        print(f"pushed {result.accepted} record(s)"
              + (f", {result.duplicates} the cloud had already" if result.duplicates else "")
              + (f", {result.quarantined} quarantined (refused)" if result.quarantined else "")
              + (f"; reported dropped {result.dropped_reported}" if result.dropped_reported
                 else "")
              + f"; {result.pending} left")
    if result.error:
        print(f"error: {result.error}; the records are kept for the next push", file=sys.stderr)
        return 2
    return 0


def cmd_agent(args: argparse.Namespace) -> int:
    """``agent``: the sync (and push) loop."""
    store = LocalStore(args.store)
    client = _client(args)
    _add_trusted(store, args.trust)
    spool = Spool.open(store.root)

    def spool_health(outcome: SyncResult | HybridMLError) -> None:
        body = health_of(args.name, outcome)  # a rollout's model that failed its checks
        if body is not None:
            try:
                spool.add("health", body, model=args.name, version=body["version"])
            except HybridMLError as exc:  # the loop goes on; the next failure tries again
                log.warning("could not spool a health record: %s", exc.message)

    agent = Agent(store, client, args.name, AgentSettings(interval=args.interval),
                  options=_sync_options(args), spool=spool, on_result=spool_health)
    try:
        cycles = agent.run(max_cycles=args.max_cycles)  # SIGTERM: see hybridml.edge.agent
    finally:
        spool.close()  # every record is committed; this checkpoints SQLite's WAL
        client.close()
    log.info("agent stopped after %d cycles", cycles)
    return 0


def spooled_drift(spool: Spool, active: Manifest | None) -> dict[str, Any] | None:
    """The drift report of the active version's summaries waiting in the spool (what this
    device counted since its last push), or None (no model, no profile, no summary)."""
    if active is None:
        return None
    try:
        profile = Profile.of(active.raw)
        summaries = spool.summaries(active.name, active.version)
        if profile is None or not summaries:
            return None
        return drift_report(profile, merge_counts(summaries))
    except HybridMLError as exc:  # status reports what it can
        log.warning("no drift report for %s: %s", active.name, exc.message)
        return None


def _spool_if_any(store: LocalStore) -> Spool | None:
    """The store's spool, or None when it has none (status and push do not make one) or it
    cannot be opened (logged)."""
    if not (store.root / SPOOL_FILE).exists():
        return None
    try:
        return Spool.open(store.root)
    except HybridMLError as exc:
        log.warning("the telemetry spool is unusable: %s", exc.message)
        return None


def _flush_telemetry(rt: EdgeRuntime) -> None:
    try:
        rt.close()
    except HybridMLError as exc:  # the answers are printed; the counters could not be kept
        log.warning("telemetry not spooled: %s", exc.message)


def _drift_text(report: dict[str, Any]) -> str:
    alerts = [f["name"] for f in report["features"] if f["status"] == "alert"]
    warns = [f["name"] for f in report["features"] if f["status"] == "warn"]
    text = (f"{report['rows']} rows; " + ("DATASET DRIFT; " if report["dataset_drift"] else "")
            + (f"alert: {', '.join(alerts)}; " if alerts else "")
            + (f"warn: {', '.join(warns)}; " if warns else "")
            + f"predictions {report['predictions']['status']}")
    return text


def cmd_trust_add(args: argparse.Namespace) -> int:
    """``trust add``: accept manifests signed by this key from now on."""
    store = LocalStore(args.store)
    key_id = _add_trusted(store, [args.file])[0]
    print(json.dumps({"trusted": key_id}) if args.json else
          f"trusting key {key_id}; manifests must now be signed by a trusted key")
    return 0


def cmd_trust_list(args: argparse.Namespace) -> int:
    """``trust list``: the key ids this device accepts."""
    keys = sorted(TrustStore(LocalStore(args.store).root).keys())
    if args.json:
        print(json.dumps({"trusted": keys}))
    else:
        print("\n".join(keys) if keys else
              "no trusted keys: sync refuses every manifest until you run 'hybridml-edge "
              "trust add KEY.pub' (or passes --allow-unsigned)")
    return 0


def cmd_trust_remove(args: argparse.Namespace) -> int:
    """``trust remove``: refuse manifests signed by this key from now on."""
    store = LocalStore(args.store)
    TrustStore(store.root).remove(args.key_id)
    _forget_etags(store)
    left = sorted(TrustStore(store.root).keys())
    print(json.dumps({"removed": args.key_id, "trusted": left}) if args.json else
          f"no longer trusting key {args.key_id}; trusted: {', '.join(left) or 'none'}")
    return 0


def _add_trusted(store: LocalStore, files: Sequence[str]) -> list[str]:
    """Install trusted keys; a new key makes the next sync fetch and check the manifest again."""
    if not files:
        return []
    trust = TrustStore(store.root)
    before = set(trust.keys())
    ids = [trust.add(f) for f in files]
    if set(ids) - before:
        _forget_etags(store)
    return ids


def _forget_etags(store: LocalStore) -> None:
    # A 304 would keep a manifest that was accepted under the old set of keys; without the
    # ETag the next sync fetches the manifest and checks it against the new set.
    for name in store.model_names():
        with store.lock(name):
            state = store.sync_state(name)
            if state.pop("etag", None) is not None:
                store.save_sync_state(name, state)


def _signature_text(sig: dict[str, Any]) -> str:
    key = sig.get("key_id")
    return {"verified": f"verified (key {key})",
            "unverified": f"signed by key {key}, not verified (this device trusts no key)",
            "unsigned": "unsigned" + ("" if sig.get("trusted_keys") else
                                      " (this device trusts no key)"),
            "untrusted": f"signed by key {key}, which this device no longer trusts",
            "invalid": f"INVALID signature by key {key}"}.get(sig.get("state", ""), "unknown")
