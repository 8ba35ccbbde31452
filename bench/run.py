"""Benchmark: the CDS service against the framework's own limit and a FastAPI peer, in one run (issues 7, 17).

Starts `cds-service serve` exactly as production does (gunicorn managing granian workers, 2 workers x 4
threads) and, under gunicorn gthread with 2 workers x 4 threads, the baselines: bench/baseline_app.py, a Flask
app whose hook route only parses the JSON body and answers {"cards": []}, and for the authenticated mix
bench/baseline_auth_app.py, the same app that first verifies the same ES384 JWT with PyJWT against the same
JWKS and records its jti in SQLite. The peer is bench/fastapi_peer.py under uvicorn[standard], 2 workers,
answering the same card (fastapi and uvicorn[standard] are installed into this Python if missing).

Every request is fresh: bench/hook.lua gives each one its own hookInstance and its own draft order ids (the
selections still name the selected order), and for mix d its own token, so no cache keyed on content gains.

Per mix:
  1. throughput, closed loop: wrk at 16 connections for a fixed time, alternating service, baseline and peer
     (S B P, P B S, ...) so that a noisy machine treats all alike; the ratio service / baseline and
     service / peer, p50/p99, worker CPU per request and each worker's resident memory;
  2. latency at a fixed rate, open loop: wrk with bench/hook.lua sending on a schedule (64 connections) at half
     the baseline's measured throughput, service and baseline alternating; p99 of each, and the requests
     that started late because every connection was busy (more than 1% late: the p99 is not trustworthy).

Mixes (bodies from fixtures/):
  a  order-select, 5 draft orders, none a sacroplasty                     (no card)
  b  order-select, a sacroplasty selected, with prefetch                   (one card)
  c  order-sign, 25 draft orders, one of them a sacroplasty               (one card)
  d  mix a with authentication on: a fresh ES384 JWT (own jti) per request, verified against a JWKS served
     on 127.0.0.1 by this script; the service runs without --dev; baseline and peer authenticate too.

Targets: throughput service / baseline a >= 0.9, b >= 0.6, c >= 0.6, d >= 0.8 (of the authenticated
baseline); p99 at the fixed rate <= 2x the baseline's; service / peer >= 1.5 on every mix; every service
worker < 120 MB.

The Node sandbox peer (bench/node_peer.py), only when given a checkout of sandbox-cds-services with its
node_modules installed (--node-peer DIR or BENCH_NODE_PEER=DIR; nothing is fetched): `node server.js` as
shipped, one process, on 127.0.0.1. Its order-select service (pama-imaging) takes the same fresh bodies as mixes
a and b in the same alternating throughput loop (S B P N, N P B S, ...); it answers its own way (no card of
ours), which is checked once (200, JSON, a list of cards). Target: service / Node peer >= 2.5. It has no
order-sign service (c) and no authentication (d). Without a checkout it is reported as not measured.

Before the load each mix sends one checked request to each side (right status, right number of cards, the
card naming the fresh order; for d also that a call without a token and a replayed token are refused), and
after it fails when wrk saw a socket error or a non-2xx response. Everything listens on 127.0.0.1 only;
every server is stopped at the end.

Usage: make bench   (or .venv/bin/python bench/run.py [--duration 5] [--rounds 2] [--mixes a,b,c,d]
                                                  [--node-peer DIR])
Exit status: 0 all targets met, 1 a check failed (wrong answer, non-2xx, server did not start), 3 a target
missed. Needs wrk (Debian: apt-get install wrk).
"""

from __future__ import annotations

import argparse
import http.server
import importlib.util
import json
import math
import os
import platform
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import node_peer

from cds_service.tools.localserver import free_port, serve_command
from cds_service.tools.signing import generate_key, make_token, public_jwk

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
FIXTURES = ROOT / "fixtures"
LUA = BENCH / "hook.lua"

# cds_service/cli.py `serve`: 2 workers x 4 threads; the baselines run gunicorn gthread with the same counts.
WORKERS = 2
THREADS = 4
KEEPALIVE = 5
TIMEOUT = 30

P99_FACTOR = 2.0  # service p99 at the fixed rate <= this x the baseline's
PEER_TARGET = 1.5  # service throughput >= this x the FastAPI peer's
LATE_LIMIT = 0.01  # more late starts than this share of requests: the open-loop p99 is not trustworthy
RSS_LIMIT_MB = 120.0
CLIENT_ISS = "https://bench-ehr.example.org"
PUBLIC_URL = "https://cds.bench.example"  # the audience base every side checks tokens against
PLACEHOLDER = "@" * 12  # filled by hook.lua with 12 hex digits unique per request


@dataclass(frozen=True)
class Mix:
    key: str
    title: str
    fixture: str
    cards: int  # cards the service must answer with
    target: float  # minimum throughput ratio service / baseline
    auth: bool = False


MIXES = (
    Mix("a", "order-select, 5 draft orders, no sacroplasty", "bench-order-select-5-orders-no-sacroplasty.json", 0, 0.9),
    Mix("b", "order-select, sacroplasty selected, prefetch", "order-select-sacroplasty-cpt.json", 1, 0.6),
    Mix("c", "order-sign, 25 draft orders, one sacroplasty", "bench-order-sign-25-orders-one-sacroplasty.json", 1, 0.6),
    Mix("d", "mix a + ES384 JWT per request (auth on, vs authenticated baseline)",
        "bench-order-select-5-orders-no-sacroplasty.json", 0, 0.8, auth=True),
)


