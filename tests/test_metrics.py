"""GET /metrics against the real server with 2 workers (issue 16): every worker's counts in one scrape, off by
default, the token enforced, no patient data in any label or value."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import requests
from conftest import load_fixture
from test_security import CPT, CPT_PATIENT_DATA, SELECT, SIGN, leaked

N = 12  # calls of each kind; with 2 workers, both answer some of them
SIGN_FIXTURE = "order-sign-mixed.json"


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the exposition `text` (0 when absent)."""
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        match = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)", line)
        if not match or match.group(1) != name:
            continue
        found = dict(re.findall(r'([a-zA-Z_]+)="((?:[^"\\]|\\.)*)"', match.group(3) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(match.group(4))
    return 0.0


def answering_processes(log: Path) -> set[int]:
    """The worker processes that logged a hook call (JSON log lines), once the log has them all."""
    deadline = time.monotonic() + 5  # lines are written a few times a second (serving/logs.py)
    while True:
        lines = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines() if line.startswith("{")]
        calls = [line for line in lines if line["logger"] == "cds_service.web.api"]
        if len(calls) >= 4 * N or time.monotonic() > deadline:
            return {line["process"] for line in calls}
        time.sleep(0.1)


def test_counters_equal_the_calls_across_two_workers(start_server, tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    server = start_server(env={"CDS_METRICS": "1", "CDS_LOG_FORMAT": "json", "CDS_TEST_LOG": str(log)},
                          args=["--dev"], workers=2)
    cards = []
    for _ in range(N):
        answer = requests.post(f"{server.url}/cds-services/{SELECT}", json=load_fixture(CPT), timeout=10)
        assert answer.status_code == 200
        cards.append(answer.json()["cards"][0])
        assert requests.post(f"{server.url}/cds-services/{SIGN}", json=load_fixture(SIGN_FIXTURE),
                             timeout=10).status_code == 200
        assert requests.post(f"{server.url}/cds-services/{SELECT}", data=b"{", timeout=10,
                             headers={"Content-Type": "application/json"}).status_code == 400
    for card in cards:
        feedback = {"feedback": [{"card": card["uuid"], "outcome": "overridden",
                                  "outcomeTimestamp": "2024-05-02T08:00:00Z"}]}
        assert requests.post(f"{server.url}/cds-services/{SELECT}/feedback", json=feedback,
                             timeout=10).status_code == 200
    for _ in range(6):  # new connections: the scrape is answered by either worker, and shows both
        text = requests.get(f"{server.url}/metrics", timeout=10).text
        assert sample(text, "cds_hook_calls_total", service=SELECT, hook="order-select", status="200") == N
        assert sample(text, "cds_hook_calls_total", service=SELECT, hook="order-select", status="400") == N
        assert sample(text, "cds_hook_calls_total", service=SIGN, hook="order-sign", status="200") == N
        assert sample(text, "cds_hook_duration_seconds_count", service=SELECT) == 2 * N
        assert sample(text, "cds_feedback_total", outcome="overridden") == N
        assert sample(text, "cds_cards_issued_total") >= N
        assert sample(text, "cds_coverage_decisions_total", covered="not-covered") >= N
    assert len(answering_processes(log)) == 2  # both workers answered some: the scrape merged them
    assert leaked(text) == []
    assert CPT_PATIENT_DATA and not any(value in text for value in CPT_PATIENT_DATA)


def test_metrics_are_off_by_default_on_the_real_server(start_server) -> None:
    server = start_server(args=["--dev"], workers=2)
    assert requests.get(f"{server.url}/metrics", timeout=10).status_code == 404
    assert requests.get(f"{server.url}/health", timeout=10).status_code == 200
    assert requests.get(f"{server.url}/ready", timeout=10).status_code == 200


def test_metrics_token_is_enforced_on_the_real_server(start_server) -> None:
    server = start_server(env={"CDS_METRICS": "on", "CDS_METRICS_TOKEN": "scrape-me"}, args=["--dev"], workers=2)
    assert requests.get(f"{server.url}/metrics", timeout=10).status_code == 401
    assert requests.get(f"{server.url}/metrics", headers={"Authorization": "Bearer nope"},
                        timeout=10).status_code == 401
    answer = requests.get(f"{server.url}/metrics", headers={"Authorization": "Bearer scrape-me"}, timeout=10)
    assert answer.status_code == 200 and "cds_writer_queue_depth" in answer.text
