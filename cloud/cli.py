"""``hybridml-cloud``: train, precompute, list, promote and serve models; manage keys and tokens.

Thin by design: parse arguments, call the library, print. Every command takes ``--registry``
(default ``$HYBRIDML_REGISTRY``, else ``./registry``) and ``--json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hybridml.shared.errors import ConfigError, HybridMLError
from hybridml.shared.schema import InputSchema
from hybridml.shared.text import format_table

from .feedback import add_parser as add_feedback
from .freshness import add_parser as add_freshness
from .lineage import describe, gate_summary
from .loop import add_parser as add_loop
from .models import FAMILIES
from .monitor import add_parser as add_monitor
from .policy import MODES
from .progress import StepProgress
from .quality import CALIBRATIONS, CLASS_WEIGHTS, IMBALANCE_SHARE, PRIMARIES, QualityOptions
from .registry import Registry
from .rollout_cli import add_parser as add_rollout
from .storage import ARTIFACTS_ENV, DB_ENV, S3_ENDPOINT_ENV, URLS_ENV, Storage

log = logging.getLogger("hybridml.cloud.cli")
STORAGE_FLAGS = (
    ("--db", DB_ENV, "metadata database: postgresql://user@host/db; unset: SQLite in the "
     "registry directory"),
    ("--artifacts", ARTIFACTS_ENV, "artifact store: s3://bucket/prefix or file:///dir; unset: "
     "<registry>/blobs"),
    ("--s3-endpoint", S3_ENDPOINT_ENV, "S3-compatible endpoint URL (SeaweedFS, MinIO, Ceph)"),
    ("--artifact-urls", URLS_ENV, "direct artifact URLs for devices: off, presign or "
     "public:<base URL>"),
)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code (0 ok, 2 bad input or failure)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        storage_flags(args)
        return int(args.func(args) or 0)
    except HybridMLError as exc:
        if getattr(args, "json", False):
            print(json.dumps(exc.to_json()), file=sys.stdout)
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for the docs and tests)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--registry", default=None,
                        help="registry directory (default: $HYBRIDML_REGISTRY, else ./registry)")
    for flag, var, text in STORAGE_FLAGS:
        common.add_argument(flag, default=None, help=f"{text} (default: ${var})")
    common.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    common.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    common.add_argument("--verbose", "-v", action="store_true", help="log INFO messages")

    p = argparse.ArgumentParser(prog="hybridml-cloud", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", parents=[common], help="train, export, quantize and register")
    src = t.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="CSV file with a header row")
    src.add_argument("--dataset", help="bundled dataset: iris, wine, breast_cancer, digits, "
                     "diabetes")
    t.add_argument("--target", help="column to predict (required with --data)")
    t.add_argument("--name", required=True, help="model name in the registry")
    t.add_argument("--model", default="hgb", choices=sorted(FAMILIES),
                   help="model family (default: hgb)")
    t.add_argument("--task", choices=["binary", "multiclass", "regression"],
                   help="override the detected task")
    t.add_argument("--seed", type=int, default=0, help="split and model seed (default 0)")
    t.add_argument("--tolerance", type=float, default=None,
                   help="largest metric drop a quantized model may have (accuracy points as a "
                   "fraction, e.g. 0.005; relative for RMSE, e.g. 0.01)")
    t.add_argument("--compress", choices=["off", "auto", "aggressive"], default="auto",
                   help="compression guard: auto (default) tries cheap smaller candidates and, "
                   "for models over 1 MB, refitted ones (pruned forest, distilled); "
                   "aggressive always does both; off ships the exported graph")
    t.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="estimator parameter, value parsed as JSON (repeatable)")
    t.add_argument("--finetune-from", metavar="NAME:VERSION",
                   help="follow that version: continue its model (mlp, sgd, gb, hgb, rf) "
                   "instead of training from scratch; see --mode")
    t.add_argument("--mode", default="finetune", choices=MODES,
                   help="with --finetune-from: finetune (default), retrain its line from "
                   "scratch, or auto (fine-tune where possible, else retrain)")
    t.add_argument("--categorical", action="append", default=[], metavar="COL",
                   help="treat COL as categorical (repeatable or comma-separated)")
    t.add_argument("--numeric", action="append", default=[], metavar="COL",
                   help="require COL to be numeric (repeatable or comma-separated)")
    t.add_argument("--drop", action="append", default=[], metavar="COL",
                   help="ignore COL (repeatable or comma-separated)")
    t.add_argument("--gate", nargs="?", const="stable", metavar="REF",
                   help="gate the new version against REF (default: stable) before it is "
                   "registered; the report lands in its manifest, and 'rollout start' needs no "
                   "--force for a blessed version")
    _quality_flags(t)
    t.set_defaults(func=cmd_train)

    pc = sub.add_parser("precompute", parents=[common],
                        help="precompute predictions for frequent inputs")
    pc.add_argument("--name", required=True)
    pc.add_argument("--version", default="stable", help="version or alias (default: stable)")
    pc.add_argument("--inputs", required=True,
                    help="CSV of raw rows: a request log, or rows with a 'count' column")
    pc.add_argument("--top", type=int, default=10000, help="keep the K most frequent rows")
    pc.add_argument("--count-column", default=None,
                    help="column holding each row's request count (default: 'count' if present)")
    pc.set_defaults(func=cmd_precompute)

    cd = sub.add_parser("card", parents=[common], help="a version's model card: data, metrics "
                        "with intervals, threshold, calibration, features, fairness, rollouts")
    cd.add_argument("name")
    cd.add_argument("--version", default="stable", help="version or alias (default: stable)")
    cd.add_argument("--html", default=None, metavar="FILE",
                    help="also write the card as one self-contained HTML page")
    cd.add_argument("--seed", type=int, default=0, help="bootstrap and shuffle seed (default 0)")
    cd.set_defaults(func=cmd_card)

    m = sub.add_parser("models", parents=[common], help="list models, or one model's versions")
    m.add_argument("name", nargs="?", help="show every version of this model")
    m.add_argument("--version", default=None, metavar="V",
                   help="with NAME: show that version (number or alias) and its fairness "
                   "group table")
    m.set_defaults(func=cmd_models)

    pr = sub.add_parser("promote", parents=[common], help="point an alias at a version")
    pr.add_argument("name")
    pr.add_argument("version", help="version number or alias")
    pr.add_argument("--alias", default="stable", help="alias to move (default: stable)")
    pr.set_defaults(func=cmd_promote)

    gc = sub.add_parser("gc", parents=[common],
                        help="delete blobs no version names, crash leftovers and the "
                        "controller's orphaned training CSVs")
    gc.add_argument("--min-age", default="1h", help="only files older than this (default "
                    "1h: a training run may still register what it wrote)")
    gc.set_defaults(func=cmd_gc)

    mg = sub.add_parser("migrate", parents=[common],
                        help="upgrade the stores' schemas, or move an embedded registry to "
                        "PostgreSQL and S3 (--from DIR), verified")
    mg.add_argument("--from", dest="source", default=None, metavar="DIR",
                    help="an embedded registry directory to copy onto --db / --artifacts")
    mg.set_defaults(func=cmd_migrate)

    rb = sub.add_parser("rollback", parents=[common],
                        help="move an alias back to the version it pointed at before")
    rb.add_argument("name")
    rb.add_argument("--alias", default="stable", help="alias to move (default: stable)")
    rb.add_argument("--version", default=None, help="roll back to this version instead")
    rb.set_defaults(func=cmd_rollback)

    k = sub.add_parser("keys", help="manifest signing keys (ed25519)")
    ksub = k.add_subparsers(dest="keys_command", required=True)
    ki = ksub.add_parser("init", parents=[common], help="create a key pair (signs at once only "
                         "if no key is active, or with --activate)")
    ki.add_argument("--activate", action="store_true", help="sign with the new key at once")
    ki.set_defaults(func=cmd_keys_init)
    kl = ksub.add_parser("list", parents=[common], help="list the key pairs")
    kl.set_defaults(func=cmd_keys_list)
    ku = ksub.add_parser("use", parents=[common], help="sign with KEY_ID from now on")
    ku.add_argument("key_id")
    ku.set_defaults(func=cmd_keys_use)
    kr = ksub.add_parser("remove", parents=[common], help="delete a retired key pair")
    kr.add_argument("key_id")
    kr.set_defaults(func=cmd_keys_remove)

    tk = sub.add_parser("tokens", help="API tokens (device, admin)")
    tsub = tk.add_subparsers(dest="tokens_command", required=True)
    tc = tsub.add_parser("create", parents=[common],
                         help="create a token; prints it once on stdout")
    tc.add_argument("--role", required=True, choices=["device", "admin"])
    tc.add_argument("--name", required=True, help="label: the device or person it is for")
    tc.set_defaults(func=cmd_tokens_create)
    tl = tsub.add_parser("list", parents=[common], help="list tokens (never their secrets)")
    tl.set_defaults(func=cmd_tokens_list)
    tr = tsub.add_parser("revoke", parents=[common], help="revoke a token by id or name")
    tr.add_argument("token", metavar="ID_OR_NAME")
    tr.set_defaults(func=cmd_tokens_revoke)

    add_freshness(sub, common)
    add_loop(sub, common)
    add_feedback(sub, common)
    add_monitor(sub, common)
    add_rollout(sub, common)

    s = sub.add_parser("serve", parents=[common], help="serve the HTTP API")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port)")
    s.add_argument("--ready-file", metavar="PATH",
                   help="once listening, write the server's URL to PATH (with --port 0: "
                   "the port the system chose)")
    s.add_argument("--workers", type=int, default=2, help="gunicorn workers (default 2)")
    s.add_argument("--dev", action="store_true", help="Flask's development server instead")
    s.add_argument("--insecure", action="store_true",
                   help="serve without token checks (and unsigned if there is no key); "
                   "loopback hosts only")
    s.add_argument("--certfile", metavar="FILE", default=None,
                   help="serve HTTPS with this PEM certificate (chain); needs --keyfile "
                   "(default: $HYBRIDML_CERTFILE)")
    s.add_argument("--keyfile", metavar="FILE", default=None,
                   help="the PEM private key of --certfile (default: $HYBRIDML_KEYFILE)")
    s.set_defaults(func=cmd_serve)
    return p


def storage_flags(args: argparse.Namespace) -> Storage:
    """Check the storage flags and put them in the environment (docs/storage.md §1), where
    every store — and each gunicorn worker ``serve`` starts — finds them."""
    for flag, var, _ in STORAGE_FLAGS:
        value = getattr(args, flag[2:].replace("-", "_"), None)
        if value is not None:
            os.environ[var] = value
    return Storage.from_env()


def _registry(args: argparse.Namespace) -> Registry:
    return Registry.from_env(args.registry)


def _split_list(values: Sequence[str]) -> list[str]:
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


def _params(pairs: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--param {pair!r}: use KEY=VALUE, e.g. --param max_depth=6",
                              field="param")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
        if isinstance(out[key], list):
            out[key] = tuple(out[key])
    return out


def _emit(args: argparse.Namespace, payload: Any, text: str) -> None:
    print(json.dumps(payload, indent=2, sort_keys=True) if args.json else text)


def _quality_flags(t: argparse.ArgumentParser) -> None:
    """``train``'s model-quality flags (docs/quality.md), read by :func:`_quality`."""
    q = t.add_argument_group("model quality (docs/quality.md)")
    q.add_argument("--class-weight", default="auto", choices=CLASS_WEIGHTS,
                   help="weigh classes: balanced, none, or auto (default: balanced when the "
                   f"smallest class is under {IMBALANCE_SHARE * 100:.0f}%% of the rows for a "
                   f"binary task, under {IMBALANCE_SHARE * 100:.0f}%% x 2/K for K classes, "
                   "i.e. under 40%% of its balanced share)")
    q.add_argument("--threshold", default=None, metavar="auto|P",
                   help="binary tasks: the decision threshold on the positive (minority) class's "
                   "probability, tuned on the validation split (auto) or given (e.g. 0.3); "
                   "default: auto when the classes are imbalanced")
    q.add_argument("--primary", default=None, choices=PRIMARIES,
                   help="the classifier's primary metric (default: balanced_accuracy for "
                   "binary tasks, accuracy for multiclass)")
    q.add_argument("--calibrate", default="none", choices=CALIBRATIONS,
                   help="calibrate the probabilities (auto: isotonic with 1,000+ rows, else "
                   "sigmoid)")
    q.add_argument("--sensitive", action="append", default=[], metavar="COL",
                   help="report group metrics for COL (repeatable or comma-separated)")
    q.add_argument("--sensitive-only", action="append", default=[], metavar="COL",
                   help="like --sensitive, and keep COL out of the model's inputs")
    q.add_argument("--max-parity-gap", type=float, default=None, metavar="D",
                   help="refuse the version when a demographic parity difference exceeds D")
    q.add_argument("--no-explainer", dest="explainer", action="store_false",
                   help="do not add the device explainer artifact")


