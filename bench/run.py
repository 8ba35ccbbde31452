"""Benchmark: the CDS service against the framework's own limit, in one run (issue 7).

Starts `cds-service serve` exactly as production does (gunicorn gthread, 2 workers x 4 threads) and, under
the same gunicorn settings, bench/baseline_app.py: a Flask app whose hook route only parses the JSON body
and answers {"cards": []}. Then, for each request mix, drives both with wrk (bench/hook.lua) at 16
connections for a fixed time, alternating service and baseline (S B B S ...) so that a noisy machine
treats both alike, and prints throughput, p50/p99 latency, the ratio service / baseline and each
worker's resident memory.

Mixes (bodies from fixtures/):
  a  order-select, 5 draft orders, none a sacroplasty                     (no card)
  b  order-select, a sacroplasty selected, with prefetch                   (one card)
  c  order-sign, 25 draft orders, one of them a sacroplasty               (one card)
  d  mix a with authentication on: a fresh ES384 JWT (own jti) per request, verified against a JWKS
     served on 127.0.0.1 by this script; the service runs without --dev.

Before the load each mix sends one checked request to each side (right status, right number of cards; for
d also that a call without a token and a replayed token are refused), and after it fails when wrk saw a
socket error or a non-2xx response. Everything listens on 127.0.0.1 only; every server is stopped at the end.

Usage: make bench   (or .venv/bin/python bench/run.py [--duration 8] [--rounds 2] [--mixes a,b,c,d])
Exit status: 0 all targets met, 1 a check failed (wrong answer, non-2xx, server did not start), 3 a target
missed. Needs wrk (Debian: apt-get install wrk); installs nothing itself.
"""

from __future__ import annotations

import argparse
import http.server
import json
import math
import os
import platform
import resource
import shutil
import signal
import socket
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

from cds_service.tools.localserver import free_port, serve_command
from cds_service.tools.signing import generate_key, make_token, public_jwk

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
FIXTURES = ROOT / "fixtures"
LUA = BENCH / "hook.lua"

# cds_service/cli.py `serve`: gunicorn gthread, keepalive 5, timeout 30; the baseline gets the same.
WORKERS = 2
THREADS = 4
KEEPALIVE = 5
TIMEOUT = 30

P99_LIMIT_MS = 25.0
RSS_LIMIT_MB = 120.0
CLIENT_ISS = "https://bench-ehr.example.org"


@dataclass(frozen=True)
class Mix:
    key: str
    title: str
    fixture: str
    cards: int  # cards the service must answer with
    target: float  # minimum throughput ratio service / baseline
    auth: bool = False


MIXES = (
    Mix("a", "order-select, 5 draft orders, no sacroplasty", "bench-order-select-5-orders-no-sacroplasty.json", 0, 0.8),
    Mix("b", "order-select, sacroplasty selected, prefetch", "order-select-sacroplasty-cpt.json", 1, 0.6),
    Mix("c", "order-sign, 25 draft orders, one sacroplasty", "bench-order-sign-25-orders-one-sacroplasty.json", 1, 0.6),
    Mix("d", "mix a + ES384 JWT per request (auth on)", "bench-order-select-5-orders-no-sacroplasty.json", 0, 0.5,
        auth=True),
)


class BenchError(Exception):
    """Something that makes the run's figures meaningless: reported, and the run fails."""


# ---------------------------------------------------------------------------------------------- servers

class Server:
    """A gunicorn master (and its workers) in a subprocess on 127.0.0.1, logging to a file.

    "{port}" in the command and the environment stands for the port chosen here.
    """

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

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until both workers are up (a worker boots after the master binds the port)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BenchError(f"{self.name} exited with status {self.process.returncode}; "
                                 f"log:\n{self.log_tail()}")
            if len(self.workers()) == WORKERS:
                try:
                    with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                        return
                except OSError:
                    pass
            time.sleep(0.1)
        raise BenchError(f"{self.name} did not start within {timeout:.0f} s; log:\n{self.log_tail()}")

    def workers(self) -> list[int]:
        """Pids of the master's child processes (gunicorn workers)."""
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
            self.process.send_signal(signal.SIGTERM)  # gunicorn: graceful stop of master and workers
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


def service_command(dev: bool) -> list[str]:
    """`cds-service serve` as the tests start it (cds_service/tools/localserver.py), with production's threads."""
    return serve_command("{port}", WORKERS, THREADS, ["--dev"] if dev else [])