class BenchError(Exception):
    """Something that makes the run's figures meaningless: reported, and the run fails."""


# ---------------------------------------------------------------------------------------------- servers

class Server:
    """A server's master (and its workers) in a subprocess on 127.0.0.1, logging to a file.

    "{port}" in the command and the environment stands for the port chosen here.
    """

    expected_workers = WORKERS  # child processes to wait for before the server counts as started

    def __init__(self, name: str, command: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")
        command = [part.replace("{port}", str(self.port)) for part in command]
        env = {key: value.replace("{port}", str(self.port)) for key, value in env.items()}
        self.process = subprocess.Popen(command, env={**os.environ, **env}, stdout=self._log,
                                        stderr=subprocess.STDOUT, cwd=str(ROOT))

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Until both workers are up and an HTTP request is answered (any status)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BenchError(f"{self.name} exited with status {self.process.returncode}; "
                                 f"log:\n{self.log_tail()}")
            if len(self.workers()) >= self.expected_workers:
                try:
                    with urllib.request.urlopen(self.url + "/", timeout=1):
                        return
                except urllib.error.HTTPError:
                    return
                except (OSError, ValueError):
                    pass
            time.sleep(0.1)
        raise BenchError(f"{self.name} did not start within {timeout:.0f} s; log:\n{self.log_tail()}")

    def workers(self) -> list[int]:
        """Pids of the master's child processes (its workers)."""
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == self.process.pid:
                pids.append(int(entry.name))
        return sorted(pids)

    def worker_rss_mb(self) -> list[float]:
        sizes = []
        for pid in self.workers():
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        sizes.append(int(line.split()[1]) / 1024)
            except OSError:
                pass
        return sizes

    def cpu_seconds(self) -> float:
        """CPU time (user + system) used so far by the workers: per request, a figure that noise hardly moves."""
        ticks = os.sysconf("SC_CLK_TCK")
        total = 0.0
        for pid in self.workers():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
        return total

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # graceful stop of master and workers
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


class NodeServer(Server):
    """The Node peer: one process serving by itself (no master, no workers), so it is its own "worker"."""

    expected_workers = 1

    def workers(self) -> list[int]:
        return [self.process.pid] if self.process.poll() is None else []


def service_command(dev: bool) -> list[str]:
    """`cds-service serve` as the tests start it (cds_service/tools/localserver.py), with production's threads."""
    return serve_command("{port}", WORKERS, THREADS, ["--dev"] if dev else [])


def baseline_command(app: str) -> list[str]:
    return [sys.executable, "-m", "gunicorn", "--bind", "127.0.0.1:{port}", "--workers", str(WORKERS),
            "--worker-class", "gthread", "--threads", str(THREADS), "--keep-alive", str(KEEPALIVE),
            "--timeout", str(TIMEOUT), "--error-logfile", "-", "--log-level", "info",
            "--chdir", str(BENCH), app]


def peer_command() -> list[str]:
    return [sys.executable, "-m", "uvicorn", "fastapi_peer:app", "--app-dir", str(BENCH), "--host", "127.0.0.1",
            "--port", "{port}", "--workers", str(WORKERS), "--no-access-log", "--log-level", "warning"]


def ensure_peer_packages() -> None:
    """fastapi and uvicorn[standard] in this Python, installed with pip if missing (not a project dependency)."""
    wanted = ("fastapi", "uvicorn", "uvloop", "httptools")
    if all(importlib.util.find_spec(name) for name in wanted):
        return
    print("installing fastapi and uvicorn[standard] for the peer ...", flush=True)
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "fastapi", "uvicorn[standard]"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise BenchError(f"could not install fastapi/uvicorn[standard] for the peer: {done.stderr[-500:]}")


class JwksServer:
    """The CDS client's key set on http://127.0.0.1:<port>/jwks.json, counting how often it is fetched."""

    def __init__(self, jwks: dict[str, Any]) -> None:
        body = json.dumps(jwks).encode()
        owner = self
        self.hits = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                owner.hits += 1
                if self.path.split("?")[0] != "/jwks.json":
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/jwks.json"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class Signer:
    """An ES384 key pair acting as the EHR: its JWKS and a supply of single-use tokens."""

    def __init__(self) -> None:
        self.key = generate_key("ES384")
        self.kid = "bench-" + uuid.uuid4().hex[:8]
        self.jwks = {"keys": [public_jwk(self.key, "ES384", self.kid)]}

    def token(self, aud: str) -> str:
        """A fresh token as `cds-service call` signs it (tools/signing.py): own jti, 5 minutes to live."""
        return make_token(self.key, "ES384", CLIENT_ISS, aud, self.kid)

    def token_file(self, aud: str, count: int, path: Path) -> Path:
        path.write_text("\n".join(self.token(aud) for _ in range(count)) + "\n")
        return path

    def verify_cpu_ms(self, count: int = 300) -> float:
        """CPU time of one ES384 signature check (OpenSSL through `cryptography`, as PyJWT does it), in this
        process: the one cost of mix d that no implementation can avoid."""
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec

        message = self.token("https://bench.example/cds-services/x").encode()
        signature = self.key.sign(message, ec.ECDSA(hashes.SHA384()))
        public = self.key.public_key()
        started = time.process_time()
        for _ in range(count):
            public.verify(signature, message, ec.ECDSA(hashes.SHA384()))
        return (time.process_time() - started) * 1000 / count


# ---------------------------------------------------------------------------------------------- bodies

def body_template(body: bytes, tag: str) -> bytes:
    """The fixture with its hookInstance and draft order ids made fresh per request by hook.lua: a UUID whose
    last 12 digits are the placeholder, and "<id>-<tag><placeholder>" for every draft order (selections too)."""
    data = json.loads(body)
    data["hookInstance"] = f"{tag}00-0000-4000-8000-{PLACEHOLDER}"
    context = data.get("context", {})
    renamed = {}
    for entry in (context.get("draftOrders") or {}).get("entry", []):
        res = entry.get("resource", {})
        if "id" in res:
            new = f"{res['id']}-{tag}{PLACEHOLDER}"
            renamed[f"{res['resourceType']}/{res['id']}"] = f"{res['resourceType']}/{new}"
            res["id"] = new
    if "selections" in context:
        context["selections"] = [renamed.get(s, s) for s in context["selections"]]
    return json.dumps(data).encode()


def instance(template: bytes) -> tuple[bytes, str]:
    """One concrete request from a template, as hook.lua makes them (the fill starts with f: no wrk thread's)."""
    fresh = "f" + secrets.token_hex(6)[:11]
    return template.replace(PLACEHOLDER.encode(), fresh.encode()), fresh


# ---------------------------------------------------------------------------------------------- checks

def post(url: str, body: bytes, token: str | None = None) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=15) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read() or b"null")
        except ValueError:
            return exc.code, None


