"""POST /cds-services/{id}/feedback: CDS Hooks 2.0 feedback validated, stored all-or-nothing, durable,
safe under several workers (SQLite and PostgreSQL), and a failing database never costs a hook its cards."""

from __future__ import annotations

import copy
import json
import multiprocessing
import os
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import requests
from conftest import free_port, load_fixture
from sqlalchemy import create_engine, select
from test_store import NO_POSTGRES, POSTGRES_ENV, count, postgres_schema_url

from cds_service import create_app
from cds_service.config import Settings
from cds_service.storage.feedback import _OutOfRange, _parse_rfc3339
from cds_service.storage.store import as_utc, cards_issued, feedback


def parse_timestamp(value: str):
    """The parser the feedback endpoint uses; None for what it refuses (out of range included)."""
    try:
        return _parse_rfc3339(value)
    except _OutOfRange:
        return None


HOOK = "order-select-sacroplasty-cpt.json"
SERVICE = "sacroplasty-order-select"
FEEDBACK_URL = f"/cds-services/{SERVICE}/feedback"
REASON = {"system": "urn:cds-sacroplasty:override-reason", "code": "oncology-exception"}


def issue_card(client) -> dict:
    response = client.post(f"/cds-services/{SERVICE}", json=load_fixture(HOOK))
    assert response.status_code == 200
    return response.get_json()["cards"][0]


def accepted(card: dict, index: int = 0, when: str = "2024-05-01T13:20:50.52Z") -> dict:
    return {"card": card["uuid"], "outcome": "accepted",
            "acceptedSuggestions": [{"id": card["suggestions"][index]["uuid"]}], "outcomeTimestamp": when}


def overridden(card_uuid: str, when: str = "2024-05-02T08:00:00Z", **extra) -> dict:
    return {"card": card_uuid, "outcome": "overridden", "outcomeTimestamp": when, **extra}


def rows(url: str, table=feedback) -> list[dict]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return [dict(r) for r in conn.execute(select(table).order_by(*table.primary_key.columns)).mappings()]
    finally:
        engine.dispose()


# --- round trip ------------------------------------------------------------------------------------------

def test_feedback_round_trip_survives_a_restart(tmp_path: Path) -> None:
    settings = Settings(dev=True, database_url=f"sqlite:///{tmp_path / 'feedback.sqlite3'}")
    client = create_app(settings).test_client()
    first, second = issue_card(client), issue_card(client)
    body = {"feedback": [
        accepted(first, index=2),
        overridden(second["uuid"], "2024-05-02T10:00:00+02:00",
                   overrideReason={"reason": {**REASON, "display": "Oncology"}, "userComment": "biopsy-proven"}),
    ]}
    response = client.post(FEEDBACK_URL, json=body)
    assert response.status_code == 200
    assert response.get_json() == {"stored": 2, "duplicates": 0}

    restarted = create_app(settings)  # a new app (a restart) reads what the first one stored
    store = restarted.extensions["cds_store"]
    assert set(store.issued([first["uuid"], second["uuid"]])) == {first["uuid"], second["uuid"]}
    stored = rows(settings.database_url)
    assert len(stored) == 2
    by_card = {r["card_uuid"]: r for r in stored}
    a, o = by_card[first["uuid"]], by_card[second["uuid"]]
    assert a["outcome"] == "accepted" and a["known_card"] is True and a["service_id"] == SERVICE
    assert json.loads(a["accepted_suggestions"]) == [first["suggestions"][2]["uuid"]]
    assert as_utc(a["outcome_timestamp"]) == datetime(2024, 5, 1, 13, 20, 50, 520000, tzinfo=timezone.utc)
    assert o["outcome"] == "overridden" and o["known_card"] is True
    assert (o["override_system"], o["override_code"], o["override_display"]) == (
        REASON["system"], REASON["code"], "Oncology")
    assert o["user_comment"] == "biopsy-proven"
    assert as_utc(o["outcome_timestamp"]) == datetime(2024, 5, 2, 8, 0, tzinfo=timezone.utc)  # offset → UTC
    # the suggestion uuid maps back to the alternative it offered
    suggestions = store.issued([first["uuid"]])[first["uuid"]]["suggestions"]
    assert suggestions[first["suggestions"][2]["uuid"]] in {a.id for a in restarted.extensions["cds_evaluator"]
                                                            .policies[0].alternatives}


