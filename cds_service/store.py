"""The database: cards issued, feedback received, and JWT ids already seen (replay protection).

SQLAlchemy Core over embedded SQLite by default (WAL mode, safe for several worker processes) or any
SQLAlchemy URL, such as PostgreSQL for several instances. No patient data is ever stored here.
"""

from __future__ import annotations

import json
import logging
import random
import threading
from datetime import datetime, timezone
from typing import Any, Iterable

from sqlalchemy import (
    Boolean, Column, DateTime, Integer, MetaData, String, Table, Text, create_engine, delete, event, insert,
    select,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1

metadata = MetaData()

schema_info = Table(
    "schema_info", metadata,
    Column("id", Integer, primary_key=True),
    Column("version", Integer, nullable=False),
)

cards_issued = Table(
    "cards_issued", metadata,
    Column("card_uuid", String(64), primary_key=True),
    Column("service_id", String(100), nullable=False),
    Column("hook", String(50), nullable=False),
    Column("hook_instance", String(200), nullable=False, index=True),
    Column("issued_at", DateTime(timezone=True), nullable=False, index=True),
    Column("policy_id", String(100), nullable=False),
    Column("policy_version", String(50), nullable=False),
    Column("rule", String(50), nullable=False),
    Column("evidence", String(200), nullable=False),
    Column("suggestions", Text, nullable=False),  # JSON: suggestion uuid → alternative id
)

feedback = Table(
    "feedback", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("card_uuid", String(64), nullable=False, index=True),
    Column("service_id", String(100), nullable=False),
    Column("known_card", Boolean, nullable=False),
    Column("outcome", String(20), nullable=False),
    Column("accepted_suggestions", Text, nullable=False),  # JSON list of suggestion uuids
    Column("override_system", String(300)),
    Column("override_code", String(200)),
    Column("override_display", String(500)),
    Column("user_comment", Text),
    Column("outcome_timestamp", DateTime(timezone=True), nullable=False),
    Column("received_at", DateTime(timezone=True), nullable=False),
)

seen_jti = Table(
    "seen_jti", metadata,
    Column("iss", String(500), primary_key=True),
    Column("jti", String(500), primary_key=True),
    Column("expires_at", DateTime(timezone=True), nullable=False, index=True),
)


class StoreUnavailable(Exception):
    """The database cannot be reached or refused the operation."""


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 10})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5, pool_timeout=2)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Store:
    """One per process. Creates its tables on first use, so a database that is down at start-up
    does not stop the service from answering hooks."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self._ready = False
        self._lock = threading.Lock()

    def ensure_schema(self) -> None:
        if self._ready:
            return
        with self._lock:
            if self._ready:
                return
            try:
                metadata.create_all(self.engine, checkfirst=True)
                with self.engine.begin() as conn:
                    if conn.execute(select(schema_info.c.version)).first() is None:
                        try:
                            conn.execute(insert(schema_info).values(id=1, version=SCHEMA_VERSION))
                        except IntegrityError:  # another worker recorded it first
                            pass
            except IntegrityError:
                pass  # tables created concurrently by another worker: fine
            except SQLAlchemyError as exc:
                raise StoreUnavailable(type(exc).__name__) from exc
            self._ready = True

    def schema_version(self) -> int | None:
        self.ensure_schema()
        with self.engine.connect() as conn:
            return conn.execute(select(schema_info.c.version)).scalar()

    def _write(self, table: Table, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        self.ensure_schema()
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(table), rows)
        except SQLAlchemyError as exc:
            raise StoreUnavailable(type(exc).__name__) from exc

    def record_cards(self, rows: Iterable[dict[str, Any]]) -> None:
        """Store issued cards: dicts with the columns of cards_issued (suggestions as a dict)."""
        self._write(cards_issued, [
            {**row, "suggestions": json.dumps(row["suggestions"], sort_keys=True)} for row in rows
        ])

    def remember_jti(self, iss: str, jti: str, expires_at: datetime) -> bool:
        """True the first time (iss, jti) is seen; False for a replay. Raises StoreUnavailable."""
        self.ensure_schema()
        try:
            with self.engine.begin() as conn:
                if random.random() < 0.01:
                    conn.execute(delete(seen_jti).where(seen_jti.c.expires_at < utcnow()))
                conn.execute(insert(seen_jti).values(iss=iss, jti=jti, expires_at=expires_at))
            return True
        except IntegrityError:
            return False
        except SQLAlchemyError as exc:
            raise StoreUnavailable(type(exc).__name__) from exc

    def add_feedback(self, rows: list[dict[str, Any]]) -> None:
        """Store feedback entries, all or none (one transaction)."""
        self._write(feedback, [
            {**row, "accepted_suggestions": json.dumps(row["accepted_suggestions"])} for row in rows
        ])

    def issued(self, card_uuids: Iterable[str]) -> dict[str, dict[str, Any]]:
        """The issued-card rows for these uuids (unknown ones are absent)."""
        uuids = list(set(card_uuids))
        if not uuids:
            return {}
        self.ensure_schema()
        try:
            with self.engine.connect() as conn:
                rows = conn.execute(select(cards_issued).where(cards_issued.c.card_uuid.in_(uuids))).mappings()
                return {row["card_uuid"]: {**row, "suggestions": json.loads(row["suggestions"])} for row in rows}
        except SQLAlchemyError as exc:
            raise StoreUnavailable(type(exc).__name__) from exc
