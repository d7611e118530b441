"""The end-to-end demo behind ``make demo``: every step is a real CLI command, shown as run.

train on built-in data -> precompute a table -> a signing key and a device token -> serve on
loopback (tokens checked, manifests signed) -> sync an edge store that trusts the key ->
stop the cloud -> predict offline (table hits and local inference) -> restart the cloud ->
an out-of-range row falls back to the cloud -> summary.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import requests

from hybridml.shared.errors import HybridMLError
from hybridml.shared.text import format_table

BIN = Path(sys.executable).parent


def run(cmd: Sequence[str], stdin: str | None = None, show: bool = True) -> str:
    """Run a CLI command, echo it and its output, fail loudly on a non-zero exit."""
    shown = " ".join(cmd)
    if show:
        print(f"\n$ {shown}" + (" < rows" if stdin else ""), flush=True)
    proc = subprocess.run([str(BIN / cmd[0]), *cmd[1:]], input=stdin, text=True,
                          capture_output=True, check=False)
    if show and proc.stdout.strip():
        print(proc.stdout.rstrip())
    if show and proc.stderr.strip():
        print(proc.stderr.rstrip())
    if proc.returncode != 0:
        raise SystemExit(f"demo step failed (exit {proc.returncode}): {shown}\n{proc.stderr}")
    return proc.stdout


class Cloud:
    """``hybridml-cloud serve`` (gunicorn) as a child process on a loopback port.

    The first start takes any free port (``--port 0``; the server writes its URL to a file);
    a restart asks for the same port, and retries while it is briefly taken.
    """

    def __init__(self, registry: Path) -> None:
        self.registry, self.port, self.url = registry, 0, ""
        self.ready = registry.parent / "cloud.url"
        self.log = registry.parent / "cloud.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the server and wait until /healthz answers."""
        print(f"\n$ hybridml-cloud serve --registry {self.registry} --port {self.port} &")
        deadline = time.monotonic() + 30
        while not self._launch(deadline):
            if not (self.port and "in use" in self.log.read_text(errors="replace")
                    and time.monotonic() < deadline):
                raise SystemExit(f"the cloud did not start; see {self.log}")
        self.url = self.ready.read_text().strip()
        self.port = int(self.url.rsplit(":", 1)[1])
        while time.monotonic() < deadline:
            try:
                if requests.get(self.url + "/healthz", timeout=0.5).ok:
                    print(f"cloud up at {self.url}")
                    return
            except requests.RequestException:
                time.sleep(0.1)
        raise SystemExit("the cloud did not start within 30 s")

    def _launch(self, deadline: float) -> bool:
        """Start the process; True once it listens, False if it exited first."""
        self.ready.unlink(missing_ok=True)
        cmd = [str(BIN / "hybridml-cloud"), "serve", "--registry", str(self.registry),
               "--port", str(self.port), "--ready-file", str(self.ready)]
        with self.log.open("ab") as err:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err,
                                         start_new_session=True)
        while time.monotonic() < deadline:
            if self.ready.exists():
                return True
            if self.proc.poll() is not None:
                return False
            time.sleep(0.05)
        raise SystemExit("the cloud did not start within 30 s")

    def stop(self) -> None:
        """Stop the server and its workers."""
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=20)
            self.proc = None
            print("\n# cloud stopped: the edge is offline now")