def test_unknown_card_is_stored_and_marked(client, settings) -> None:
    response = client.post(FEEDBACK_URL, json={"feedback": [overridden("never-issued-card")]})
    assert response.status_code == 200 and response.get_json()["stored"] == 1
    [row] = rows(settings.database_url)
    assert row["card_uuid"] == "never-issued-card" and row["known_card"] is False


def test_feedback_records_the_service_it_was_sent_to(client, settings) -> None:
    card = issue_card(client)
    response = client.post("/cds-services/sacroplasty-order-sign/feedback", json={"feedback": [accepted(card)]})
    assert response.status_code == 200
    assert [r["service_id"] for r in rows(settings.database_url)] == ["sacroplasty-order-sign"]


def test_resent_feedback_is_not_counted_twice(client, settings) -> None:
    card = issue_card(client)
    body = {"feedback": [accepted(card)]}
    assert client.post(FEEDBACK_URL, json=body).get_json() == {"stored": 1, "duplicates": 0}
    assert client.post(FEEDBACK_URL, json=body).get_json() == {"stored": 0, "duplicates": 1}
    later = {"feedback": [accepted(card, when="2024-05-01T14:00:00Z")]}  # a new answer for the same card
    assert client.post(FEEDBACK_URL, json=later).get_json() == {"stored": 1, "duplicates": 0}
    assert count(settings.database_url, feedback) == 2


def test_spec_examples_are_accepted(client, settings) -> None:
    """The shapes the CDS Hooks 2.0 text and the sandbox send: reason without display, comment only,
    overridden with no reason, several suggestions, extensions."""
    card = issue_card(client)
    body = {"feedback": [
        {**accepted(card), "acceptedSuggestions": [{"id": s["uuid"]} for s in card["suggestions"][:2]]},
        overridden(card["uuid"], overrideReason={"reason": REASON}),
        overridden(card["uuid"], "2024-05-03T00:00:00.123456789Z", overrideReason={"userComment": "see note"}),
        overridden(card["uuid"], "2024-04-12t23:20:50.52z", extension={"org.example": 1}),  # lower-case t, z
    ], "extension": {"org.example.batch": "1"}}
    response = client.post(FEEDBACK_URL, json=body)
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["stored"] == 4 and count(settings.database_url, feedback) == 4


def test_the_pre_2_0_override_shape_is_stored_like_the_2_0_one(client, settings) -> None:
    """Older clients send overrideReason as the Coding itself; it is stored exactly as the 2.0 shape."""
    card = issue_card(client)
    reason = {**REASON, "display": "Oncology exception"}
    new = overridden(card["uuid"], "2024-05-02T08:00:00Z", overrideReason={"reason": reason})
    old = overridden(card["uuid"], "2024-05-03T08:00:00Z", overrideReason=reason)
    response = client.post(FEEDBACK_URL, json={"feedback": [new, old]})
    assert response.status_code == 200 and response.get_json()["stored"] == 2
    stored = rows(settings.database_url)
    columns = ("override_system", "override_code", "override_display", "user_comment", "outcome", "card_uuid")
    assert [tuple(r[c] for c in columns) for r in stored] == \
        [(REASON["system"], REASON["code"], "Oncology exception", None, "overridden", card["uuid"])] * 2


def test_a_bad_pre_2_0_override_is_400_naming_the_field(client, settings) -> None:
    card = issue_card(client)
    body = {"feedback": [overridden(card["uuid"], overrideReason={"code": 7, "system": REASON["system"]})]}
    response = client.post(FEEDBACK_URL, json=body)
    assert response.status_code == 400 and "feedback[0].overrideReason.code" in response.get_data(as_text=True)
    assert count(settings.database_url, feedback) == 0


# --- invalid feedback: 400 naming the entry and field, nothing stored --------------------------------------

