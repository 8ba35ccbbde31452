"""Operations endpoints in process (issue 16): /health, /ready and its three failures, /metrics off, on and behind
its token, request ids, JSON log lines without patient data. The real server's metrics: tests/test_metrics.py."""

from __future__ import annotations

import io
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, load_fixture
from prometheus_client import REGISTRY
from test_security import CPT, SELECT, hostile_variants, leaked, make_app, post

from cds_service.serving.logs import EXTRA_FIELDS, JsonFormatter, RequestIdFilter, TextFormatter
from cds_service.storage.writer import GroupWriter


def test_health_is_ok_without_touching_the_database(tmp_path: Path) -> None:
    app = make_app(tmp_path, database_url="sqlite:////nonexistent-dir/cds.sqlite3")
    response = app.test_client().get("/health")
    assert response.status_code == 200 and response.get_json() == {"status": "ok"}


def test_ready_when_packs_database_and_writer_are_fine(client) -> None:
    response = client.get("/ready")
    assert response.status_code == 200 and response.get_json() == {"status": "ready"}


def test_ready_is_503_naming_the_database_when_it_is_down(tmp_path: Path) -> None:
    app = make_app(tmp_path, database_url="sqlite:////nonexistent-dir/cds.sqlite3")
    response = app.test_client().get("/ready")
    assert response.status_code == 503
    body = response.get_json()
    assert body["status"] == "unavailable" and body["reason"] == "database"
    assert "nonexistent" not in body["message"]  # no connection details


def test_ready_is_503_when_the_writer_is_backed_up(tmp_path: Path, monkeypatch) -> None:
    app = make_app(tmp_path, ready_max_queue=10)
    monkeypatch.setattr(GroupWriter, "depth", property(lambda self: 11))
    response = app.test_client().get("/ready")
    assert response.status_code == 503 and response.get_json()["reason"] == "writer"
    monkeypatch.setattr(GroupWriter, "depth", property(lambda self: 10))
    assert app.test_client().get("/ready").status_code == 200


def test_a_policy_pack_that_does_not_load_stops_the_service(tmp_path: Path) -> None:
    cards = tmp_path / "cards"
    shutil.copytree(ROOT / "cards", cards)
    (cards / "ccp1247-sacroplasty" / "policy.json").write_text("{", encoding="utf-8")
    result = subprocess.run([sys.executable, "-m", "cds_service.cli", "serve", "--dev", "--port", "1"],
                            env={"PATH": "/usr/bin:/bin", "CDS_CARDS_DIR": str(cards),
                                 "PYTHONPATH": str(ROOT)},
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "error:" in result.stderr and "policy.json" in result.stderr


def test_an_unknown_log_format_stops_the_service(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "cds_service.cli", "serve", "--dev", "--port", "1"],
                            env={"PATH": "/usr/bin:/bin", "CDS_LOG_FORMAT": "xml", "PYTHONPATH": str(ROOT)},
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 2 and "CDS_LOG_FORMAT" in result.stderr


def test_health_and_ready_are_not_in_the_info_log(client, caplog) -> None:
    caplog.set_level(logging.INFO)
    assert client.get("/health").status_code == 200
    assert client.get("/ready").status_code == 200
    assert [r for r in caplog.records if r.levelno >= logging.INFO] == []


# --- /metrics -----------------------------------------------------------------------------------------------

def test_metrics_are_off_by_default(client) -> None:
    response = client.get("/metrics")
    assert response.status_code == 404 and response.get_json()["error"] == "not_found"


def test_metrics_on_count_hook_calls(tmp_path: Path) -> None:
    app = make_app(tmp_path, metrics=True)
    before = REGISTRY.get_sample_value("cds_hook_calls_total",
                                       {"service": SELECT, "hook": "order-select", "status": "200"}) or 0
    assert post(app.test_client(), load_fixture(CPT)).status_code == 200
    response = app.test_client().get("/metrics")
    assert response.status_code == 200 and response.mimetype == "text/plain"
    assert "cds_hook_calls_total" in response.get_data(as_text=True)
    after = REGISTRY.get_sample_value("cds_hook_calls_total",
                                      {"service": SELECT, "hook": "order-select", "status": "200"})
    assert after == before + 1


def test_metrics_token_is_enforced(tmp_path: Path) -> None:
    client = make_app(tmp_path, metrics=True, metrics_token="s3cret-token").test_client()
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Basic s3cret-token"}).status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer s3cret-token"}).status_code == 200