def _quality(args: argparse.Namespace) -> QualityOptions | None:
    """The :class:`QualityOptions` asked for by ``train``'s flags; None (the line's own, as
    its parent recorded them) for ``--finetune-from`` without any of them."""
    asked = QualityOptions.from_flags(
        class_weight=args.class_weight, threshold=args.threshold, primary=args.primary,
        calibrate=args.calibrate, sensitive=_split_list(args.sensitive),
        sensitive_only=_split_list(args.sensitive_only), max_parity_gap=args.max_parity_gap,
        explainer=args.explainer)
    return None if args.finetune_from and asked == QualityOptions() else asked


def cmd_train(args: argparse.Namespace) -> int:
    """``train``: the whole pipeline; prints the version, metrics and compression table."""
    from .calibration import describe as calibration_line
    from .compress import report_of
    from .imbalance import summary as imbalance_summary
    from .metrics import auc_text, positive_of
    from .threshold import Decision
    from .train import train

    reg = _registry(args)
    gate = None
    if args.gate is not None:
        from .gate import gate_hook

        gate = gate_hook(reg, args.name, against=reg.resolve(args.name, args.gate))
    progress = StepProgress(enabled=False if args.quiet or args.json else None)
    try:
        result = train(
            reg, args.name, data=args.data, dataset=args.dataset,
            target=args.target, model=args.model, task=args.task, seed=args.seed,
            tolerance=args.tolerance, params=_params(args.param),
            finetune_from=args.finetune_from, mode=args.mode,
            categorical=_split_list(args.categorical), numeric=_split_list(args.numeric),
            drop=_split_list(args.drop), quality=_quality(args), progress=progress, gate=gate,
            compression=args.compress)
    finally:
        progress.close()
    m = result.manifest
    primary = m["metrics"]["primary"]
    lines = [
        f"registered {m['name']} v{m['version']} ({m['model']['family']}"
        + (f" {m['model']['variant']} from {m['model']['compressed_from']}"
           if m["model"].get("compressed_from") else "") + f", {m['output']['task']}"
        f", lineage {m['lineage']}" + (f" from v{m['parent']}" if m.get("parent") else "") + ")",
        f"test {primary}: sklearn {m['metrics']['sklearn_test'][primary]}  "
        f"edge {m['metrics']['edge_test'][primary]}"
        + (f"  ({auc})" if (auc := auc_text(m["metrics"]["edge_test"], positive_of(m)))
           else ""),
        *([s] if (s := imbalance_summary(m["training"].get("imbalance"))) else []),
        report_of(m).to_table(),
        *([f"gate: {gate_summary(m['gate'])}"] if isinstance(m.get("gate"), dict) else []),
        *([d.describe()] if (d := Decision.from_manifest(m)) else []),
        *([calibration_line(m["calibration"])] if isinstance(m.get("calibration"), dict) else []),
        "artifacts:",
        *[f"  {a['role']:<11} {a['sha256'][:16]}  {a['size']:>10,} B" for a in m["artifacts"]],
    ]
    if isinstance(m.get("fairness"), dict):
        from .fairness import table as fairness_table

        lines += ["fairness on the test split:", fairness_table(m["fairness"])]
    _emit(args, result.to_json(), "\n".join(lines))
    return 0