def _invalid_cases():
    good = overridden("card-ok")
    yield "missing-outcome", {"feedback": [{k: v for k, v in good.items() if k != "outcome"}]}, "feedback[0].outcome"
    yield "unknown-outcome", {"feedback": [{**good, "outcome": "dismissed"}]}, "feedback[0].outcome"
    yield "reason-not-coding", {"feedback": [{**good, "overrideReason": {"reason": "oncology-exception"}}]}, \
        "feedback[0].overrideReason.reason"
    yield "reason-coding-without-system", {"feedback": [{**good, "overrideReason": {"reason": {"code": "x"}}}]}, \
        "feedback[0].overrideReason.reason.system"
    yield "override-reason-empty", {"feedback": [{**good, "overrideReason": {}}]}, "feedback[0].overrideReason"
    yield "comment-not-string", {"feedback": [{**good, "overrideReason": {"userComment": 5}}]}, \
        "feedback[0].overrideReason.userComment"
    yield "feedback-not-list", {"feedback": good}, "feedback"
    yield "feedback-missing", {"cards": [good]}, "feedback"
    yield "feedback-empty", {"feedback": []}, "feedback"
    yield "body-not-object", [good], "feedback"
    yield "entry-not-object", {"feedback": ["card-ok"]}, "feedback[0]"
    yield "one-valid-one-invalid", {"feedback": [good, {**good, "card": "card-2", "outcome": None}]}, \
        "feedback[1].outcome"
    yield "accepted-without-suggestions", {"feedback": [{**good, "outcome": "accepted"}]}, \
        "feedback[0].acceptedSuggestions"
    yield "suggestion-without-id", {"feedback": [{**good, "outcome": "accepted", "acceptedSuggestions": [{}]}]}, \
        "feedback[0].acceptedSuggestions[0].id"
    yield "suggestions-not-list", {"feedback": [{**good, "outcome": "accepted", "acceptedSuggestions": "s1"}]}, \
        "feedback[0].acceptedSuggestions"
    yield "missing-card", {"feedback": [{k: v for k, v in good.items() if k != "card"}]}, "feedback[0].card"
    yield "card-not-string", {"feedback": [{**good, "card": 42}]}, "feedback[0].card"
    yield "card-empty", {"feedback": [{**good, "card": ""}]}, "feedback[0].card"
    yield "card-too-long", {"feedback": [{**good, "card": "c" * 201}]}, "feedback[0].card"
    yield "missing-timestamp", {"feedback": [{k: v for k, v in good.items() if k != "outcomeTimestamp"}]}, \
        "feedback[0].outcomeTimestamp"
    for label, stamp in [("no-offset", "2024-05-01T13:20:50"), ("date-only", "2024-05-01"),
                         ("not-a-date", "yesterday"), ("month-13", "2024-13-01T00:00:00Z"),
                         ("basic-format", "20240501T132050Z"), ("number", 1714569650)]:
        yield f"timestamp-{label}", {"feedback": [{**good, "outcomeTimestamp": stamp}]}, \
            "feedback[0].outcomeTimestamp"
    yield "null-optional", {"feedback": [{**good, "overrideReason": None}]}, "feedback[0].overrideReason"
    yield "extension-not-object", {"feedback": [{**good, "extension": "x"}]}, "feedback[0].extension"
    # issue 13: bounded values; a UTC time Python cannot hold was a 500
    ahead = (datetime.now(timezone.utc) + timedelta(days=2)).isoformat()
    for label, stamp in [("overflows-utc", "9999-12-31T23:59:59-23:59"), ("year-1", "0001-01-01T00:00:00+00:01"),
                         ("before-2000", "1999-12-31T23:59:59Z"), ("year-9999", "9999-12-31T00:00:00Z"),
                         ("two-days-ahead", ahead)]:
        yield f"timestamp-{label}", {"feedback": [good, {**good, "outcomeTimestamp": stamp}]}, \
            "feedback[1].outcomeTimestamp"
    yield "comment-too-long", {"feedback": [{**good, "overrideReason": {"userComment": "x" * 2001}}]}, \
        "feedback[0].overrideReason.userComment"
    yield "comment-with-escape", {"feedback": [{**good, "overrideReason": {"userComment": "ok\x1b[2J"}}]}, \
        "feedback[0].overrideReason.userComment"
    yield "code-with-tab", {"feedback": [{**good, "overrideReason": {"reason": {**REASON, "code": "\t=1+1"}}}]}, \
        "feedback[0].overrideReason.reason.code"
    yield "card-with-nul", {"feedback": [{**good, "card": "card\x00"}]}, "feedback[0].card"
    yield "too-many-accepted-suggestions", {"feedback": [{**good, "outcome": "accepted", "acceptedSuggestions":
                                                         [{"id": f"s{i}"} for i in range(51)]}]}, \
        "feedback[0].acceptedSuggestions"


INVALID = list(_invalid_cases())