def test_authentication_refusals_are_counted_by_reason(tmp_path: Path) -> None:
    client = make_app(tmp_path, dev=False).test_client()
    before = REGISTRY.get_sample_value("cds_auth_refusals_total", {"reason": "no_token"}) or 0
    assert post(client, load_fixture(CPT)).status_code == 401
    assert REGISTRY.get_sample_value("cds_auth_refusals_total", {"reason": "no_token"}) == before + 1


def test_unknown_service_ids_are_not_labels(tmp_path: Path) -> None:
    client = make_app(tmp_path, metrics=True).test_client()
    assert post(client, load_fixture(CPT), service="pt-sh-1001-Whitfield").status_code == 404
    text = client.get("/metrics").get_data(as_text=True)
    assert "Whitfield" not in text and 'service="unknown"' in text


# --- request ids --------------------------------------------------------------------------------------------

def test_request_id_is_made_when_absent_and_returned(client) -> None:
    first = client.get("/health").headers["X-Request-ID"]
    second = client.get("/health").headers["X-Request-ID"]
    assert first and second and first != second


def test_a_plain_client_request_id_is_kept(client) -> None:
    response = post(client, load_fixture(CPT), headers={"X-Request-ID": "ehr-call.2024-05-01:42"})
    assert response.headers["X-Request-ID"] == "ehr-call.2024-05-01:42"


@pytest.mark.parametrize("hostile", ["tab\tid", "x" * 129, "<script>", "Dolores Whitfield", "-leading"])
def test_a_hostile_client_request_id_is_replaced(client, hostile: str) -> None:
    response = client.get("/health", headers={"X-Request-ID": hostile})
    assert response.headers["X-Request-ID"] != hostile
    assert len(response.headers["X-Request-ID"]) == 36


# --- log formats --------------------------------------------------------------------------------------------

def capture(tmp_path: Path, formatter: logging.Formatter) -> tuple[io.StringIO, logging.Handler]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    handler.addFilter(RequestIdFilter())
    handler.setLevel(logging.DEBUG)
    return stream, handler


def test_json_log_lines_parse_carry_the_fields_and_hold_no_patient_data(tmp_path: Path) -> None:
    app = make_app(tmp_path, log_level="DEBUG")
    stream, handler = capture(tmp_path, JsonFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        client = app.test_client()
        for service, body in hostile_variants():
            post(client, body, service=service, headers={"X-Request-ID": "req-1"})
    finally:
        root.removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert lines
    for line in lines:
        assert {"time", "level", "logger", "message", "request_id"} <= line.keys()
        assert line["request_id"] == "req-1"
    request_lines = [line for line in lines if line["logger"] == "cds_service.web.api"]
    assert {line["status"] for line in request_lines} >= {200, 400}
    answered = next(line for line in request_lines if line["status"] == 200)
    assert set(EXTRA_FIELDS) <= answered.keys()
    assert answered["service"] == SELECT and answered["cards"] == 1
    assert answered["hook_instance"] == "4d864266-9814-5dcc-bfcb-4fa6469715de"
    assert leaked(stream.getvalue()) == []


def test_text_log_lines_end_with_the_request_id(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    stream, handler = capture(tmp_path, TextFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        post(app.test_client(), load_fixture(CPT), headers={"X-Request-ID": "req-2"})
    finally:
        root.removeHandler(handler)
    request_line = next(line for line in stream.getvalue().splitlines() if "status=200" in line)
    assert request_line.endswith(" requestId=req-2")
    assert leaked(stream.getvalue()) == []