def cmd_precompute(args: argparse.Namespace) -> int:
    """``precompute``: build the table for a version and attach it to that version."""
    from .precompute import precompute

    reg = _registry(args)
    version = reg.resolve(args.name, args.version)
    manifest = reg.manifest(args.name, version)
    model = next(a for a in manifest["artifacts"] if a["role"] == "model")
    schema = InputSchema.from_json(manifest["schema"])
    with tempfile.TemporaryDirectory(dir=reg.root) as tmp:
        out = Path(tmp) / "table.bin"
        report = precompute(reg.blob_path(model["sha256"]).read_bytes(), model["sha256"], schema,
                            manifest["output"]["task"], args.inputs, top=args.top,
                            count_column=args.count_column, out_path=out,
                            progress=not (args.quiet or args.json) and sys.stderr.isatty())
        sha, size = reg.put_blob(out)
    reg.attach_artifact(args.name, version, {"role": "table", "sha256": sha, "size": size,
                                             "media_type": "application/x-hybridml-table"})
    r = report.to_json()
    text = (f"precomputed {r['kept']:,} rows for {args.name} v{version} "
            f"({r['distinct']:,} distinct of {r['requests']:,} requests) in {r['seconds']:.1f} s"
            f"\ncoverage: {100 * r['coverage']:.1f}% of requests answered by the table "
            f"({size:,} B, table {sha[:16]})")
    _emit(args, {**r, "name": args.name, "version": version, "table_sha256": sha,
                 "table_size": size}, text)
    return 0


