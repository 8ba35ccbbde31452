"""Restarts under load (issue 16): a bounded load generator on 127.0.0.1 against the real server with 2 workers.

SIGTERM, SIGHUP and --max-requests recycling: every call is answered 2xx or refused at the socket without an
answer (never a 5xx, never a time-out), and every card answered has its record in the database afterwards.
SIGKILL of a worker: the service keeps answering, what the worker held is bounded by the load's concurrency,
and the loss is reported (cds_workers_died_total, cds_worker_lost_total and an ERROR log line).
"""

from __future__ import annotations

import http.client
import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import orjson
import requests
from conftest import load_fixture
from sqlalchemy import create_engine, select
from test_metrics import sample

from cds_service.storage.store import cards_issued

HOOK = "sacroplasty-order-select"
FIXTURE = "order-select-sacroplasty-cpt.json"
THREADS = 8  # concurrent calls at most: the bound on what a killed worker can hold
MAX_CALLS = 4000
MAX_SECONDS = 30.0


class Load:
    """THREADS client threads, each sending one hook call per new connection until stopped, MAX_CALLS in all
    or MAX_SECONDS. Records each outcome: ("ok", card uuids), ("status", code), ("refused", error name: no
    connection), ("dropped", error name: the connection closed without an answer)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.body = orjson.dumps(load_fixture(FIXTURE))
        self.outcomes: list[tuple[str, object]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._deadline = time.monotonic() + MAX_SECONDS
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(THREADS)]
        for thread in self._threads:
            thread.start()

    def _call(self) -> tuple[str, object]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
        try:
            try:
                connection.connect()
            except ConnectionRefusedError:
                return "refused", "ConnectionRefusedError"
            try:
                connection.request("POST", f"/cds-services/{HOOK}", body=self.body,
                                   headers={"Content-Type": "application/json", "Connection": "close"})
                response = connection.getresponse()
                data = response.read()
            except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected,
                    http.client.IncompleteRead) as exc:
                return "dropped", type(exc).__name__
            if response.status != 200:
                return "status", response.status
            return "ok", [card["uuid"] for card in orjson.loads(data)["cards"]]
        finally:
            connection.close()

    def _run(self) -> None:
        while not self._stop.is_set() and time.monotonic() < self._deadline:
            with self._lock:
                if len(self.outcomes) >= MAX_CALLS:
                    return
            outcome = self._call()
            with self._lock:
                self.outcomes.append(outcome)
            if outcome[0] == "refused":
                time.sleep(0.01)

    def answered(self) -> int:
        with self._lock:
            return sum(1 for kind, _ in self.outcomes if kind == "ok")

    def wait_for(self, answered: int) -> None:
        deadline = time.monotonic() + 20
        while self.answered() < answered and time.monotonic() < deadline:
            time.sleep(0.05)
        assert self.answered() >= answered, "the load generator got no answers"

    def stop(self) -> Counter[str]:
        self._stop.set()
        for thread in self._threads:
            thread.join(20)
        return Counter(kind for kind, _ in self.outcomes)

    def cards(self) -> set[str]:
        return {uuid for kind, uuids in self.outcomes if kind == "ok" for uuid in uuids}  # type: ignore[union-attr]


def stored_cards(database: str) -> set[str]:
    engine = create_engine(database)
    try:
        with engine.connect() as conn:
            return set(conn.execute(select(cards_issued.c.card_uuid)).scalars())
    finally:
        engine.dispose()


def workers_of(master: int) -> list[int]:
    """The worker processes of the gunicorn master `master` (by their parent pid in /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == master:
            found.append(int(entry))
    return found


def wait_for_workers(master: int, count: int, other_than: set[int]) -> list[int]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        fresh = [pid for pid in workers_of(master) if pid not in other_than]
        if len(fresh) >= count:
            return fresh
        time.sleep(0.1)
    raise AssertionError("no new workers")


def start(start_server, tmp_path: Path, args: tuple[str, ...] = (), env: dict[str, str] | None = None):
    database = f"sqlite:///{tmp_path / 'lifecycle.sqlite3'}"
    server = start_server(env={"CDS_DATABASE_URL": database, **(env or {})}, args=["--dev", *args], workers=2)
    return server, database


def assert_clean(outcomes: Counter[str], allowed: tuple[str, ...] = ()) -> None:
    assert outcomes["ok"] > 0
    unexpected = {kind: n for kind, n in outcomes.items() if kind != "ok" and kind not in allowed}
    assert unexpected == {}, outcomes


def test_sigterm_finishes_calls_in_flight_and_writes_every_record(start_server, tmp_path: Path) -> None:
    server, database = start(start_server, tmp_path)
    load = Load(server.port)
    load.wait_for(200)
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=40) == 0
    outcomes = load.stop()
    # Calls made after the stop began find no listener (refused) or a closed backlog (dropped, unanswered).
    assert_clean(outcomes, allowed=("refused", "dropped"))
    assert load.cards() <= stored_cards(database)


