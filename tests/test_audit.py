"""The CRD invocation log: one row per authenticated hook call with its coverage decisions and the response as
sent, nothing of the request body beyond hookInstance and hook; retention pruning; `cds-service audit`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from conftest import load_fixture
from sqlalchemy import create_engine, inspect, text

from cds_service import create_app
from cds_service.config import Settings
from cds_service.storage import store as store_module
from cds_service.storage.store import Store

DISPATCH = "coverage-order-dispatch"
FIXTURE = "order-dispatch-sacroplasty.json"


def logged(app, hook_instance: str | None = None) -> list[dict[str, Any]]:
    store: Store = app.extensions["cds_store"]
    assert store.flush(timeout=10)
    return store.invocations(hook_instance=hook_instance)


def test_a_row_per_call_with_the_decision(app, client) -> None:
    body = load_fixture(FIXTURE)
    response = client.post(f"/cds-services/{DISPATCH}", json=body)
    assert response.status_code == 200
    rows = logged(app, body["hookInstance"])
    assert len(rows) == 1
    row = rows[0]
    assert (row["hook"], row["service_id"], row["status"]) == ("order-dispatch", DISPATCH, 200)
    assert row["client"] is None  # dev mode: no client token
    assert row["received_at"] <= row["answered_at"]
    assertion = next(e["valueString"] for e in response.get_json()["systemActions"][0]["resource"]["extension"]
                     if e["url"].endswith("ext-coverage-information")
                     for e in e["extension"] if e["url"] == "coverage-assertion-id")
    assert row["decisions"] == [{"order": "ServiceRequest/sr-sacro-1", "covered": "not-covered",
                                 "coverage": "Coverage/cov-sh-1001", "assertion_id": assertion,
                                 "pack": "ccp-1247-sacroplasty", "version": row["decisions"][0]["version"]}]
    assert row["decisions"][0]["version"]
    assert json.loads(row["response"]) == response.get_json()  # the response as sent


def test_a_call_without_a_sacroplasty_and_a_bad_call_are_logged_too(app, client) -> None:
    body = load_fixture("order-dispatch-not-sacroplasty.json")
    assert client.post(f"/cds-services/{DISPATCH}", json=body).status_code == 200
    bad = load_fixture(FIXTURE)
    bad["hookInstance"] = "bad-call-1"
    del bad["context"]["dispatchedOrders"]
    assert client.post(f"/cds-services/{DISPATCH}", json=bad).status_code == 400
    assert [(r["status"], r["decisions"]) for r in logged(app, body["hookInstance"])] == [(200, [])]
    [row] = logged(app, "bad-call-1")
    assert row["status"] == 400 and json.loads(row["response"])["field"] == "context.dispatchedOrders"


def test_nothing_of_the_request_body_is_stored_beyond_what_readme_says(app, client) -> None:
    body = load_fixture(FIXTURE)
    client.post(f"/cds-services/{DISPATCH}", json=body)
    [row] = logged(app, body["hookInstance"])
    assert set(row) == {"id", "hook_instance", "hook", "service_id", "client", "request_id", "received_at",
                        "answered_at", "status", "decisions", "response"}
    stored = json.dumps(row, default=str)
    patient, coverage = body["prefetch"]["patient"], body["prefetch"]["coverage"]["entry"][0]["resource"]
    for secret in (patient["name"][0]["family"], patient["identifier"][0]["value"], patient["birthDate"],
                   coverage["subscriberId"], body["fhirAuthorization"]["access_token"], body["fhirServer"],
                   body["context"]["performer"]):
        assert secret not in stored


def test_a_failing_database_never_blocks_an_answer(tmp_path: Path) -> None:
    settings = Settings(dev=True, database_url=f"sqlite:///{tmp_path / 'missing-dir' / 'cds.sqlite3'}")
    client = create_app(settings).test_client()
    response = client.post(f"/cds-services/{DISPATCH}", json=load_fixture(FIXTURE))
    assert response.status_code == 200 and len(response.get_json()["cards"]) == 1


def _row(store: Store, hook_instance: str, received: datetime) -> None:
    store.record_invocation({"hook_instance": hook_instance, "hook": "order-sign", "service_id": "s",
                             "received_at": received, "answered_at": received, "status": 200,
                             "decisions": [], "response": b'{"cards":[]}'})


def test_retention_pruning(settings: Settings) -> None:
    store = Store(settings.database_url)
    now = datetime.now(timezone.utc)
    _row(store, "old", now - timedelta(days=31))
    _row(store, "recent", now - timedelta(days=29))
    assert store.flush(timeout=10)
    assert store.prune_invocations(30) == 1
    assert [r["hook_instance"] for r in store.invocations()] == ["recent"]


def test_the_service_prunes_by_itself(tmp_path: Path) -> None:
    settings = Settings(dev=True, database_url=f"sqlite:///{tmp_path / 'cds.sqlite3'}", audit_retention_days=30)
    app = create_app(settings)
    store: Store = app.extensions["cds_store"]
    _row(store, "old", datetime.now(timezone.utc) - timedelta(days=400))
    assert store.flush(timeout=10)
    assert [r["hook_instance"] for r in store.invocations()] == ["old"]  # no retention known yet
    body = load_fixture(FIXTURE)
    app.test_client().post(f"/cds-services/{DISPATCH}", json=body)  # the call's row brings the retention
    assert [r["hook_instance"] for r in logged(app)] == [body["hookInstance"]]


def test_retention_is_read_from_the_environment() -> None:
    assert Settings.from_env({"CDS_AUDIT_RETENTION_DAYS": "90"}).audit_retention_days == 90
    assert Settings.from_env({}).audit_retention_days == Settings().audit_retention_days > 365


def test_a_schema_1_database_is_migrated_to_hold_the_log(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.sqlite3'}"
    Store(url).ensure_schema()
    engine = create_engine(url)
    with engine.begin() as conn:  # back to what schema 1 was: no invocation log
        conn.execute(text("DROP TABLE invocations"))
        conn.execute(text("UPDATE schema_info SET version = 1"))
    store = Store(url)
    store.ensure_schema()
    assert "invocations" in inspect(engine).get_table_names()
    with engine.connect() as conn:
        assert conn.execute(text("SELECT version FROM schema_info")).scalar() == store_module.SCHEMA_VERSION
    engine.dispose()


def _audit(database_url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cds_service.cli", "audit", *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "CDS_DATABASE_URL": database_url})


def test_audit_looks_a_call_up(app, client, settings: Settings) -> None:
    first, second = load_fixture(FIXTURE), load_fixture("order-dispatch-not-sacroplasty.json")
    for body in (first, second):
        client.post(f"/cds-services/{DISPATCH}", json=body)
    logged(app)
    result = _audit(settings.database_url, "--hook-instance", first["hookInstance"])
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["hook_instance"] for r in rows] == [first["hookInstance"]]
    assert rows[0]["decisions"][0]["order"] == "ServiceRequest/sr-sacro-1"
    everything = _audit(settings.database_url, "--since", "2000-01-01")
    assert len(everything.stdout.splitlines()) == 2
    future = _audit(settings.database_url, "--since", "2999-01-01")
    assert future.returncode == 0 and future.stdout == "" and "no invocation" in future.stderr
    assert _audit(settings.database_url, "--since", "not-a-date").returncode == 2