def check_answer(side: str, mix: Mix, status: int, answer: Any, cards: int, fresh: str | None = None) -> None:
    if status != 200 or not isinstance(answer, dict) or not isinstance(answer.get("cards"), list):
        raise BenchError(f"mix {mix.key}: {side} answered {status} {json.dumps(answer)[:300]}")
    if len(answer["cards"]) != cards:
        raise BenchError(f"mix {mix.key}: {side} answered {len(answer['cards'])} card(s), expected {cards}")
    if cards and fresh and fresh not in json.dumps(answer):
        raise BenchError(f"mix {mix.key}: {side}'s card does not name the request's fresh order id")


def service_ids(service_url: str) -> dict[str, str]:
    """hook → service id, from discovery."""
    with urllib.request.urlopen(service_url + "/cds-services", timeout=15) as response:
        services = json.loads(response.read())["services"]
    return {s["hook"]: s["id"] for s in services}


# ---------------------------------------------------------------------------------------------- wrk

@dataclass
class Run:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    failures: dict[str, int]
    late: int = 0  # open loop: requests that started late, every connection busy
    late_max_ms: float = 0.0
    cpu_s: float = 0.0  # CPU time the server's workers used during the run
    wrk_cpu_s: float = 0.0  # CPU time wrk itself used


def wrk(url: str, template: Path, path: str, seconds: float, connections: int, threads: int,
        tokens: Path | None = None, rate: float = 0.0) -> Run:
    """One wrk run; rate > 0: open loop at that many requests per second in all."""
    command = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds:g}s", "--timeout", "5s",
               "-s", str(LUA), url, "--", str(template), path, str(tokens) if tokens else "-", str(threads),
               f"{rate / threads:.3f}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    line = next((row for row in done.stdout.splitlines() if row.startswith("BENCH ")), None)
    if done.returncode != 0 or line is None:
        raise BenchError(f"wrk failed ({done.returncode}): {done.stdout[-500:]} {done.stderr[-500:]}")
    data = json.loads(line[len("BENCH "):])
    failures = {k: data[k] for k in ("non2xx", "connect", "read", "write", "status", "timeout") if data[k]}
    return Run(data["requests"], data["duration_us"] / 1e6, data["p50_us"] / 1000, data["p99_us"] / 1000, failures,
               data["late"], data["late_max_ms"])