def cmd_card(args: argparse.Namespace) -> int:
    """``card``: a version's model card as text (or JSON), and optionally as an HTML page."""
    from .card import build, text

    card = build(_registry(args), args.name, args.version, seed=args.seed)
    if args.html:
        from .card_html import write_html

        write_html(card, args.html)
    _emit(args, card, text(card).rstrip() + (f"\n\nwritten: {args.html}" if args.html else ""))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """``models``: a table of models, or of one model's versions."""
    reg = _registry(args)
    if args.name:
        from .fairness import table as fairness_table
        from .fairness import worst_gap

        versions = describe(reg, args.name)
        if args.version is not None:
            chosen = reg.resolve(args.name, args.version)
            versions = [v for v in versions if v["version"] == chosen]
        rows = [[v["name"], str(v["version"]), v["label"], ",".join(v["aliases"]) or "-",
                 v["task"], _metric(v["metrics"]), gate_summary(v["gate"]),
                 worst_gap(v.get("fairness")), f"{v['model_size']:,}", _lineage(v),
                 v["created"]] for v in versions]
        text = format_table(["name", "version", "label", "aliases", "task", "test metric",
                             "gate (candidate/active)", "parity gap", "model bytes",
                             "lineage", "created"], rows)
        if args.version is not None:
            fair = versions[0].get("fairness")
            text += "\n\n" + (fairness_table(fair) if isinstance(fair, dict) else
                               "no fairness report: train with --sensitive COL")
        _emit(args, versions[0] if args.version is not None else versions, text)
        return 0
    models = reg.models()
    rows = []
    for s in models:
        latest = reg.versions(s.name)[-1]
        rows.append([s.name, str(s.latest), str(s.n_versions),
                     " ".join(f"{k}=v{v}" for k, v in sorted(s.aliases.items())) or "-",
                     latest.task, _metric(latest.metrics), f"{latest.model_size:,}"])
    header = ["name", "latest", "versions", "aliases", "task", "test metric (latest)",
              "model bytes"]
    text = (format_table(header, rows) if rows
            else "no models yet: run 'hybridml-cloud train'")
    _emit(args, [s.to_json() for s in models], text)
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    """``promote``: move an alias (default ``stable``) to a version."""
    from .auth import promote

    reg = _registry(args)
    version, before = promote(reg, args.name, args.alias, args.version)
    _emit(args, {"name": args.name, "alias": args.alias, "version": version,
                 "previous": before}, f"{args.name}: {args.alias} -> v{version}")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    """``rollback``: move an alias back to its previous version (or to ``--version``)."""
    from .auth import rollback

    version, before = rollback(_registry(args), args.name, args.alias, args.version)
    _emit(args, {"name": args.name, "alias": args.alias, "version": version,
                 "previous": before}, f"{args.name}: {args.alias} -> v{version} (was v{before})")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    """``gc``: :meth:`Registry.gc`."""
    from hybridml.shared.clock import parse_duration

    removed = _registry(args).gc(min_age_seconds=parse_duration(args.min_age, "min_age"))
    _emit(args, {"removed": removed}, f"removed {removed} file(s)")
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    """``migrate``: :func:`hybridml.cloud.migrate.upgrade` or :func:`~.migrate.migrate`."""
    from pathlib import Path

    from . import migrate
    from .registry import DEFAULT_ROOT, ENV_VAR

    storage = Storage.from_env()
    root = Path(args.registry or os.environ.get(ENV_VAR) or DEFAULT_ROOT)
    if args.source is None:
        report = migrate.upgrade(root, storage)
        _emit(args, report.to_json(), "schemas: " + ", ".join(
            f"{k} {v}" for k, v in report.schemas.items()) + f" ({storage.describe()})")
        return 0
    report = migrate.migrate(Path(args.source), storage)
    rows = ", ".join(f"{k} {v}" for k, v in report.rows.items() if v)
    _emit(args, report.to_json(),
          f"migrated {args.source}: {report.blobs} blobs ({report.blob_bytes} bytes), "
          f"{report.keys} signing key(s); rows: {rows or 'none'}; verified\n"
          f"now serve with: {storage.describe()}")
    return 0


