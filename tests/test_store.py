"""The database layer, on SQLite always and on a real PostgreSQL when CDS_TEST_POSTGRES_URL names one.

`database_url` (parametrised: sqlite, postgresql) gives each test an empty database: a fresh SQLite file, or a
fresh schema in the PostgreSQL database (dropped afterwards), so runs never see each other's rows.
"""

from __future__ import annotations

import multiprocessing
import os
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import Column, String, Table, create_engine, func, select, text
from sqlalchemy.engine import make_url

from cds_service.storage import store as store_module
from cds_service.storage.store import Store, StoreUnavailable, cards_issued, feedback, schema_info

POSTGRES_ENV = "CDS_TEST_POSTGRES_URL"
NO_POSTGRES = (f"{POSTGRES_ENV} is not set: PostgreSQL tests skipped (set it to e.g. "
               "postgresql+psycopg://cds:cds@127.0.0.1:5432/cds_test to run them)")


def postgres_schema_url(base: str) -> Iterator[str]:
    """A URL on a new, empty schema of the PostgreSQL database at `base`; the schema is dropped afterwards."""
    pytest.importorskip("psycopg", reason="psycopg is not installed (pip install -e '.[postgres]')")
    schema = "cds_test_" + uuid.uuid4().hex[:12]
    admin = create_engine(base)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = make_url(base).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path: Path) -> Iterator[str]:
    """An empty database: a SQLite file, or (when CDS_TEST_POSTGRES_URL is set) a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.sqlite3'}"
        return
    base = os.environ.get(POSTGRES_ENV)
    if not base:
        pytest.skip(NO_POSTGRES)
    yield from postgres_schema_url(base)


def schema_version(store) -> int | None:
    """The schema version the store recorded (schema_info), after making sure the schema is there."""
    from sqlalchemy import select

    store.ensure_schema()
    with store.engine.connect() as conn:
        return conn.execute(select(store_module.schema_info.c.version)).scalar()


def card_row(card_uuid: str | None = None, **overrides) -> dict:
    row = {
        "card_uuid": card_uuid or str(uuid.uuid4()),
        "service_id": "sacroplasty-order-select",
        "hook": "order-select",
        "hook_instance": str(uuid.uuid4()),
        "issued_at": datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc),
        "policy_id": "ccp-1247-sacroplasty",
        "policy_version": "2021-07",
        "rule": "code",
        "evidence": "CPT 0200T",
        "suggestions": {str(uuid.uuid4()): "facet-joint-injection", str(uuid.uuid4()): "exercise-program"},
    }
    row.update(overrides)
    return row


def feedback_row(card_uuid: str, **overrides) -> dict:
    row = {
        "card_uuid": card_uuid,
        "service_id": "sacroplasty-order-select",
        "known_card": True,
        "outcome": "overridden",
        "accepted_suggestions": [],
        "override_system": "urn:cds-sacroplasty:override-reason",
        "override_code": "oncology-exception",
        "override_display": None,
        "user_comment": None,
        "outcome_timestamp": datetime(2024, 5, 1, 12, 5, tzinfo=timezone.utc),
        "received_at": datetime(2024, 5, 1, 12, 5, 1, tzinfo=timezone.utc),
    }
    row.update(overrides)
    return row


def count(url: str, table: Table) -> int:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(table)).scalar_one()
    finally:
        engine.dispose()


def test_tables_and_schema_version_created_on_first_start(database_url: str) -> None:
    store = Store(database_url)
    store.ensure_schema()
    assert schema_version(store) == store_module.SCHEMA_VERSION
    again = Store(database_url)  # a second start finds everything in place
    again.ensure_schema()
    assert schema_version(again) == store_module.SCHEMA_VERSION
    assert count(database_url, schema_info) == 1


def test_migration_hook_runs_once_per_step(database_url: str, monkeypatch) -> None:
    Store(database_url).ensure_schema()  # a database at the current version
    current = store_module.SCHEMA_VERSION
    calls = []
    extra = Table("migration_probe", store_module.metadata, Column("id", String(10), primary_key=True))
    try:
        def to_v2(conn) -> None:
            calls.append(2)
            conn.execute(text("CREATE TABLE migrated_marker (id INTEGER)"))

        monkeypatch.setattr(store_module, "SCHEMA_VERSION", current + 1)
        monkeypatch.setattr(store_module, "MIGRATIONS", {current: to_v2})
        upgraded = Store(database_url)
        upgraded.ensure_schema()
        assert schema_version(upgraded) == current + 1 and calls == [2]
        assert count(database_url, extra) == 0  # new tables from the current metadata were created too
        Store(database_url).ensure_schema()
        assert calls == [2]
    finally:
        store_module.metadata.remove(extra)


def test_schema_newer_than_code_is_refused(database_url: str, monkeypatch) -> None:
    Store(database_url).ensure_schema()
    monkeypatch.setattr(store_module, "SCHEMA_VERSION", 0)
    with pytest.raises(StoreUnavailable, match="newer"):
        Store(database_url).ensure_schema()


def test_cards_round_trip(database_url: str) -> None:
    store = Store(database_url)
    rows = [card_row(), card_row(issued_at=datetime(2024, 5, 2, 14, 0, tzinfo=timezone(timedelta(hours=2))))]
    store.record_cards(rows)
    issued = store.issued([rows[0]["card_uuid"], rows[1]["card_uuid"], "never-issued"])
    assert set(issued) == {rows[0]["card_uuid"], rows[1]["card_uuid"]}
    assert issued[rows[0]["card_uuid"]]["suggestions"] == rows[0]["suggestions"]
    assert issued[rows[1]["card_uuid"]]["hook_instance"] == rows[1]["hook_instance"]
    stored_at = store_module.as_utc(issued[rows[1]["card_uuid"]]["issued_at"])
    assert stored_at == datetime(2024, 5, 2, 12, 0, tzinfo=timezone.utc)  # kept in UTC


def test_feedback_is_all_or_nothing(database_url: str) -> None:
    store = Store(database_url)
    good = feedback_row("card-1")
    broken = feedback_row("card-2", outcome=None)  # NOT NULL violated by the second row
    with pytest.raises(StoreUnavailable):
        store.add_feedback([good, broken])
    assert count(database_url, feedback) == 0
    assert store.add_feedback([good]) == 1
    assert count(database_url, feedback) == 1


def test_same_feedback_twice_is_stored_once(database_url: str) -> None:
    store = Store(database_url)
    first = feedback_row("card-1")
    later = feedback_row("card-1", outcome_timestamp=datetime(2024, 5, 1, 13, 0, tzinfo=timezone.utc))
    assert store.add_feedback([first, first]) == 1
    assert store.add_feedback([first, later]) == 1  # the retry is skipped, the new answer kept
    assert count(database_url, feedback) == 2


def test_jti_replay_is_detected(database_url: str) -> None:
    store = Store(database_url)
    expires = datetime.now(timezone.utc) + timedelta(minutes=5)
    assert store.remember_jti("https://ehr.example", "jti-1", expires) is True
    assert store.remember_jti("https://ehr.example", "jti-1", expires) is False
    assert store.remember_jti("https://other.example", "jti-1", expires) is True


def test_unreachable_database_keeps_cards_and_recovers(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(store_module, "RETRY_AFTER_SECONDS", 0.2)
    folder = tmp_path / "not-yet"
    url = f"sqlite:///{folder / 'db.sqlite3'}"
    store = Store(url)
    with pytest.raises(StoreUnavailable):
        store.ensure_schema()
    card = card_row()
    store.record_cards([card])  # the hook call that issued it does not fail, nor wait
    assert store.flush(timeout=0.1) is False  # kept, waiting for the database
    with pytest.raises(StoreUnavailable):
        store.add_feedback([feedback_row("card-1")])
    with pytest.raises(StoreUnavailable):
        store.remember_jti("https://ehr.example", "jti-1", datetime.now(timezone.utc))
    folder.mkdir()  # the database comes back
    assert store.flush(timeout=5) is True
    assert count(url, cards_issued) == 1
    assert set(store.issued([card["card_uuid"]])) == {card["card_uuid"]}
    assert store.add_feedback([feedback_row("card-1")]) == 1
    assert store.remember_jti("https://ehr.example", "jti-1", datetime.now(timezone.utc)) is True


def test_cards_queued_at_exit_are_written(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    store = Store(url)
    rows = [card_row() for _ in range(50)]
    for row in rows:
        store.record_cards([row])
    store.close()
    assert count(url, cards_issued) == 50


def test_closed_postgres_port_raises_store_unavailable() -> None:
    pytest.importorskip("psycopg", reason="psycopg is not installed (pip install -e '.[postgres]')")
    from conftest import free_port

    store = Store(f"postgresql+psycopg://cds:cds@127.0.0.1:{free_port()}/cds")
    with pytest.raises(StoreUnavailable):
        store.remember_jti("https://ehr.example", "jti-1", datetime.now(timezone.utc))
    with pytest.raises(StoreUnavailable):
        store.issued(["x"])
    with pytest.raises(StoreUnavailable):
        store.add_feedback([feedback_row("card-1")])


def _write_from_process(url: str, worker: int, rows: int) -> None:
    """Child process: its own Store (racing the others to create the schema), cards then feedback."""
    store = Store(url)
    for i in range(rows):
        card = card_row(f"w{worker}-card-{i}")
        store.record_cards([card])
        store.flush()
        store.add_feedback([feedback_row(card["card_uuid"], outcome="accepted",
                                         accepted_suggestions=[next(iter(card["suggestions"]))])])


def test_several_processes_write_at_once(database_url: str) -> None:
    processes, rows = 5, 20
    context = multiprocessing.get_context("spawn")
    children = [context.Process(target=_write_from_process, args=(database_url, w, rows))
                for w in range(processes)]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=120)
    assert [c.exitcode for c in children] == [0] * processes
    assert count(database_url, cards_issued) == processes * rows
    assert count(database_url, feedback) == processes * rows


def test_same_jti_from_many_threads_at_once_is_new_exactly_once(database_url: str) -> None:
    """Several hook calls carrying one token at the same moment: the writer checks them in one batch."""
    import threading

    store = Store(database_url)
    store.ensure_schema()
    expires = datetime.now(timezone.utc) + timedelta(minutes=5)
    answers: list[bool] = []
    start = threading.Barrier(12)

    def call(jti: str) -> None:
        start.wait()
        answers.append(store.remember_jti("https://ehr.example", jti, expires))

    threads = [threading.Thread(target=call, args=("same" if i % 2 else f"own-{i}",)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(answers) == 12
    assert answers.count(True) == 6 + 1  # six distinct ids, and the shared one once


# --- records the database can never hold (issue 13, finding 4) -----------------------------------------------

def test_a_record_the_database_cannot_hold_is_dropped_at_once_and_never_holds_the_others(
        database_url: str, monkeypatch, caplog) -> None:
    """One hook call's card with an evidence longer than its column (PostgreSQL refused it, the writer retried
    every 2 s forever and every record queued behind it was lost), one with a NUL: both dropped for good,
    logged without their values, counted; the good records around them are stored."""
    monkeypatch.setattr(store_module, "RETRY_AFTER_SECONDS", 0.05)
    store = Store(database_url)
    store.ensure_schema()
    too_long = card_row(evidence="sacral" + " " * 300 + "augmentation")
    with_nul = card_row(evidence="sacral\x00plasty")
    good = [card_row() for _ in range(3)]
    caplog.set_level("ERROR", logger="cds_service.storage.store")
    store.record_cards([good[0], too_long])  # one hook call: a good card and a bad one
    store.record_cards([with_nul])
    store.record_cards(good[1:])  # queued behind them
    assert store.flush(timeout=10) is True  # nothing left waiting for a retry
    everything = [row["card_uuid"] for row in (*good, too_long, with_nul)]
    assert set(store.issued(everything)) == {row["card_uuid"] for row in good}
    assert store.stats["dropped_invalid"] == 2
    logged = caplog.text
    assert "cards_issued" in logged and "evidence" in logged and "too_long" in logged and "nul_character" in logged
    assert too_long["hook_instance"] in logged and with_nul["hook_instance"] in logged
    assert "sacral" not in logged and "augmentation" not in logged  # never the values themselves
    later = card_row()
    store.record_cards([later])  # the writer goes on
    assert store.flush(timeout=10) is True and set(store.issued([later["card_uuid"]])) == {later["card_uuid"]}


def test_a_batch_the_database_refuses_is_written_record_by_record(database_url: str, caplog) -> None:
    """A refusal only the database can find (here a duplicate card uuid): the batch is split, the one
    record dropped as permanent, the others in the same batch stored."""
    store = Store(database_url)
    first = card_row()
    store.record_cards([first])
    assert store.flush(timeout=10) is True
    caplog.set_level("ERROR", logger="cds_service.storage.store")
    duplicate, fresh = card_row(first["card_uuid"]), card_row()
    store.record_cards([duplicate, fresh])  # one job, one transaction
    assert store.flush(timeout=10) is True
    assert set(store.issued([fresh["card_uuid"]])) == {fresh["card_uuid"]}
    assert count(database_url, cards_issued) == 2
    assert store.stats["dropped_invalid"] == 1
    assert "constraint_violation" in caplog.text and duplicate["hook_instance"] in caplog.text


def test_lengths_are_checked_before_the_write_from_the_table_definitions() -> None:
    """Every String column's length comes from the table itself: one character more is refused before
    the database sees it, whatever the database (SQLite would have stored it)."""
    from cds_service.storage.store import TOO_LONG, InvalidRecord, check_record

    limited = [c for c in cards_issued.columns if getattr(c.type, "length", None)]
    assert {c.name for c in limited} >= {"card_uuid", "hook_instance", "evidence", "rule"}
    base = store_module.Store._prepare_card(card_row())
    for column in limited:
        check_record(cards_issued, {**base, column.name: "x" * column.type.length})  # at the limit: fine
        with pytest.raises(InvalidRecord) as refused:
            check_record(cards_issued, {**base, column.name: "x" * (column.type.length + 1)})
        assert (refused.value.table, refused.value.column, refused.value.reason) == \
            ("cards_issued", column.name, TOO_LONG)
        assert "x" * 20 not in str(refused.value)  # the message never carries the value


@pytest.mark.parametrize("column,value,reason", [
    ("hook", "order\x00select", "nul_character"), ("evidence", "a\ud800", "unencodable_text"),
    ("rule", 5, "bad_type"), ("policy_id", None, "missing_value"),
])
def test_other_values_no_database_can_hold_are_refused_before_the_write(column: str, value, reason: str) -> None:
    from cds_service.storage.store import InvalidRecord, check_record

    row = store_module.Store._prepare_card(card_row())
    with pytest.raises(InvalidRecord) as refused:
        check_record(cards_issued, {**row, column: value})
    assert (refused.value.column, refused.value.reason) == (column, reason)