def _children_cpu() -> float:
    """CPU time of this script's finished child processes: wrk, once it has exited."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Side:
    runs: list[Run] = field(default_factory=list)
    rss_mb: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return sum(r.requests for r in self.runs) / sum(r.seconds for r in self.runs)

    @property
    def p50_ms(self) -> float:  # mean of the rounds' medians
        return sum(r.p50_ms for r in self.runs) / len(self.runs)

    @property
    def p99_ms(self) -> float:  # worst round
        return max(r.p99_ms for r in self.runs)

    @property
    def late_share(self) -> float:
        return sum(r.late for r in self.runs) / max(1, sum(r.requests for r in self.runs))

    @property
    def cpu_ms(self) -> float:  # worker CPU time per request
        return sum(r.cpu_s for r in self.runs) * 1000 / sum(r.requests for r in self.runs)

    @property
    def wrk_cpu_ms(self) -> float:  # the load generator's CPU time per request
        return sum(r.wrk_cpu_s for r in self.runs) * 1000 / sum(r.requests for r in self.runs)


@dataclass
class Result:
    mix: Mix
    service: Side
    baseline: Side
    peer: Side | None
    rate: float = 0.0  # the fixed offered rate of the open-loop runs
    service_fixed: Side | None = None
    baseline_fixed: Side | None = None
    jwks_fetches: int | None = None
    verify_cpu_ms: float | None = None  # mix d: one ES384 signature check, measured in the same run
    node: Side | None = None  # the Node sandbox peer, on the mixes its services fit (bench/node_peer.py)
    node_answer: str = ""  # what it answered to the checked request

    @property
    def node_ratio(self) -> float | None:
        return self.service.rate / self.node.rate if self.node and self.node.runs else None

    @property
    def ratio(self) -> float:
        return self.service.rate / self.baseline.rate

    @property
    def peer_ratio(self) -> float | None:
        return self.service.rate / self.peer.rate if self.peer and self.peer.runs else None

    @property
    def p99_ratio(self) -> float | None:
        if not (self.service_fixed and self.baseline_fixed and self.service_fixed.runs):
            return None
        return self.service_fixed.p99_ms / self.baseline_fixed.p99_ms

    @property
    def cpu_ratio(self) -> float:
        """The ratio the machine's CPU time per request predicts (server workers + wrk): what the throughput
        ratio would be on an idle machine, and much steadier than it on a shared one."""
        return (self.baseline.cpu_ms + self.baseline.wrk_cpu_ms) / (self.service.cpu_ms + self.service.wrk_cpu_ms)

    def misses(self) -> list[str]:
        found = []
        key = self.mix.key
        if self.ratio < self.mix.target:
            found.append(f"mix {key}: throughput ratio {self.ratio:.2f} < {self.mix.target:.2f}")
        if self.peer_ratio is not None and self.peer_ratio < PEER_TARGET:
            found.append(f"mix {key}: service / FastAPI peer {self.peer_ratio:.2f} < {PEER_TARGET:g}")
        if self.node_ratio is not None and self.node_ratio < node_peer.TARGET:
            found.append(f"mix {key}: service / Node sandbox peer {self.node_ratio:.2f} < {node_peer.TARGET:g}")
        if self.p99_ratio is not None:
            assert self.service_fixed and self.baseline_fixed
            if self.p99_ratio > P99_FACTOR:
                found.append(f"mix {key}: p99 at {self.rate:.0f} req/s {self.service_fixed.p99_ms:.1f} ms > "
                             f"{P99_FACTOR:g} x the baseline's {self.baseline_fixed.p99_ms:.1f} ms")
            if self.service_fixed.late_share > LATE_LIMIT:
                found.append(f"mix {key}: the service fell behind the fixed rate ({self.service_fixed.late_share:.1%}"
                             " of requests started late): its p99 is understated")
            if self.baseline_fixed.late_share > LATE_LIMIT:
                found.append(f"mix {key}: the baseline fell behind the fixed rate "
                             f"({self.baseline_fixed.late_share:.1%} late): the p99 comparison is not trustworthy")
        if any(rss >= RSS_LIMIT_MB for rss in self.service.rss_mb):
            found.append(f"mix {key}: a service worker uses {max(self.service.rss_mb):.0f} MB >= {RSS_LIMIT_MB:g} MB")
        return found


# ---------------------------------------------------------------------------------------------- the run

@dataclass
class Prepared:
    """A mix ready to measure: its body, the service path, and the card the service gave (for the peer)."""
    body: bytes
    path: str
    card: str | None


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.servers: list[Server] = []
        self.jwks_server: JwksServer | None = None
        self.signer: Signer | None = None
        self.results: list[Result] = []
        self.node_checkout: Path | None = getattr(args, "node_checkout", None)
        self._files = 0
        self._path = ""

    def start(self, server: Server) -> Server:
        self.servers.append(server)
        server.wait_ready()
        return server

    def stop(self, server: Server) -> None:
        server.stop()
        self.servers.remove(server)

    def stop_all(self) -> None:
        for server in list(self.servers):
            self.stop(server)
        if self.jwks_server:
            self.jwks_server.stop()

    def auth_env(self) -> dict[str, str]:
        self.signer = self.signer or Signer()
        self.jwks_server = self.jwks_server or JwksServer(self.signer.jwks)
        return {"BENCH_JWKS_URL": self.jwks_server.url, "BENCH_ISS": CLIENT_ISS, "BENCH_AUD_BASE": PUBLIC_URL}

    def service(self, auth: bool) -> Server:
        name = "service-auth" if auth else "service-dev"
        env = {"CDS_DATABASE_URL": f"sqlite:///{self.workdir / (name + '.sqlite3')}", "CDS_DEV": "0"}
        if auth:
            self.auth_env()
            assert self.jwks_server is not None
            clients = self.workdir / "clients.json"
            clients.write_text(json.dumps({"clients": [{"iss": CLIENT_ISS, "jwks_url": self.jwks_server.url}]}))
            env.update(CDS_CLIENTS_FILE=str(clients), CDS_PUBLIC_URL=PUBLIC_URL)
        return self.start(Server(name, service_command(dev=not auth), env, self.workdir))

    def baseline(self, auth: bool) -> Server:
        if not auth:
            return self.start(Server("baseline", baseline_command("baseline_app:app"), {}, self.workdir))
        env = {**self.auth_env(), "BENCH_AUTH_DB": str(self.workdir / "baseline-auth.sqlite3")}
        return self.start(Server("baseline-auth", baseline_command("baseline_auth_app:app"), env, self.workdir))

    def peer(self, auth: bool, cards: dict[str, str]) -> Server | None:
        if self.args.no_peer:
            return None
        ensure_peer_packages()
        cards_file = self.workdir / "peer-cards.json"
        cards_file.write_text(json.dumps(cards))
        env = {"PEER_CARDS": str(cards_file)}
        if auth:
            env.update(self.auth_env(), PEER_AUTH="1", BENCH_AUTH_DB=str(self.workdir / "peer-auth.sqlite3"))
        return self.start(Server("peer-auth" if auth else "peer", peer_command(), env, self.workdir))

    def node(self, group: list[Mix]) -> NodeServer | None:
        """The Node sandbox peer, when a checkout was given and one of the mixes fits its services."""
        if self.node_checkout is None or not any(m.key in node_peer.MIXES for m in group):
            return None
        preload = self.workdir / "node-loopback.js"
        preload.write_text(node_peer.LOOPBACK_JS)
        server = NodeServer("node-peer", node_peer.command(self.node_checkout, preload), {"PORT": "{port}"},
                            self.workdir)
        self.start(server)
        return server

    def run(self) -> None:
        mixes = [m for m in MIXES if m.key in self.args.mixes]
        for auth in (False, True):
            group = [m for m in mixes if m.auth == auth]
            if not group:
                continue
            baseline = self.baseline(auth)
            service = self.service(auth)
            prepared = [self.prepare(mix, service, baseline) for mix in group]
            cards: dict[str, str] = {}
            for prep in prepared:
                if prep.card:
                    cards[json.loads(prep.body)["hook"]] = prep.card
            peer = self.peer(auth, cards)
            node = self.node(group)
            last_node_mix = max((i for i, m in enumerate(group) if m.key in node_peer.MIXES), default=-1)
            for index, (mix, prep) in enumerate(zip(group, prepared, strict=True)):
                if peer:
                    self.check_peer(mix, prep, peer)
                node_here = node if node and mix.key in node_peer.MIXES else None
                answer = self.check_node(mix, prep, node_here) if node_here else ""
                result = self.measure(mix, prep, service, baseline, peer, node_here)
                result.node_answer = answer
                if auth and self.signer:
                    result.verify_cpu_ms = self.signer.verify_cpu_ms()
                self.results.append(result)
                if node and index == last_node_mix:
                    self.stop(node)  # not left running, idle, beside the mixes it does not take
            for server in (service, baseline, peer, node):
                if server and server in self.servers:
                    self.stop(server)

    def prepare(self, mix: Mix, service: Server, baseline: Server) -> Prepared:
        """One checked request to the service and the baseline; the service's card kept as the peer's."""
        body = (FIXTURES / mix.fixture).read_bytes()
        path = f"/cds-services/{service_ids(service.url)[json.loads(body)['hook']]}"
        aud = PUBLIC_URL + path
        template = body_template(body, secrets.token_hex(3))
        concrete, fresh = instance(template)
        print(f"({mix.key}) {mix.title}  [{mix.fixture}, {len(body)} bytes]: checked", flush=True)
        token = self.signer.token(aud) if mix.auth and self.signer else None
        status, answer = post(service.url + path, concrete, token)
        check_answer("service", mix, status, answer, mix.cards, fresh)
        check_answer("baseline", mix, *post(baseline.url + path, concrete, token), 0)
        if mix.auth:
            for side, server in (("service", service), ("baseline", baseline)):
                status, _ = post(server.url + path, concrete)
                if status != 401:
                    raise BenchError(f"mix {mix.key}: the {side} answered {status} to a call without a token; "
                                     "authentication is not on")
                status, _ = post(server.url + path, concrete, token)
                if status != 401:
                    raise BenchError(f"mix {mix.key}: the {side} answered {status} to a replayed token")
        card = None
        if mix.cards:
            data = json.loads(concrete)
            order_ids = [e["resource"]["id"] for e in data["context"]["draftOrders"]["entry"]]
            text = json.dumps(answer["cards"][0])
            named = [oid for oid in order_ids if oid in text]
            card = text.replace(data["hookInstance"], "@@HOOK@@")
            for oid in named:
                card = card.replace(oid, "@@ORDER@@")
        return Prepared(body, path, card)

    def check_peer(self, mix: Mix, prep: Prepared, peer: Server) -> None:
        concrete, fresh = instance(body_template(prep.body, secrets.token_hex(3)))
        token = self.signer.token(PUBLIC_URL + prep.path) if mix.auth and self.signer else None
        check_answer("peer", mix, *post(peer.url + prep.path, concrete, token), mix.cards, fresh)
        if mix.auth:
            status, _ = post(peer.url + prep.path, concrete, token)
            if status != 401:
                raise BenchError(f"mix {mix.key}: the peer answered {status} to a replayed token")

    def check_node(self, mix: Mix, prep: Prepared, node: Server) -> str:
        """One request of the mix to the Node peer's order-select service: 200 and JSON with a list of cards (its
        own answer, not our card). Returns what it answered, for the report."""
        if json.loads(prep.body).get("hook") != node_peer.HOOK:
            raise BenchError(f"mix {mix.key}: not an {node_peer.HOOK} body; the Node peer cannot take it")
        concrete, _ = instance(body_template(prep.body, secrets.token_hex(3)))
        status, answer = post(node.url + node_peer.SERVICE_PATH, concrete)
        if status != 200 or not isinstance(answer, dict) or not isinstance(answer.get("cards"), list):
            raise BenchError(f"mix {mix.key}: the Node peer answered {status} {json.dumps(answer)[:300]}; "
                             f"log:\n{node.log_tail()}")
        actions = (answer.get("extension") or {}).get("systemActions") or []
        return f"{len(answer['cards'])} card(s), {len(actions)} system action(s)"

    def tokens(self, mix: Mix, rate: float, seconds: float) -> Path | None:
        """Fresh single-use tokens for one wrk run at up to `rate` req/s. Service, baseline and peer each keep
        their own record of used jtis, so one file serves each side once. Running out fails the run."""
        if not mix.auth:
            return None
        assert self.signer is not None
        self._files += 1
        count = int(math.ceil(rate * seconds)) + 300
        return self.signer.token_file(PUBLIC_URL + self._path, count,
                                      self.workdir / f"tokens-{mix.key}-{self._files}.txt")

    def template(self, body: bytes) -> Path:
        self._files += 1
        path = self.workdir / f"body-{self._files}.json"
        path.write_bytes(body_template(body, secrets.token_hex(3)))
        return path

    def one(self, mix: Mix, prep: Prepared, name: str, server: Server, seconds: float, tokens: Path | None,
            rate: float = 0.0, connections: int | None = None) -> Run:
        path = node_peer.SERVICE_PATH if isinstance(server, NodeServer) else prep.path
        cpu_before, wrk_before = server.cpu_seconds(), _children_cpu()
        run = wrk(server.url, self.template(prep.body), path, seconds, connections or self.args.connections,
                  self.args.threads, tokens, rate)
        run.cpu_s, run.wrk_cpu_s = server.cpu_seconds() - cpu_before, _children_cpu() - wrk_before
        if run.failures:
            hint = " (a token may have run out: replays are refused)" if tokens else ""
            raise BenchError(f"mix {mix.key}: wrk against the {name} saw failures {run.failures} "
                             f"({run.requests} requests){hint}; {name} log:\n{server.log_tail()}")
        return run

    def measure(self, mix: Mix, prep: Prepared, service: Server, baseline: Server, peer: Server | None,
                node: Server | None = None) -> Result:
        self._path = prep.path
        print(f"\n({mix.key}) {mix.title}", flush=True)
        servers = [("service", service), ("baseline", baseline)] + ([("peer", peer)] if peer else [])
        servers += [("node", node)] if node else []  # last, so S B P N, N P B S, ...
        sides = {name: Side() for name, _ in servers}
        # Upper bound on the rate before anything was measured: the fastest side of any earlier mix.
        fastest = max([3000.0] + [s.rate for r in self.results for s in (r.service, r.baseline)])
        if self.args.warmup > 0:  # unmeasured, but it tells how many tokens the measured runs need
            tokens = self.tokens(mix, fastest * 1.5, self.args.warmup)
            rates = []
            for name, server in servers:
                run = self.one(mix, prep, name, server, self.args.warmup, tokens)
                rates.append(run.requests / run.seconds)
            fastest = max(rates)
        if mix.auth:  # a side slowed in the warm-up by a busy machine must not run out of tokens later
            fastest = max([fastest] + [s.rate for r in self.results for s in (r.service, r.baseline)])
        for round_ in range(self.args.rounds):  # S B P, P B S, ...: drift affects every side alike
            tokens = self.tokens(mix, fastest * 1.5, self.args.duration)
            for name, server in servers[:: 1 if round_ % 2 == 0 else -1]:
                run = self.one(mix, prep, name, server, self.args.duration, tokens)
                sides[name].runs.append(run)
                print(f"    {name:<8}  {run.requests / run.seconds:8.0f} req/s  p50 {run.p50_ms:6.2f} ms  "
                      f"p99 {run.p99_ms:6.2f} ms  worker CPU {run.cpu_s * 1000 / run.requests:5.2f} ms/req",
                      flush=True)
        for name, server in servers:
            sides[name].rss_mb = server.worker_rss_mb()
        result = Result(mix, sides["service"], sides["baseline"], sides.get("peer"),
                        jwks_fetches=self.jwks_server.hits if mix.auth and self.jwks_server else None,
                        node=sides.get("node"))
        peer_text = f", service / peer {result.peer_ratio:.2f} (target >= {PEER_TARGET:g})" if peer else ""
        if node:
            peer_text += f", service / Node peer {result.node_ratio:.2f} (target >= {node_peer.TARGET:g})"
        print(f"    => throughput ratio {result.ratio:.2f} (target >= {mix.target:.2f}), CPU-time ratio "
              f"{result.cpu_ratio:.2f}{peer_text}; worker RSS MB: service "
              + ", ".join(f"{x:.0f}" for x in result.service.rss_mb), flush=True)

        if self.args.fixed_rounds > 0:
            result.rate = result.baseline.rate * self.args.rate_share
            result.service_fixed, result.baseline_fixed = Side(), Side()
            fixed = {"service": result.service_fixed, "baseline": result.baseline_fixed}
            for round_ in range(self.args.fixed_rounds):
                tokens = self.tokens(mix, result.rate * 1.05, self.args.duration)
                for name, server in servers[:2][:: 1 if round_ % 2 == 0 else -1]:
                    run = self.one(mix, prep, name, server, self.args.duration, tokens, result.rate,
                                   self.args.fixed_connections)
                    fixed[name].runs.append(run)
                    print(f"    {name:<8}  fixed {result.rate:6.0f} req/s offered, {run.requests / run.seconds:6.0f}"
                          f" sent  p50 {run.p50_ms:6.2f} ms  p99 {run.p99_ms:6.2f} ms  late starts {run.late}"
                          f" (worst {run.late_max_ms:.0f} ms)", flush=True)
            print(f"    => p99 at {result.rate:.0f} req/s: service {result.service_fixed.p99_ms:.1f} ms, baseline "
                  f"{result.baseline_fixed.p99_ms:.1f} ms, ratio {result.p99_ratio:.2f} (target <= {P99_FACTOR:g})",
                  flush=True)
        return result


def machine() -> str:
    cpu = "unknown CPU"
    try:
        cpu = next(row.split(":", 1)[1].strip() for row in Path("/proc/cpuinfo").read_text().splitlines()
                   if row.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        kb = next(int(row.split()[1]) for row in Path("/proc/meminfo").read_text().splitlines()
                  if row.startswith("MemTotal:"))
        memory = f"{kb / 1024 / 1024:.1f} GiB"
    except (OSError, StopIteration):
        memory = "?"
    return (f"{os.cpu_count()} CPUs ({cpu}), {memory} RAM, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}")


def _rss(sizes: list[float]) -> str:
    return ", ".join(f"{x:.0f}" for x in sizes)


def node_table(results: list[Result], args: argparse.Namespace) -> list[str]:
    """The Node sandbox peer's table, when it was measured on some mix."""
    measured = [r for r in results if r.node and r.node_ratio is not None]
    if not measured:
        return []
    lines = ["", f"Node sandbox peer: {node_peer.describe(args.node_checkout)}; `node server.js` as shipped, one "
                 f"process (no cluster), its order-select service {node_peer.SERVICE_PATH}, same bodies and wrk "
                 "runs as the other sides.",
             "",
             f"| mix | service req/s | Node peer req/s | service / Node peer (>= {node_peer.TARGET:g}) "
             "| Node p50 / p99 ms | worker CPU ms/req service / Node | Node RSS MB | Node answered |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in measured:
        assert r.node and r.node_ratio is not None
        lines.append(f"| ({r.mix.key}) | {r.service.rate:.0f} | {r.node.rate:.0f} | {r.node_ratio:.2f} "
                     f"| {r.node.p50_ms:.1f} / {r.node.p99_ms:.1f} | {r.service.cpu_ms:.2f} / {r.node.cpu_ms:.2f} "
                     f"| {_rss(r.node.rss_mb)} | {r.node_answer} |")
    lines.append(f"What the Node peer does per call: {node_peer.DOES}.")
    return lines


def node_unmeasured(results: list[Result], args: argparse.Namespace) -> str:
    """Where the Node sandbox peer was not measured, and why."""
    if not any(r.node for r in results):
        return ("Not measured: the Node sandbox peer (sandbox-cds-services); its target (>= 2.5x) is unchecked."
                + (" Its services fit none of the mixes run." if getattr(args, "node_checkout", None) else ""))
    skipped = [f"({r.mix.key}): {node_peer.NOT_MEASURED.get(r.mix.key, 'no service of it fits')}"
               for r in results if r.node is None]
    return ("Node sandbox peer not measured on " + "; ".join(skipped) + ". Its target is unchecked there."
            if skipped else "")


def report(results: list[Result], args: argparse.Namespace) -> str:
    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split("\n")[0].strip()
    lines = [
        f"Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"Machine: {machine()}",
        f"Load: {wrk_version or 'wrk'}, {args.threads} threads; throughput: {args.connections} connections, "
        f"{args.rounds} x {args.duration:g} s per side per mix (alternating), after {args.warmup:g} s warm-up; "
        f"fixed rate: {args.rate_share:g} x the baseline's throughput, {args.fixed_connections} connections, "
        f"{args.fixed_rounds} x {args.duration:g} s per side",
        f"Servers: service `cds-service serve` (gunicorn + granian workers), {WORKERS} workers x {THREADS} threads; "
        f"baselines gunicorn gthread {WORKERS} x {THREADS}; peer FastAPI under uvicorn[standard], {WORKERS} workers"
        + ("; Node sandbox peer one process" if any(r.node for r in results) else ""),
        "",
        "| mix | service req/s | baseline req/s | ratio (target) | CPU-time ratio | peer req/s | service / peer "
        f"(>= {PEER_TARGET:g}) | service p50 / p99 ms | worker CPU ms/req service / baseline / peer "
        "| service worker RSS MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        peer = f"{r.peer.rate:.0f} | {r.peer_ratio:.2f}" if r.peer and r.peer_ratio is not None else "- | -"
        lines.append(
            f"| ({r.mix.key}) {r.mix.title} | {r.service.rate:.0f} | {r.baseline.rate:.0f} "
            f"| {r.ratio:.2f} (>= {r.mix.target:.1f}) | {r.cpu_ratio:.2f} | {peer} "
            f"| {r.service.p50_ms:.1f} / {r.service.p99_ms:.1f} "
            f"| {r.service.cpu_ms:.2f} / {r.baseline.cpu_ms:.2f} / {r.peer.cpu_ms if r.peer else 0:.2f} "
            f"| {_rss(r.service.rss_mb)} |")
    lines += node_table(results, args)
    fixed = [r for r in results if r.p99_ratio is not None]
    if fixed:
        lines += ["", f"| mix | offered req/s | service p50 / p99 ms | baseline p50 / p99 ms "
                      f"| p99 ratio (<= {P99_FACTOR:g}) | late starts service / baseline |",
                  "|---|---:|---:|---:|---:|---:|"]
        for r in fixed:
            assert r.service_fixed and r.baseline_fixed
            lines.append(f"| ({r.mix.key}) | {r.rate:.0f} "
                         f"| {r.service_fixed.p50_ms:.1f} / {r.service_fixed.p99_ms:.1f} "
                         f"| {r.baseline_fixed.p50_ms:.1f} / {r.baseline_fixed.p99_ms:.1f} | {r.p99_ratio:.2f} "
                         f"| {r.service_fixed.late_share:.2%} / {r.baseline_fixed.late_share:.2%} |")
    wrk_cpu = [x for r in results for x in (r.service.wrk_cpu_ms, r.baseline.wrk_cpu_ms)]
    if wrk_cpu:
        lines.append(f"\nwrk's own CPU time: {min(wrk_cpu):.2f}-{max(wrk_cpu):.2f} ms per request. CPU-time ratio = "
                     "(baseline worker + wrk CPU per request) / (service worker + wrk CPU per request).")
    for r in results:
        lines.append(f"Worker RSS MB, mix ({r.mix.key}): baseline {_rss(r.baseline.rss_mb)}"
                     + (f"; peer {_rss(r.peer.rss_mb)}" if r.peer else ""))
    for r in results:
        if r.jwks_fetches is not None:
            lines.append(f"JWKS fetched {r.jwks_fetches} time(s) by the end of mix ({r.mix.key}) (all three sides).")
    for r in results:
        if r.verify_cpu_ms is not None:
            lines.append(f"Mix ({r.mix.key}): one ES384 signature check costs {r.verify_cpu_ms:.2f} ms of CPU here; "
                         f"the authenticated baseline's whole request {r.baseline.cpu_ms:.2f} ms of worker CPU.")
    unmeasured = node_unmeasured(results, args)
    if unmeasured:
        lines.append(unmeasured)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run (default 5)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="measured throughput runs per side per mix, alternating (default 2)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of unmeasured load per side first")
    parser.add_argument("--connections", type=int, default=16, help="throughput runs (default 16)")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads (default 2)")
    parser.add_argument("--fixed-rounds", type=int, default=2,
                        help="open-loop runs per side per mix at the fixed rate (default 2; 0: none)")
    parser.add_argument("--rate-share", type=float, default=0.5,
                        help="the fixed rate as a share of the baseline's throughput (default 0.5)")
    parser.add_argument("--fixed-connections", type=int, default=64, help="open-loop runs (default 64)")
    parser.add_argument("--no-peer", action="store_true", help="leave out the FastAPI peer")
    parser.add_argument("--node-peer", metavar="DIR", default=os.environ.get("BENCH_NODE_PEER") or None,
                        help="a sandbox-cds-services checkout with node_modules installed: measure the Node "
                             "sandbox peer on mixes a and b (default: $BENCH_NODE_PEER; unset: not measured)")
    parser.add_argument("--mixes", default="a,b,c,d", help="which mixes, e.g. a,b (default a,b,c,d)")
    args = parser.parse_args(argv)
    args.mixes = {m.strip() for m in args.mixes.split(",") if m.strip()}
    unknown = args.mixes - {m.key for m in MIXES}
    if unknown or args.rounds < 1 or args.duration <= 0 or args.fixed_rounds < 0 or not 0 < args.rate_share <= 1:
        parser.error(f"unknown mix {sorted(unknown)}" if unknown
                     else "--rounds >= 1, --duration > 0, --fixed-rounds >= 0, 0 < --rate-share <= 1")

    if shutil.which("wrk") is None:
        print("error: the load generator wrk is not installed. Install it with: apt-get install wrk "
              "(Debian/Ubuntu; https://github.com/wg/wrk elsewhere)", file=sys.stderr)
        return 1
    args.node_checkout = None
    if args.node_peer:
        try:
            args.node_checkout = node_peer.checkout(args.node_peer)
        except node_peer.NodePeerError as exc:
            print(f"error: the Node sandbox peer (--node-peer / BENCH_NODE_PEER): {exc}", file=sys.stderr)
            return 1

    workdir = Path(tempfile.mkdtemp(prefix="cds-bench-"))
    bench = Bench(args, workdir)
    failed = False
    try:
        bench.run()
    except BenchError as exc:
        print(f"\nBENCHMARK FAILED: {exc}", file=sys.stderr)
        failed = True
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        failed = True
    finally:
        bench.stop_all()
    if failed:
        print(f"(logs kept in {workdir})", file=sys.stderr)
        return 1
    shutil.rmtree(workdir, ignore_errors=True)

    print("\n" + report(bench.results, args))
    misses = [m for r in bench.results for m in r.misses()]
    if misses:
        print("\nTargets missed:\n  " + "\n  ".join(misses))
        return 3
    node_text = (f"; service / Node sandbox peer >= {node_peer.TARGET:g}"
                 if any(r.node for r in bench.results) else "")
    print(f"\nAll targets met (ratios; p99 at the fixed rate <= {P99_FACTOR:g}x the baseline's; service / peer >= "
          f"{PEER_TARGET:g}{node_text}; worker RSS < {RSS_LIMIT_MB:g} MB).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