def cmd_keys_init(args: argparse.Namespace) -> int:
    """``keys init``: a new ed25519 key pair under ``<registry>/keys``."""
    from .signing import KeyRing

    info = KeyRing(_registry(args)).init(activate=args.activate)
    note = ("signs manifests from now on" if info.active else
            f"not signing yet: give devices the .pub file, then run 'hybridml-cloud keys use "
            f"{info.key_id}'")
    _emit(args, info.to_json(), f"key {info.key_id}: {note}\npublic key for devices: "
          f"{info.public_path}")
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    """``keys list``: the key pairs, the active one marked."""
    from .signing import KeyRing

    keys = KeyRing(_registry(args)).list()
    rows = [[k.key_id, "yes" if k.active else "-", "yes" if k.has_private else "no",
             k.created, str(k.public_path)] for k in keys]
    text = (format_table(["key_id", "active", "private", "created", "public key"], rows) if rows
            else "no signing keys: run 'hybridml-cloud keys init'")
    _emit(args, [k.to_json() for k in keys], text)
    return 0


def cmd_keys_use(args: argparse.Namespace) -> int:
    """``keys use``: switch the signing key (running servers follow on the next request)."""
    from .signing import KeyRing

    info = KeyRing(_registry(args)).use(args.key_id)
    _emit(args, info.to_json(), f"manifests are now signed with key {info.key_id}")
    return 0