def baseline_command() -> list[str]:
    return [sys.executable, "-m", "gunicorn", "--bind", "127.0.0.1:{port}", "--workers", str(WORKERS),
            "--worker-class", "gthread", "--threads", str(THREADS), "--keep-alive", str(KEEPALIVE),
            "--timeout", str(TIMEOUT), "--error-logfile", "-", "--log-level", "info",
            "--chdir", str(BENCH), "baseline_app:app"]


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


def check_answer(side: str, mix: Mix, status: int, answer: Any, cards: int) -> None:
    if status != 200 or not isinstance(answer, dict) or not isinstance(answer.get("cards"), list):
        raise BenchError(f"mix {mix.key}: {side} answered {status} {json.dumps(answer)[:300]}")
    if len(answer["cards"]) != cards:
        raise BenchError(f"mix {mix.key}: {side} answered {len(answer['cards'])} card(s), expected {cards}")


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
    cpu_s: float = 0.0  # CPU time the server's workers used during the run
    wrk_cpu_s: float = 0.0  # CPU time wrk itself used


def wrk(url: str, body_file: Path, path: str, seconds: float, connections: int, threads: int,
        tokens: Path | None = None) -> Run:
    command = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds:g}s", "--timeout", "5s",
               "-s", str(LUA), url, "--", str(body_file), path]
    if tokens:
        command += [str(tokens), str(threads)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    line = next((row for row in done.stdout.splitlines() if row.startswith("BENCH ")), None)
    if done.returncode != 0 or line is None:
        raise BenchError(f"wrk failed ({done.returncode}): {done.stdout[-500:]} {done.stderr[-500:]}")
    data = json.loads(line[len("BENCH "):])
    failures = {k: data[k] for k in ("non2xx", "connect", "read", "write", "status", "timeout") if data[k]}
    return Run(data["requests"], data["duration_us"] / 1e6, data["p50_us"] / 1000, data["p99_us"] / 1000, failures)


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
    jwks_fetches: int | None = None
    verify_cpu_ms: float | None = None  # mix d: one ES384 signature check, measured in the same run

    @property
    def ratio(self) -> float:
        return self.service.rate / self.baseline.rate

    @property
    def cpu_ratio(self) -> float:
        """The ratio the machine's CPU time per request predicts (server workers + wrk): what the throughput
        ratio would be on an idle machine, and much steadier than it on a shared one."""
        return (self.baseline.cpu_ms + self.baseline.wrk_cpu_ms) / (self.service.cpu_ms + self.service.wrk_cpu_ms)

    def misses(self) -> list[str]:
        found = []
        if self.ratio < self.mix.target:
            found.append(f"mix {self.mix.key}: ratio {self.ratio:.2f} < {self.mix.target:.2f}")
        if self.service.p99_ms >= P99_LIMIT_MS:
            found.append(f"mix {self.mix.key}: service p99 {self.service.p99_ms:.1f} ms >= {P99_LIMIT_MS:g} ms")
        if any(rss >= RSS_LIMIT_MB for rss in self.service.rss_mb):
            found.append(f"mix {self.mix.key}: a service worker uses {max(self.service.rss_mb):.0f} MB "
                         f">= {RSS_LIMIT_MB:g} MB")
        return found


# ---------------------------------------------------------------------------------------------- the run

class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.servers: list[Server] = []
        self.jwks_server: JwksServer | None = None
        self.signer: Signer | None = None
        self.results: list[Result] = []
        self._baseline_tokens: tuple[Path, int] | None = None
        self._token_files = 0

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

    def service(self, auth: bool) -> Server:
        name = "service-auth" if auth else "service-dev"
        env = {"CDS_DATABASE_URL": f"sqlite:///{self.workdir / (name + '.sqlite3')}", "CDS_DEV": "0"}
        if auth:
            self.signer = self.signer or Signer()
            self.jwks_server = self.jwks_server or JwksServer(self.signer.jwks)
            clients = self.workdir / "clients.json"
            clients.write_text(json.dumps({"clients": [{"iss": CLIENT_ISS, "jwks_url": self.jwks_server.url}]}))
            env.update(CDS_CLIENTS_FILE=str(clients), CDS_PUBLIC_URL="http://127.0.0.1:{port}")
        return self.start(Server(name, service_command(dev=not auth), env, self.workdir))

    def run(self) -> None:
        mixes = [m for m in MIXES if m.key in self.args.mixes]
        baseline = self.start(Server("baseline", baseline_command(), {}, self.workdir))
        plain = [m for m in mixes if not m.auth]
        if plain:
            service = self.service(auth=False)
            for mix in plain:
                self.results.append(self.measure(mix, service, baseline))
            self.stop(service)
        for mix in [m for m in mixes if m.auth]:
            service = self.service(auth=True)
            result = self.measure(mix, service, baseline)
            assert self.signer is not None
            result.verify_cpu_ms = self.signer.verify_cpu_ms()
            self.results.append(result)
            self.stop(service)

    def tokens_needed(self) -> int:
        """Enough single-use tokens for one service run: 1.5 x the service's fastest rate so far (verifying a
        token only slows it down), or 3000 req/s when nothing was measured yet. Running out fails the run."""
        rates = [r.service.rate for r in self.results]
        rate = max(rates) if rates else 3000.0
        return int(math.ceil(rate * 1.5 * self.args.duration)) + 300

    def measure(self, mix: Mix, service: Server, baseline: Server) -> Result:
        body = (FIXTURES / mix.fixture).read_bytes()
        body_file = self.workdir / f"mix-{mix.key}.json"
        body_file.write_bytes(body)
        path = f"/cds-services/{service_ids(service.url)[json.loads(body)['hook']]}"
        aud = service.url + path
        print(f"\n({mix.key}) {mix.title}  [{mix.fixture}, {len(body)} bytes]", flush=True)
        self.check(mix, service.url + path, baseline.url + path, body, aud)

        order = [("service", service), ("baseline", baseline)]  # warm-up, not measured
        for round_ in range(self.args.rounds):  # then S B B S S B ...: drift affects both sides alike
            order += [("service", service), ("baseline", baseline)][:: 1 if round_ % 2 == 0 else -1]
        sides = {"service": Side(), "baseline": Side()}
        for index, (name, server) in enumerate(order):
            warmup = index < 2
            seconds = self.args.warmup if warmup else self.args.duration
            if seconds <= 0:
                continue
            tokens, count = self.tokens(mix, name, aud, seconds) if mix.auth else (None, 0)
            cpu_before, wrk_before = server.cpu_seconds(), _children_cpu()
            run = wrk(server.url, body_file, path, seconds, self.args.connections, self.args.threads, tokens)
            run.cpu_s, run.wrk_cpu_s = server.cpu_seconds() - cpu_before, _children_cpu() - wrk_before
            if run.failures:
                hint = ""
                if tokens and name == "service" and run.requests > count:
                    hint = f" ({run.requests} requests, {count} tokens: the replays were refused)"
                raise BenchError(f"mix {mix.key}: wrk against the {name} saw failures {run.failures}{hint}; "
                                 f"{name} log:\n{server.log_tail()}")
            if not warmup:
                sides[name].runs.append(run)
                print(f"    {name:<8}  {run.requests / run.seconds:8.0f} req/s  p50 {run.p50_ms:6.2f} ms  "
                      f"p99 {run.p99_ms:6.2f} ms  worker CPU {run.cpu_s * 1000 / run.requests:5.2f} ms/req",
                      flush=True)
        sides["service"].rss_mb = service.worker_rss_mb()
        sides["baseline"].rss_mb = baseline.worker_rss_mb()
        result = Result(mix, sides["service"], sides["baseline"],
                        self.jwks_server.hits if mix.auth and self.jwks_server else None)
        print(f"    => ratio {result.ratio:.2f} (target >= {mix.target:.2f}), CPU-time ratio {result.cpu_ratio:.2f}; "
              "worker RSS: service " + ", ".join(f"{x:.0f}" for x in result.service.rss_mb) + " MB, baseline "
              + ", ".join(f"{x:.0f}" for x in result.baseline.rss_mb) + " MB", flush=True)
        return result

    def check(self, mix: Mix, service_url: str, baseline_url: str, body: bytes, aud: str) -> None:
        """One request per side before the load: the right answer, and for an auth mix, auth really on."""
        token = self.signer.token(aud) if mix.auth and self.signer else None
        check_answer("service", mix, *post(service_url, body, token), mix.cards)
        check_answer("baseline", mix, *post(baseline_url, body, token), 0)
        if mix.auth:
            status, _ = post(service_url, body)
            if status != 401:
                raise BenchError(f"mix {mix.key}: the service answered {status} to a call without a token; "
                                 "authentication is not on")
            status, _ = post(service_url, body, token)
            if status != 401:
                raise BenchError(f"mix {mix.key}: the service answered {status} to a replayed token")

    def tokens(self, mix: Mix, side: str, aud: str, seconds: float) -> tuple[Path, int]:
        """The token file for one wrk run: fresh single-use tokens for the service; for the baseline, which
        ignores them, one file reused (the same header size is all that matters)."""
        assert self.signer is not None
        if side == "baseline" and self._baseline_tokens:
            return self._baseline_tokens
        count = int(self.tokens_needed() * seconds / self.args.duration) + 200
        self._token_files += 1
        tokens = self.signer.token_file(aud, count, self.workdir / f"tokens-{mix.key}-{self._token_files}.txt")
        if side == "baseline":
            self._baseline_tokens = (tokens, count)
        return tokens, count


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


def report(results: list[Result], args: argparse.Namespace) -> str:
    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split("\n")[0].strip()
    lines = [
        f"Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"Machine: {machine()}",
        f"Load: {wrk_version or 'wrk'}, {args.threads} threads, {args.connections} connections, "
        f"{args.rounds} x {args.duration:g} s per side per mix (alternating), after {args.warmup:g} s warm-up",
        f"Servers: gunicorn gthread, {WORKERS} workers x {THREADS} threads, keepalive {KEEPALIVE} s",
        "",
        "| mix | service req/s | baseline req/s | ratio (target) | CPU-time ratio | service p50 / p99 ms "
        "| baseline p50 / p99 ms | worker CPU ms/req service / baseline | service worker RSS MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| ({r.mix.key}) {r.mix.title} | {r.service.rate:.0f} | {r.baseline.rate:.0f} "
            f"| {r.ratio:.2f} (>= {r.mix.target:.1f}) | {r.cpu_ratio:.2f} "
            f"| {r.service.p50_ms:.1f} / {r.service.p99_ms:.1f} "
            f"| {r.baseline.p50_ms:.1f} / {r.baseline.p99_ms:.1f} "
            f"| {r.service.cpu_ms:.2f} / {r.baseline.cpu_ms:.2f} "
            f"| {', '.join(f'{x:.0f}' for x in r.service.rss_mb)} |")
    wrk_cpu = [x for r in results for x in (r.service.wrk_cpu_ms, r.baseline.wrk_cpu_ms)]
    if wrk_cpu:
        lines.append(f"\nwrk's own CPU time: {min(wrk_cpu):.2f}-{max(wrk_cpu):.2f} ms per request. CPU-time ratio = "
                     "(baseline worker + wrk CPU per request) / (service worker + wrk CPU per request).")
    baseline_rss = [x for r in results for x in r.baseline.rss_mb]
    if baseline_rss:
        lines.append(f"\nBaseline worker RSS: {min(baseline_rss):.0f}-{max(baseline_rss):.0f} MB.")
    for r in results:
        if r.jwks_fetches is not None:
            lines.append(f"JWKS fetched {r.jwks_fetches} time(s) during mix ({r.mix.key}).")
    for r in results:
        if r.verify_cpu_ms is not None:
            base = r.baseline.cpu_ms + r.baseline.wrk_cpu_ms
            lines.append(
                f"Mix ({r.mix.key}) ceiling: one ES384 signature check costs {r.verify_cpu_ms:.2f} ms of CPU here, "
                f"against {base:.2f} ms for the baseline's whole request (worker + wrk), so even a service doing "
                f"nothing but the baseline's work and that check reaches at most {base / (base + r.verify_cpu_ms):.2f}"
                f" of the baseline (target {r.mix.target:.1f}).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per wrk run (default 8)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="measured runs per side per mix, alternating S B B S (default 2)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of unmeasured load per side first")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="wrk threads (default 2)")
    parser.add_argument("--mixes", default="a,b,c,d", help="which mixes, e.g. a,b (default a,b,c,d)")
    args = parser.parse_args(argv)
    args.mixes = {m.strip() for m in args.mixes.split(",") if m.strip()}
    unknown = args.mixes - {m.key for m in MIXES}
    if unknown or args.rounds < 1 or args.duration <= 0:
        parser.error(f"unknown mix {sorted(unknown)}" if unknown else "--rounds >= 1 and --duration > 0")

    if shutil.which("wrk") is None:
        print("error: the load generator wrk is not installed. Install it with: apt-get install wrk "
              "(Debian/Ubuntu; https://github.com/wg/wrk elsewhere)", file=sys.stderr)
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
    print(f"\nAll targets met (ratios; p99 < {P99_LIMIT_MS:g} ms; worker RSS < {RSS_LIMIT_MB:g} MB).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