def test_sighup_reload_loses_no_call_and_no_record(start_server, tmp_path: Path) -> None:
    server, database = start(start_server, tmp_path)
    before = set(workers_of(server.process.pid))
    load = Load(server.port)
    load.wait_for(200)
    server.process.send_signal(signal.SIGHUP)
    wait_for_workers(server.process.pid, 2, other_than=before)
    deadline = time.monotonic() + 30
    while set(workers_of(server.process.pid)) & before and time.monotonic() < deadline:
        time.sleep(0.1)  # the old workers finish their calls and stop
    assert not set(workers_of(server.process.pid)) & before
    load.wait_for(load.answered() + 200)  # the new workers answer
    outcomes = load.stop()
    assert_clean(outcomes)
    server.stop()
    assert load.cards() <= stored_cards(database)


def test_max_requests_recycling_loses_no_call_and_no_record(start_server, tmp_path: Path) -> None:
    server, database = start(start_server, tmp_path, args=("--max-requests", "150", "--max-requests-jitter", "20"))
    before = set(workers_of(server.process.pid))
    load = Load(server.port)
    wait_for_workers(server.process.pid, 2, other_than=before)  # both recycled at least once
    load.wait_for(load.answered() + 100)
    outcomes = load.stop()
    assert_clean(outcomes)
    server.stop()
    assert load.cards() <= stored_cards(database)


def test_a_killed_worker_is_replaced_and_its_loss_is_bounded_and_reported(start_server, tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    server, database = start(start_server, tmp_path, env={"CDS_METRICS": "1", "CDS_TEST_LOG": str(log)})
    master = server.process.pid
    before = workers_of(master)
    load = Load(server.port)
    load.wait_for(300)
    os.kill(before[0], signal.SIGKILL)
    wait_for_workers(master, 1, other_than=set(before))  # gunicorn starts a new one
    load.wait_for(load.answered() + 300)  # and the service keeps answering
    outcomes = load.stop()
    lost = outcomes["dropped"] + outcomes["status"]
    assert_clean(outcomes, allowed=("dropped", "status"))
    assert lost <= THREADS  # at most the calls the killed worker held
    for _ in range(3):
        assert requests.post(f"{server.url}/cds-services/{HOOK}", json=load_fixture(FIXTURE),
                             timeout=10).status_code == 200
    text = requests.get(f"{server.url}/metrics", timeout=10).text
    assert sample(text, "cds_workers_died_total") == 1
    reported_records = sample(text, "cds_worker_lost_total", what="records")
    reported_calls = sample(text, "cds_worker_lost_total", what="calls")
    assert reported_calls <= THREADS
    server.stop()
    missing = load.cards() - stored_cards(database)
    assert len(missing) <= reported_records  # every card record lost was counted
    assert f"worker {before[0]} exited without a clean stop: lost {int(reported_calls)} call(s) in flight and " \
           f"{int(reported_records)} card record(s)" in log.read_text(encoding="utf-8")