@pytest.mark.parametrize("body,field", [(b, f) for _, b, f in INVALID], ids=[n for n, _, _ in INVALID])
def test_invalid_feedback_is_400_and_nothing_is_stored(client, settings, body, field: str) -> None:
    response = client.post(FEEDBACK_URL, json=copy.deepcopy(body))
    assert response.status_code == 400
    error = response.get_json()
    assert error["error"] == "invalid_request"
    assert error["field"] == field
    assert field in error["message"] or field == "feedback"
    assert count(settings.database_url, feedback) == 0


def test_every_bad_field_is_named(client, settings) -> None:
    body = {"feedback": [overridden("ok"), {"card": 1, "outcome": "maybe", "outcomeTimestamp": "now"},
                         overridden("ok-2", overrideReason={"reason": []})]}
    response = client.post(FEEDBACK_URL, json=body)
    assert response.status_code == 400
    message = response.get_json()["message"]
    for field in ("feedback[1].card", "feedback[1].outcome", "feedback[1].outcomeTimestamp",
                  "feedback[2].overrideReason.reason"):
        assert field in message
    assert "feedback[0]" not in message
    assert count(settings.database_url, feedback) == 0


@pytest.mark.parametrize("data", [b"{not json", b"", b"\xff\xfe", b"[1, 2"])
def test_feedback_that_is_not_json_is_400(client, settings, data: bytes) -> None:
    response = client.post(FEEDBACK_URL, data=data, content_type="application/json")
    assert response.status_code == 400 and response.is_json
    assert count(settings.database_url, feedback) == 0


def test_feedback_not_sent_as_json_is_415(client, settings) -> None:
    response = client.post(FEEDBACK_URL, data=json.dumps({"feedback": [overridden("x")]}), content_type="text/plain")
    assert response.status_code == 415 and response.is_json
    assert count(settings.database_url, feedback) == 0


@pytest.mark.parametrize("text,expected", [
    ("1985-04-12T23:20:50.52Z", datetime(1985, 4, 12, 23, 20, 50, 520000, tzinfo=timezone.utc)),
    ("1985-04-12T23:20:50Z", datetime(1985, 4, 12, 23, 20, 50, tzinfo=timezone.utc)),
    ("1996-12-19T16:39:57-08:00", datetime(1996, 12, 20, 0, 39, 57, tzinfo=timezone.utc)),
    ("2024-05-01T00:00:00.123456789+00:00", datetime(2024, 5, 1, 0, 0, 0, 123456, tzinfo=timezone.utc)),
    ("2024-05-01t00:00:00z", datetime(2024, 5, 1, tzinfo=timezone.utc)),
    ("2024-05-01T00:00:00", None), ("2024-05-01", None), ("2024-02-30T00:00:00Z", None),
    ("2024-05-01T24:00:00Z", None), ("2024-05-01 00:00:00Z", None), (" 2024-05-01T00:00:00Z", None),
])
def test_outcome_timestamp_is_rfc3339(text: str, expected) -> None:
    assert parse_timestamp(text) == expected


def test_a_timestamp_up_to_a_day_ahead_is_accepted(client, settings) -> None:
    """Clocks differ: an outcome a little ahead of ours is fine (the window's upper end is a day ahead)."""
    soon = (datetime.now(timezone.utc) + timedelta(hours=23)).isoformat()
    response = client.post(FEEDBACK_URL, json={"feedback": [overridden("card-1", soon),
                                                            overridden("card-2", "2000-01-01T00:00:00Z")]})
    assert response.status_code == 200 and response.get_json()["stored"] == 2


def test_more_entries_than_the_cap_is_413_and_nothing_is_stored(client, settings) -> None:
    from cds_service.storage.feedback import MAX_ENTRIES

    many = {"feedback": [overridden(f"card-{i}") for i in range(MAX_ENTRIES + 1)]}
    response = client.post(FEEDBACK_URL, json=many)
    assert response.status_code == 413 and response.is_json
    assert response.get_json()["error"] == "too_many_entries" and response.get_json()["field"] == "feedback"
    assert str(MAX_ENTRIES) in response.get_json()["message"]
    assert count(settings.database_url, feedback) == 0
    at_cap = {"feedback": many["feedback"][:MAX_ENTRIES]}
    assert client.post(FEEDBACK_URL, json=at_cap).get_json() == {"stored": MAX_ENTRIES, "duplicates": 0}


@pytest.fixture(params=["sqlite", "postgresql"])
def any_database_url(request, tmp_path: Path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'feedback.sqlite3'}"
    else:
        yield from postgres_schema_url(_postgres_url())


