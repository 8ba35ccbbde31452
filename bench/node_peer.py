"""The Node peer of bench/run.py: the CDS Hooks Sandbox's own default services, optional (issue 17).

sandbox-cds-services (https://github.com/cds-hooks/sandbox-cds-services, Node/Express) is what a user would
pick instead of our service to try CDS Hooks. It is measured only when the environment gives a checkout with
its node_modules installed (`--node-peer DIR` or BENCH_NODE_PEER=DIR); nothing here fetches it, and without it
run.py reports it as not measured. It runs as shipped, `node server.js`, one process (no cluster mode), with
PORT set to a free port; a preload given to node with --require binds its listening socket to 127.0.0.1
instead of every interface, and changes nothing else.

Its services that fit our mixes: `pama-imaging`, an order-select service, for mixes a and b (same bodies, same
fresh ids). It has no order-sign service (mix c) and verifies no token (mix d).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

SERVICE_ID = "pama-imaging"  # its order-select service (discovery/service-definitions.json)
SERVICE_PATH = f"/cds-services/{SERVICE_ID}"
HOOK = "order-select"
MIXES = ("a", "b")  # the mixes its order-select service fits
NOT_MEASURED = {
    "c": "it has no order-sign service",
    "d": "its services verify no JWT (no authentication to compare)",
}
TARGET = 2.5  # issue 17: service throughput >= this x the Node sandbox services'

# What pama-imaging does with one of our order-select bodies (read from services/pama-imaging.js and checked
# by run.py's first request: status 200, JSON, its own answer rather than our card).
DOES = ("Express: body-parser JSON, CORS headers; pama-imaging finds the selected draft order(s), looks up their "
        "CPT code in its PAMA rating table (ours are not rated: no systemActions), runs fhirpath.js over them "
        "for reason and order codes to match its one card template (congenital heart disease -> cardiac MRI: "
        "no match), answers {\"cards\": []} pretty-printed with an ETag; no FHIR validation, no storage, no log")

# Preloaded with `node --require`: a listen() given only a port (server.js: app.listen(PORT)) binds 127.0.0.1.
LOOPBACK_JS = """\
const net = require('net');
const listen = net.Server.prototype.listen;
net.Server.prototype.listen = function loopbackListen(...args) {
  const port = args[0];
  const portOnly = typeof port === 'number' || (typeof port === 'string' && /^[0-9]+$/.test(port));
  if (portOnly && (args.length === 1 || typeof args[1] === 'function')) args.splice(1, 0, '127.0.0.1');
  return listen.apply(this, args);
};
"""


class NodePeerError(Exception):
    """The given checkout cannot be run as the Node peer."""


def checkout(directory: str) -> Path:
    """The checkout, once it looks runnable: server.js, its order-select service, node_modules, and node."""
    path = Path(directory).expanduser().resolve()
    hint = ("get it with `git clone https://github.com/cds-hooks/sandbox-cds-services DIR && cd DIR && npm ci "
            "--omit=dev`")
    if not (path / "server.js").is_file() or not (path / "package.json").is_file():
        raise NodePeerError(f"{path} is not a sandbox-cds-services checkout (no server.js / package.json); {hint}")
    if not (path / "services" / f"{SERVICE_ID}.js").is_file():
        raise NodePeerError(f"{path} has no services/{SERVICE_ID}.js, the order-select service measured here")
    if not (path / "node_modules" / "express" / "package.json").is_file():
        raise NodePeerError(f"{path} has no node_modules installed; run `npm ci --omit=dev` in it")
    if shutil.which("node") is None:
        raise NodePeerError("node is not installed (Node 18 or later; Debian: apt-get install nodejs)")
    return path


def command(path: Path, preload: Path) -> list[str]:
    """`node server.js` as the sandbox ships it, with the loopback preload; PORT comes from the environment."""
    return ["node", "--require", str(preload), str(path / "server.js")]


def _version(package: Path) -> str:
    try:
        return str(json.loads(package.read_text()).get("version", "?"))
    except (OSError, ValueError):
        return "?"


def describe(path: Path) -> str:
    """E.g. "sandbox-cds-services 1.0.0, Express 4.17.1, Node v20.20.2", for the report."""
    node = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip() or "?"
    return (f"sandbox-cds-services {_version(path / 'package.json')}, "
            f"Express {_version(path / 'node_modules' / 'express' / 'package.json')}, Node {node}")
