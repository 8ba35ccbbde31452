"""GET /metrics against the real server with 2 workers (issue 16): every worker's counts in one scrape, off by
default, the token enforced, no patient data in any label or value."""

from __future__ import annotations

import atexit
import json
import logging
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
from conftest import load_fixture
from prometheus_client import REGISTRY
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from test_security import CPT, CPT_PATIENT_DATA, SELECT, SIGN, leaked

from cds_service import metrics
from cds_service.fhir import FhirReader
from cds_service.storage.writer import GroupWriter

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

    def calls(_: int) -> None:  # one of each kind; 4 at a time, so that both workers take some
        answer = requests.post(f"{server.url}/cds-services/{SELECT}", json=load_fixture(CPT), timeout=10)
        assert answer.status_code == 200
        feedback = {"feedback": [{"card": answer.json()["cards"][0]["uuid"], "outcome": "overridden",
                                  "outcomeTimestamp": "2024-05-02T08:00:00Z"}]}
        assert requests.post(f"{server.url}/cds-services/{SELECT}/feedback", json=feedback,
                             timeout=10).status_code == 200
        assert requests.post(f"{server.url}/cds-services/{SIGN}", json=load_fixture(SIGN_FIXTURE),
                             timeout=10).status_code == 200
        assert requests.post(f"{server.url}/cds-services/{SELECT}", data=b"{", timeout=10,
                             headers={"Content-Type": "application/json"}).status_code == 400

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(calls, range(N)))
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


# --- the metrics' sources, in process -------------------------------------------------------------------------

def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_writer_depth_and_overflow_drops_are_counted() -> None:
    dropped, errors = value("cds_records_dropped_total", reason="overflow"), value("cds_database_errors_total")
    writer = GroupWriter(lambda jobs: list(jobs), max_parked=2, retry_after=60)  # the database is down
    for _ in range(3):
        writer.submit([{"row": 1}])
        writer.flush(timeout=0.5)
    assert writer.depth == 2  # two parked, one dropped to bound memory
    assert value("cds_records_dropped_total", reason="overflow") == dropped + 1
    assert value("cds_database_errors_total") > errors
    writer.close(timeout=1.0)  # now, not at exit: its "could not be written" line goes to the test's log
    atexit.unregister(writer.close)
    ok = GroupWriter(lambda jobs: [])
    ok.submit([{"row": 1}, {"row": 2}])
    assert ok.flush() and ok.depth == 0


def test_a_refused_fhir_origin_is_counted_and_sends_nothing() -> None:
    before = value("cds_fhir_fetches_total", outcome="refused_origin")
    outcome = FhirReader(["https://allowed.example.org"], 0.5).fetch(
        "https://elsewhere.example.org/fhir", None, {"patient": "Patient/1", "coverage": "Coverage?x=1"}, "h-1")
    assert not outcome.attempted
    assert value("cds_fhir_fetches_total", outcome="refused_origin") == before + 2


def test_labels_are_bounded() -> None:
    assert metrics.auth_reason("unreadable:DecodeError") == "unreadable"
    assert metrics.auth_reason(None) == "no_token"
    assert metrics.fetch_outcome("timed out") == "timeout" and metrics.fetch_outcome("HTTP 500") == "error"
    response = {"systemActions": [{"resource": {"extension": [
        {"url": "http://hl7.org/fhir/us/davinci-crd/StructureDefinition/ext-coverage-information",
         "extension": [{"url": "covered", "valueCode": "not-covered"}]},
        {"url": "x-coverage-information", "extension": [{"url": "covered", "valueCode": "Whitfield"}]}]}}]}
    assert metrics.coverage_values(response) == ["not-covered", "other"]


def test_a_dead_workers_losses_are_read_counted_and_its_file_retired(tmp_path: Path, monkeypatch,
                                                                     caplog) -> None:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    gauges = MmapedDict(str(tmp_path / "gauge_livesum_4242.db"))
    for metric, amount in ((metrics.IN_PROGRESS, 3), (metrics.WRITER_DEPTH, 7)):
        gauges.write_value(mmap_key(metric._name, metric._name, [], [], metric._documentation), amount, 0)
    gauges.close()
    died, records = value("cds_workers_died_total"), value("cds_worker_lost_total", what="records")
    caplog.set_level(logging.ERROR)
    assert metrics.worker_exited(4242) == (False, 3, 7)
    assert value("cds_workers_died_total") == died + 1
    assert value("cds_worker_lost_total", what="records") == records + 7
    assert "worker 4242 exited without a clean stop: lost 3 call(s) in flight and 7 card record(s)" in caplog.text
    assert not (tmp_path / "gauge_livesum_4242.db").exists()