@pytest.mark.parametrize("where", ["comment", "code", "display", "card", "suggestion"])
def test_a_nul_character_is_400_naming_the_field_on_every_database(any_database_url: str, where: str) -> None:
    """PostgreSQL cannot store U+0000: that was a 503 with Retry-After, so a client retried forever."""
    client = create_app(Settings(dev=True, database_url=any_database_url)).test_client()
    card = issue_card(client)
    nul = "see\x00note"
    entry, field = {
        "comment": (overridden(card["uuid"], overrideReason={"userComment": nul}), "overrideReason.userComment"),
        "code": (overridden(card["uuid"], overrideReason={"reason": {**REASON, "code": nul}}),
                 "overrideReason.reason.code"),
        "display": (overridden(card["uuid"], overrideReason={"reason": {**REASON, "display": nul}}),
                    "overrideReason.reason.display"),
        "card": (overridden(nul), "card"),
        "suggestion": ({**accepted(card), "acceptedSuggestions": [{"id": nul}]}, "acceptedSuggestions[0].id"),
    }[where]
    response = client.post(FEEDBACK_URL, json={"feedback": [accepted(card), entry]})
    assert response.status_code == 400, response.get_json()
    assert "Retry-After" not in response.headers
    assert response.get_json()["field"] == f"feedback[1].{field}" and "NUL" in response.get_json()["message"]
    assert count(any_database_url, feedback) == 0
    client.application.extensions["cds_store"].close()  # its card record written before the schema goes


def test_a_value_the_store_refuses_is_400_not_503(any_database_url: str, monkeypatch) -> None:
    """Should validation ever let through a value longer than its column, the store's own check (made from
    the table definition) refuses it before the database does, and the client gets a final 400."""
    import cds_service.storage.feedback as feedback_module

    monkeypatch.setattr(feedback_module, "MAX_CODE", 10_000)  # validation no longer knows the column's length
    client = create_app(Settings(dev=True, database_url=any_database_url)).test_client()
    card = issue_card(client)
    long_code = overridden(card["uuid"], overrideReason={"reason": {**REASON, "code": "c" * 201}})
    response = client.post(FEEDBACK_URL, json={"feedback": [accepted(card), long_code]})
    assert response.status_code == 400, response.get_json()
    assert response.get_json()["field"] == "feedback[1].overrideReason.reason.code"
    assert "Retry-After" not in response.headers
    assert count(any_database_url, feedback) == 0
    client.application.extensions["cds_store"].close()


# --- the database failing ----------------------------------------------------------------------------------

def _unavailable_urls():
    yield "sqlite-unwritable-path", lambda tmp: f"sqlite:///{tmp / 'no-such-dir' / 'db.sqlite3'}"
    yield "postgres-closed-port", lambda tmp: f"postgresql+psycopg://cds:cds@127.0.0.1:{free_port()}/cds"


UNAVAILABLE = list(_unavailable_urls())


@pytest.mark.parametrize("make_url", [m for _, m in UNAVAILABLE], ids=[n for n, _ in UNAVAILABLE])
def test_database_unavailable_hooks_still_answer_feedback_is_503(tmp_path: Path, make_url) -> None:
    url = make_url(tmp_path)
    if url.startswith("postgresql"):
        pytest.importorskip("psycopg", reason="psycopg is not installed (pip install -e '.[postgres]')")
    client = create_app(Settings(dev=True, database_url=url)).test_client()
    for _ in range(2):
        response = client.post(f"/cds-services/{SERVICE}", json=load_fixture(HOOK))
        assert response.status_code == 200
        cards = response.get_json()["cards"]
        assert len(cards) == 1 and cards[0]["suggestions"]
        sign = client.post("/cds-services/sacroplasty-order-sign", json=load_fixture("order-sign-mixed.json"))
        assert sign.status_code == 200 and len(sign.get_json()["cards"]) == 1
    response = client.post(FEEDBACK_URL, json={"feedback": [accepted(cards[0])]})
    assert response.status_code == 503 and response.is_json
    assert response.get_json()["error"] == "database_unavailable"
    assert int(response.headers["Retry-After"]) > 0
    # invalid feedback is still a 400, not a 503: validation comes first
    assert client.post(FEEDBACK_URL, json={"feedback": [{"card": "x"}]}).status_code == 400