def request_log(path: Path, rows: list[dict[str, Any]], n: int, seed: int) -> None:
    """Write a request log where a few rows are very frequent (Zipf-like), as in real traffic."""
    rng = random.Random(seed)
    weights = [1.0 / (i + 1) ** 1.1 for i in range(len(rows))]
    picks = rng.choices(rows, weights=weights, k=n)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(picks)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; returns 0 on success."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default="demo-work", help="where the demo writes (recreated)")
    ap.add_argument("--dataset", default="wine")
    ap.add_argument("--model", default="mlp")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    work = Path(args.workdir).resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    reg, store, name = work / "registry", work / "edge-store", "wine"
    print(f"hybridml demo in {work}")

    out = run(["hybridml-cloud", "train", "--dataset", args.dataset, "--name", name,
               "--model", args.model, "--registry", str(reg), "--json"], show=False)
    trained = json.loads(out)
    run(["hybridml-cloud", "train", "--dataset", args.dataset, "--name", name, "--model",
         args.model, "--registry", str(reg), "--quiet", "--seed", "1"])
    run(["hybridml-cloud", "promote", name, "2", "--registry", str(reg)])

    from hybridml.cloud.data import load_builtin

    ds = load_builtin(args.dataset)
    names = ds.schema.names
    rows = [{n: float(v) for n, v in zip(names, r)} for r in ds.num[:60].tolist()]
    log_path = work / "request_log.csv"
    request_log(log_path, rows, 20000, seed=0)
    run(["hybridml-cloud", "precompute", "--name", name, "--inputs", str(log_path), "--top",
         "20", "--registry", str(reg)])
    run(["hybridml-cloud", "models", "--registry", str(reg)])

    # Secure by default: the cloud signs manifests and wants a token; the edge gets both.
    run(["hybridml-cloud", "keys", "init", "--registry", str(reg)])
    pub = next((reg / "keys").glob("*.pub"))
    token = run(["hybridml-cloud", "tokens", "create", "--role", "device", "--name",
                 "demo-edge", "--registry", str(reg), "--quiet"], show=False).strip()
    print(f"\n$ export HYBRIDML_TOKEN=$(hybridml-cloud tokens create --role device --name "
          f"demo-edge --registry {reg})\n(device token {token[:17]}..., shown once)")
    os.environ["HYBRIDML_TOKEN"] = token  # the edge commands below read it

    cloud = Cloud(reg)
    cloud.start()
    try:
        anon = requests.get(cloud.url + "/v1/models", timeout=5)
        print(f"\n$ curl {cloud.url}/v1/models   # no token\n{anon.status_code} "
              f"{anon.json()['error']['code']}")
        run(["hybridml-edge", "sync", "--cloud", cloud.url, "--name", name, "--store",
             str(store), "--trust", str(pub)])
        run(["hybridml-edge", "sync", "--cloud", cloud.url, "--name", name, "--store",
             str(store)])
    finally:
        cloud.stop()

    frequent, rare = rows[0], rows[59]
    offline_in = "\n".join(json.dumps(r) for r in (frequent, rare, rows[1]))
    offline = run(["hybridml-edge", "predict", "--store", str(store), "--name", name,
                   "--cloud", cloud.url, "--json"], stdin=offline_in)
    odd = dict(rows[2])
    odd[names[0]] = float(ds.schema.features[0].max or 0) * 3  # far outside training range
    offline_odd = run(["hybridml-edge", "predict", "--store", str(store), "--name", name,
                       "--cloud", cloud.url], stdin=json.dumps(odd))
    run(["hybridml-edge", "status", "--store", str(store), "--cloud", cloud.url])

    cloud.start()
    try:
        online = run(["hybridml-edge", "predict", "--store", str(store), "--name", name,
                      "--cloud", cloud.url, "--json"], stdin=json.dumps(odd))
    finally:
        cloud.stop()

    results = [json.loads(x) for x in offline.splitlines()] + \
        [json.loads(x) for x in online.splitlines()]
    sources = [r["source"] for r in results]
    summary = [
        ("train v1, v2 (" + args.model + " on " + args.dataset + ")",
         f"v1 ships {trained['quantization']['chosen']}; v2 promoted to stable"),
        ("precompute + sync", "edge store on v2 with its table"),
        ("security", f"no token -> {anon.status_code}; manifest signed by key {pub.stem}, "
                     "verified on the edge"),
        ("offline, frequent row", sources[0]),
        ("offline, rare row", sources[1]),
        ("offline, out-of-range row", "edge, degraded" if "degraded" in offline_odd
         else "unexpected"),
        ("online, out-of-range row", f"{sources[3]} ({results[3].get('reason')})"),
    ]
    print("\nsummary")
    print(format_table(["step", "answer / result"], summary, indent="  "))
    print(f"  total {time.perf_counter() - t0:.1f} s")
    ok = sources[:2] == ["precomputed", "edge"] and sources[3] == "cloud"
    if not ok:
        print("demo: unexpected sources", sources, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except HybridMLError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        sys.exit(2)