def cmd_keys_remove(args: argparse.Namespace) -> int:
    """``keys remove``: delete a retired key pair."""
    from .signing import KeyRing

    KeyRing(_registry(args)).remove(args.key_id)
    _emit(args, {"removed": args.key_id}, f"removed key {args.key_id}")
    return 0


def cmd_tokens_create(args: argparse.Namespace) -> int:
    """``tokens create``: the token goes alone to stdout (for ``$(...)``), notes to stderr."""
    from .tokens import TokenStore

    info, token = TokenStore(_registry(args)).create(args.role, args.name)
    if args.json:
        print(json.dumps({**info.to_json(), "token": token}, indent=2, sort_keys=True))
    else:
        print(token)
        if not args.quiet:
            print(f"created {info.role} token {info.id} ({info.name}); it is shown only once, "
                  "store it now", file=sys.stderr)
    return 0


def cmd_tokens_list(args: argparse.Namespace) -> int:
    """``tokens list``: ids, names, roles; never secrets (only their hashes are stored)."""
    from .tokens import TokenStore

    tokens = TokenStore(_registry(args)).list()
    rows = [[t.id, t.role, t.name, t.created[:19] + "Z", (t.revoked or "")[:19] + "Z"
             if t.revoked else "-"] for t in tokens]
    text = (format_table(["id", "role", "name", "created", "revoked"], rows) if rows
            else "no tokens: run 'hybridml-cloud tokens create --role device --name LABEL'")
    _emit(args, [t.to_json() for t in tokens], text)
    return 0


def cmd_tokens_revoke(args: argparse.Namespace) -> int:
    """``tokens revoke``: the token stops working on the next request."""
    from .tokens import TokenStore

    info = TokenStore(_registry(args)).revoke(args.token)
    _emit(args, info.to_json(), f"revoked {info.role} token {info.id} ({info.name})")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """``serve``: run the HTTP API (gunicorn by default, Flask's server with --dev)."""
    from .serve import serve

    return serve(registry=str(_registry(args).root), host=args.host, port=args.port,
                 workers=args.workers, dev=args.dev, insecure=args.insecure,
                 ready_file=args.ready_file, certfile=args.certfile, keyfile=args.keyfile)


def _lineage(v: dict[str, Any]) -> str:
    """``finetune(added_trees)<-v1``: how a version came from its parent."""
    how = f"({v['finetune']})" if v.get("finetune") else ""
    return v["lineage"] + how + (f"<-v{v['parent']}" if v.get("parent") else "")


def _metric(m: dict[str, Any]) -> str:
    primary = m.get("primary")
    test = m.get("edge_test") or {}
    if not primary or primary not in test:
        return "-"
    return f"{primary}={test[primary]:.4f}"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


__all__ = ["build_parser", "main"]