def test_real_server_without_its_database_still_answers_hooks(start_server, tmp_path: Path) -> None:
    server = start_server(env={"CDS_DATABASE_URL": f"sqlite:///{tmp_path / 'missing' / 'db.sqlite3'}"})
    response = requests.post(f"{server.url}/cds-services/{SERVICE}", json=load_fixture(HOOK), timeout=10)
    assert response.status_code == 200 and len(response.json()["cards"]) == 1
    card = response.json()["cards"][0]
    response = requests.post(server.url + FEEDBACK_URL, json={"feedback": [accepted(card)]}, timeout=10)
    assert response.status_code == 503 and response.json()["error"] == "database_unavailable"


# --- several processes at once against the real server with several workers --------------------------------

def _client_process(base_url: str, worker: int, rounds: int) -> None:
    """Child process: issue a card, answer it (two entries per request), repeat."""
    with requests.Session() as session:
        for i in range(rounds):
            hook = session.post(f"{base_url}/cds-services/{SERVICE}", json=load_fixture(HOOK), timeout=30)
            assert hook.status_code == 200, hook.text
            card = hook.json()["cards"][0]
            body = {"feedback": [
                accepted(card, index=i % len(card["suggestions"])),
                overridden(card["uuid"], f"2024-05-01T10:{worker:02d}:{i:02d}Z", overrideReason={"reason": REASON}),
            ]}
            response = session.post(base_url + FEEDBACK_URL, json=body, timeout=30)
            assert response.status_code == 200, response.text
            assert response.json() == {"stored": 2, "duplicates": 0}


def _postgres_url():
    base = os.environ.get(POSTGRES_ENV)
    if not base:
        pytest.skip(NO_POSTGRES)
    return base


@pytest.fixture(params=["sqlite", "postgresql"])
def server_database_url(request, tmp_path: Path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'server.sqlite3'}"
    else:
        yield from postgres_schema_url(_postgres_url())


def test_several_processes_post_feedback_at_once(start_server, server_database_url: str) -> None:
    server = start_server(env={"CDS_DATABASE_URL": server_database_url}, workers=3)
    processes, rounds = 6, 10
    context = multiprocessing.get_context("spawn")
    children = [context.Process(target=_client_process, args=(server.url, w, rounds)) for w in range(processes)]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=180)
    assert [c.exitcode for c in children] == [0] * processes
    stored = rows(server_database_url)
    assert len(stored) == processes * rounds * 2
    assert all(r["known_card"] for r in stored)
    deadline = time.monotonic() + 5  # the workers write their card records within moments of answering
    while count(server_database_url, cards_issued) < processes * rounds and time.monotonic() < deadline:
        time.sleep(0.05)
    assert count(server_database_url, cards_issued) == processes * rounds
    assert len({r["card_uuid"] for r in stored}) == processes * rounds


def test_real_server_one_unstorable_card_record_does_not_stop_the_writer(start_server, server_database_url) -> None:
    """Issue 13, finding 4, against the real server: an order text of "sacral" + 300 spaces + "augmentation"
    gave a card whose evidence overflowed its column on PostgreSQL; the worker's writer retried it forever,
    the card records queued behind it were never stored and feedback about them found no card."""
    server = start_server(env={"CDS_DATABASE_URL": server_database_url}, workers=1)  # one writer for all calls
    poison = load_fixture("order-select-sacroplasty-text.json")
    order = poison["context"]["draftOrders"]["entry"][0]["resource"]
    order["code"]["text"] = "sacral" + " " * 300 + "augmentation"
    with requests.Session() as session:
        answer = session.post(f"{server.url}/cds-services/{SERVICE}", json=poison, timeout=10)
        assert answer.status_code == 200
        cards = []
        for _ in range(3):
            hook = session.post(f"{server.url}/cds-services/{SERVICE}", json=load_fixture(HOOK), timeout=10)
            assert hook.status_code == 200
            cards.append(hook.json()["cards"][0])
        response = session.post(server.url + FEEDBACK_URL, json={"feedback": [accepted(c) for c in cards]},
                                timeout=30)
    assert response.status_code == 200 and response.json()["stored"] == 3
    stored = rows(server_database_url)
    assert len(stored) == 3 and all(r["known_card"] for r in stored)  # the cards were recorded, and found
    issued = {r["card_uuid"] for r in rows(server_database_url, cards_issued)}
    assert {c["uuid"] for c in cards} <= issued
