"""The database: cards issued, feedback received, JWT ids already seen (replay protection), and the CRD
invocation log (one row per hook call: what CRD requires servers to retain, see README "Invocation log").

SQLAlchemy Core over embedded SQLite by default (WAL mode, safe for several worker processes) or any
SQLAlchemy URL, such as PostgreSQL for several instances. No patient identifiers or request bodies are
stored here; the free texts are the clinician's optional feedback `userComment`, stored as sent, and the
invocation log's responses as sent (CRD: "retain logs of all CRD-related hook invocations and their
responses"), which hold the orders the service updated; those rows are pruned after CDS_AUDIT_RETENTION_DAYS.

Schema changes: raise SCHEMA_VERSION and add MIGRATIONS[old_version], a function that brings a database at
`old_version` to `old_version + 1` inside the start-up transaction (which holds a lock, so only one worker
migrates). A fresh database gets the current tables straight from `metadata`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    delete,
    event,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import (
    DataError,
    DBAPIError,
    IntegrityError,
    InterfaceError,
    OperationalError,
    SQLAlchemyError,
    StatementError,
)

from cds_service.safetext import printable
from cds_service.storage.writer import GroupWriter, Job

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2

# Longest values the columns hold; feedback validation rejects longer ones with a 400.
MAX_ID = 200        # card and suggestion uuids
MAX_CODE = 200      # override reason code
MAX_SYSTEM = 500    # override reason code system
MAX_DISPLAY = 500   # override reason display

RETRY_AFTER_SECONDS = 2  # after a connection failure, fail fast this long instead of waiting on the database
PURGE_EVERY_SECONDS = 60.0  # expired JWT ids are deleted at most this often (per process)
_PG_LOCK_KEY = 0x0CD5_1247  # advisory lock serialising schema creation / migration across workers

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
    Column("card_uuid", String(MAX_ID), nullable=False, index=True),
    Column("service_id", String(100), nullable=False),
    Column("known_card", Boolean, nullable=False),
    Column("outcome", String(20), nullable=False),
    Column("accepted_suggestions", Text, nullable=False),  # JSON list of suggestion uuids
    Column("override_system", String(MAX_SYSTEM)),
    Column("override_code", String(MAX_CODE)),
    Column("override_display", String(MAX_DISPLAY)),
    Column("user_comment", Text),
    Column("outcome_timestamp", DateTime(timezone=True), nullable=False, index=True),
    Column("received_at", DateTime(timezone=True), nullable=False),
    # sha256 of the entry: a client re-sending the same feedback (a retry) does not count twice
    Column("fingerprint", String(64), nullable=False, unique=True),
)

seen_jti = Table(
    "seen_jti", metadata,
    Column("iss", String(500), primary_key=True),
    Column("jti", String(500), primary_key=True),
    Column("expires_at", DateTime(timezone=True), nullable=False, index=True),
)


invocations = Table(
    "invocations", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("hook_instance", String(200), index=True),  # null when the request had none (a 400)
    Column("hook", String(50)),
    Column("service_id", String(100), nullable=False),
    Column("client", String(500)),  # the JWT `iss` of the CDS client; null in dev mode
    Column("request_id", String(100)),
    Column("received_at", DateTime(timezone=True), nullable=False, index=True),
    Column("answered_at", DateTime(timezone=True), nullable=False),
    Column("status", Integer, nullable=False),
    Column("decisions", Text, nullable=False),  # JSON list: order, covered, assertion id, pack, version
    Column("response", Text, nullable=False),  # the response body as sent
)

MIGRATIONS: dict[int, Callable[[Connection], None]] = {
    1: lambda conn: invocations.create(conn, checkfirst=True),  # schema 2: the invocation log
}
PRUNE_EVERY_SECONDS = 3600.0  # invocation log rows beyond the retention are deleted at most this often


class _Invocations(list[dict[str, Any]]):
    """A writer job's payload of invocation log rows (a list of card rows is the other kind)."""


class StoreUnavailable(Exception):
    """The database cannot be reached or refused the operation. `retryable`: the same write may succeed
    later (the database was down or busy), as opposed to a record it can never hold (InvalidRecord)."""

    def __init__(self, message: str, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class InvalidRecord(StoreUnavailable):
    """A record the database can never hold: a permanent error for that record, never worth a retry.

    `column` is the column at fault ("-" when the database did not say),
    `reason` one of TOO_LONG, NUL_CHARACTER, UNENCODABLE, BAD_TYPE, MISSING, CONSTRAINT, REFUSED.
    The message names the table, column and reason only, never the value (it may be patient data)."""

    def __init__(self, table: str, column: str, reason: str, index: int | None = None) -> None:
        super().__init__(f"{table}.{column}: {reason}", retryable=False)
        self.table, self.column, self.reason, self.index = table, column, reason, index


# Why a record cannot be stored (the reason categories logged and counted).
TOO_LONG = "too_long"                # longer than its column
NUL_CHARACTER = "nul_character"      # PostgreSQL text cannot hold U+0000
UNENCODABLE = "unencodable_text"     # an unpaired surrogate: not valid UTF-8
BAD_TYPE = "bad_type"                # not the column's type
MISSING = "missing_value"            # NULL in a NOT NULL column
CONSTRAINT = "constraint_violation"  # found by the database (unique, not null, check)
REFUSED = "refused_by_database"      # a value the database refused (found by the database)


def _value_problem(column: Column, value: Any) -> str | None:
    """Why `value` cannot go into `column` (its type and length from the table definition), or None."""
    if value is None:
        return None if column.nullable else MISSING
    kind = column.type
    if isinstance(kind, String):  # Text included (a String without a length)
        return _text_problem(value, kind.length)
    if isinstance(kind, DateTime):
        return _moment_problem(value)
    if isinstance(kind, Boolean):
        return None if isinstance(value, bool) else BAD_TYPE
    if isinstance(kind, Integer):
        return None if isinstance(value, int) and not isinstance(value, bool) else BAD_TYPE
    return None


def _text_problem(value: Any, length: int | None) -> str | None:
    """_value_problem for a String column that is given a value."""
    if not isinstance(value, str):
        return BAD_TYPE
    if length is not None and len(value) > length:
        return TOO_LONG
    if "\x00" in value:
        return NUL_CHARACTER
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return UNENCODABLE
    return None


def _moment_problem(value: Any) -> str | None:
    """_value_problem for a DateTime column that is given a value."""
    return None if isinstance(value, datetime) else BAD_TYPE


def _column_check(column: Column) -> Callable[[Any], str | None]:
    """`_value_problem` for one column, its type and length read once: check_record runs twice per hook call
    (the card and invocation rows), and walking each column's type there was a third of its cost."""
    kind = column.type
    typed: Callable[[Any], str | None]
    if isinstance(kind, String):
        typed = functools.partial(_text_problem, length=kind.length)
    elif isinstance(kind, DateTime):
        typed = _moment_problem
    else:
        return lambda value: _value_problem(column, value)
    missing = None if column.nullable else MISSING

    def check(value: Any) -> str | None:
        return missing if value is None else typed(value)
    return check


_CHECKS: dict[Table, tuple[tuple[str, bool, Callable[[Any], str | None]], ...]] = {}


def _table_checks(table: Table) -> tuple[tuple[str, bool, Callable[[Any], str | None]], ...]:
    """Per column of `table`: its name, whether the database assigns it when None, and its check; made once."""
    checks = _CHECKS.get(table)
    if checks is None:
        checks = _CHECKS[table] = tuple(
            (column.name, bool(column.primary_key and isinstance(column.type, Integer)), _column_check(column))
            for column in table.columns)
    return checks


def check_record(table: Table, row: dict[str, Any], index: int | None = None) -> dict[str, Any]:
    """`row` with exactly the columns of `table` (absent nullable ones as None), checked against the table's
    column types and lengths before it goes near the database. Raises InvalidRecord for the first problem."""
    checked = {}
    for name, assigned, check in _table_checks(table):
        value = row.get(name)
        if value is None and assigned:
            continue  # assigned by the database
        reason = check(value)
        if reason is not None:
            raise InvalidRecord(table.name, name, reason, index)
        checked[name] = value
    return checked


def _permanent(exc: BaseException) -> str | None:
    """The reason category when `exc` says the data can never be written (retrying cannot help), else None
    (a connection-level failure: the same write may succeed later)."""
    if isinstance(exc, InvalidRecord):
        return exc.reason
    if isinstance(exc, IntegrityError):
        return CONSTRAINT
    if isinstance(exc, DataError):
        return REFUSED
    if isinstance(exc, StatementError) and not isinstance(exc, DBAPIError):
        return BAD_TYPE  # SQLAlchemy could not bind the value (it never reached the database)
    if isinstance(exc, UnicodeError):
        return UNENCODABLE
    if isinstance(exc, (TypeError, ValueError)):
        return BAD_TYPE
    return None


# json.dumps(v, sort_keys=True) builds an encoder per call; one made once writes the same text.
_SORTED_JSON = json.JSONEncoder(sort_keys=True).encode


def _log_id(value: Any, limit: int = 80) -> str:
    """A client-chosen id made safe for one log line: cut to `limit`, control characters escaped."""
    return printable(value[:limit]) if isinstance(value, str) else "-"


class _SchemaTooNew(Exception):
    pass


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


def make_engine(url: str) -> Engine:
    """An engine for `url`: SQLite in WAL mode with a busy timeout, or a small pool for a server database."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 10})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    connect_args: dict[str, Any] = {}
    if make_url(url).get_driver_name() in ("psycopg", "psycopg2"):
        connect_args["connect_timeout"] = 3  # an unreachable host must not hold hook calls for long
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5, pool_timeout=2,
                         connect_args=connect_args)


def safe_url(url: str) -> str:
    """The URL with any password masked, for messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - an unparsable URL is shown by scheme only
        return url.split(":", 1)[0] + ":…"


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def as_utc(moment: datetime) -> datetime:
    """Aware UTC datetime. SQLite hands back naive values, which this store always writes in UTC."""
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)


def feedback_fingerprint(row: dict[str, Any]) -> str:
    """Identity of one feedback entry: the same entry sent twice is stored once."""
    key = [row["service_id"], row["card_uuid"], row["outcome"], list(row["accepted_suggestions"]),
           row.get("override_system"), row.get("override_code"), row.get("override_display"),
           row.get("user_comment"), as_utc(row["outcome_timestamp"]).isoformat()]
    return hashlib.sha256(json.dumps(key, separators=(",", ":")).encode("utf-8")).hexdigest()


class Store:
    """One per process. Creates its tables on first use, so a database that is down at start-up
    does not stop the service from answering hooks."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self._ready = False
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._next_purge = 0.0
        self._next_prune = 0.0
        self.audit_retention_days: int | None = None  # set by the caller (web/api.py) from the settings
        # Cards issued and the invocation log are written by one thread per process, many per transaction.
        self._writer = GroupWriter(self._write_batch, name="db-writer", retry_after=RETRY_AFTER_SECONDS)

    # --- failure handling -------------------------------------------------------------------------------

    def _check_available(self) -> None:
        if time.monotonic() < self._down_until:
            raise StoreUnavailable("database unreachable a moment ago; not retried yet")

    def _unavailable(self, exc: SQLAlchemyError, table: Table | None = None) -> StoreUnavailable:
        """Translate a database error: InvalidRecord when the data is at fault (permanent), else
        StoreUnavailable (retryable); after a connection failure, fail fast for a short while."""
        if isinstance(exc, (OperationalError, InterfaceError)) and "locked" not in str(exc.orig):
            self._down_until = time.monotonic() + RETRY_AFTER_SECONDS
        reason = _permanent(exc)
        if reason is not None:
            return InvalidRecord(table.name if table is not None else "-", "-", reason)
        return StoreUnavailable(type(exc).__name__)

    # --- schema -----------------------------------------------------------------------------------------

    def ensure_schema(self) -> None:
        """Create missing tables, record or migrate the schema version. Raises StoreUnavailable."""
        if self._ready:
            return
        with self._lock:
            if self._ready:
                return
            self._check_available()
            error: SQLAlchemyError | None = None
            for _attempt in range(3):  # workers racing to create the tables: the loser retries and finds them
                try:
                    with self.engine.begin() as conn:
                        self._lock_schema(conn)
                        metadata.create_all(conn, checkfirst=True)
                        self._migrate(conn)
                    self._ready = True
                    return
                except _SchemaTooNew as exc:
                    raise StoreUnavailable(str(exc)) from exc
                except SQLAlchemyError as exc:
                    error = exc
                    if not (isinstance(exc, IntegrityError) or "already exists" in str(getattr(exc, "orig", exc))):
                        break
            assert error is not None
            raise self._unavailable(error) from error

    @staticmethod
    def _lock_schema(conn: Connection) -> None:
        """Hold a database-wide lock for the start-up transaction, so one worker creates / migrates at a time."""
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
        elif conn.dialect.name == "sqlite":
            raw = conn.connection.dbapi_connection
            if raw is not None and not raw.in_transaction:
                conn.exec_driver_sql("BEGIN IMMEDIATE")

    @staticmethod
    def _migrate(conn: Connection) -> None:
        version = conn.execute(select(schema_info.c.version).where(schema_info.c.id == 1)).scalar()
        if version is None:  # fresh database: create_all just made the current schema
            conn.execute(insert(schema_info).values(id=1, version=SCHEMA_VERSION))
            return
        if version > SCHEMA_VERSION:
            raise _SchemaTooNew(f"database schema version {version} is newer than this service's "
                                f"{SCHEMA_VERSION}; upgrade the service")
        for step in range(version, SCHEMA_VERSION):
            log.warning("migrating database schema from version %d to %d", step, step + 1)
            MIGRATIONS[step](conn)
        if version != SCHEMA_VERSION:
            conn.execute(update(schema_info).where(schema_info.c.id == 1).values(version=SCHEMA_VERSION))


    # --- writes -----------------------------------------------------------------------------------------

    def _write(self, table: Table, rows: list[dict[str, Any]]) -> None:
        """Insert `rows` in one transaction. Raises InvalidRecord (the data is at fault) or StoreUnavailable."""
        if not rows:
            return
        self.ensure_schema()
        self._check_available()
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(table), rows)
        except SQLAlchemyError as exc:
            raise self._unavailable(exc, table) from exc
        except (TypeError, ValueError) as exc:  # a driver refusing a value before it reached the database
            raise InvalidRecord(table.name, "-", _permanent(exc) or BAD_TYPE) from exc

    @property
    def writer_depth(self) -> int:
        """Records waiting in this process's writer (queued, being written, or parked while the database is away)."""
        return self._writer.depth

    @property
    def stats(self) -> dict[str, int]:
        """This process's writer counters (see GroupWriter.stats): dropped_invalid counts the card records
        refused for good because the database could never hold them."""
        return self._writer.stats

    def _drop(self, row: dict[str, Any], error: InvalidRecord) -> None:
        """Give up on one card record for good: logged without its values, counted."""
        self._writer.count("dropped_invalid")
        log.error("card record not stored, permanently (not retried): hookInstance=%s table=%s column=%s "
                  "reason=%s", _log_id(row.get("hook_instance")), error.table, error.column, error.reason)

    def record_cards(self, rows: Iterable[dict[str, Any]]) -> None:
        """Queue issued cards for the writer: dicts with the columns of cards_issued (suggestions as a dict).

        Returns at once and never raises: the hook call that issued the cards does not wait for the
        database. While the database is down the rows are kept and written when it is back (see writer.py).
        """
        prepared = []
        for row in rows:
            try:
                prepared.append(check_record(cards_issued, self._prepare_card(row)))
            except InvalidRecord as exc:  # checked here, against the column lengths, not found by the database
                self._drop(row, exc)
        if prepared:
            self._writer.submit(prepared)

    @staticmethod
    def _prepare_card(row: dict[str, Any]) -> dict[str, Any]:
        """The row as stored: issued_at in UTC, suggestions as JSON. Raises InvalidRecord for bad types."""
        prepared = dict(row)
        for name, convert in (("issued_at", as_utc), ("suggestions", _SORTED_JSON)):
            try:
                prepared[name] = convert(row[name])
            except (KeyError, AttributeError, TypeError, ValueError, OverflowError):
                raise InvalidRecord(cards_issued.name, name, MISSING if row.get(name) is None else BAD_TYPE
                                    ) from None
        return prepared

    def record_invocation(self, row: dict[str, Any], retention_days: int | None = None) -> None:
        """Queue one invocation log row (the columns of `invocations`; decisions as a list, response as bytes
        or text). Returns at once and never raises: a failing database never blocks or fails an answer."""
        if retention_days is not None:
            self.audit_retention_days = retention_days
        try:
            prepared = dict(row)
            prepared["decisions"] = _SORTED_JSON(row.get("decisions") or [])
            response = row.get("response", b"")
            prepared["response"] = response.decode("utf-8", "replace") if isinstance(response, bytes) \
                else str(response)
            for name in ("received_at", "answered_at"):
                prepared[name] = as_utc(row[name])
            prepared = check_record(invocations, prepared)
        except InvalidRecord as exc:
            self._drop(row, exc)
            return
        except (KeyError, AttributeError, TypeError, ValueError, OverflowError):
            self._drop(row, InvalidRecord(invocations.name, "-", BAD_TYPE))
            return
        self._writer.submit(_Invocations([prepared]))

    def invocations(self, hook_instance: str | None = None, since: datetime | None = None,
                    limit: int = 1000) -> list[dict[str, Any]]:
        """Invocation log rows, oldest first, for `cds-service audit`. Raises StoreUnavailable."""
        self.ensure_schema()
        self._check_available()
        query = select(invocations).order_by(invocations.c.received_at, invocations.c.id).limit(limit)
        if hook_instance is not None:
            query = query.where(invocations.c.hook_instance == hook_instance)
        if since is not None:
            query = query.where(invocations.c.received_at >= as_utc(since))
        try:
            with self.engine.connect() as conn:
                return [{**row, "decisions": json.loads(row["decisions"])} for row in conn.execute(query).mappings()]
        except SQLAlchemyError as exc:
            raise self._unavailable(exc) from exc

    def prune_invocations(self, retention_days: int, now: datetime | None = None) -> int:
        """Delete invocation log rows received more than `retention_days` ago; how many went."""
        self.ensure_schema()
        self._check_available()
        cutoff = as_utc(now or utcnow()) - timedelta(days=retention_days)
        try:
            with self.engine.begin() as conn:
                return int(conn.execute(delete(invocations).where(invocations.c.received_at < cutoff)).rowcount or 0)
        except SQLAlchemyError as exc:
            raise self._unavailable(exc) from exc

    def remember_jti(self, iss: str, jti: str, expires_at: datetime) -> bool:
        """True the first time (iss, jti) is seen; False for a replay. Raises StoreUnavailable, or its
        subclass InvalidRecord for an id the table cannot hold.

        One short transaction on the calling thread: the call must wait for the commit anyway, and handing the
        id to the writer thread and back cost three times the statement itself (bench/RESULTS.md, issue 17)."""
        self._check_available()
        check_record(seen_jti, {"iss": iss, "jti": jti, "expires_at": expires_at})
        self.ensure_schema()
        row = {"iss": iss, "jti": jti, "expires_at": as_utc(expires_at)}
        dialect = self.engine.dialect.name
        try:
            with self.engine.begin() as conn:
                if time.monotonic() >= self._next_purge:
                    self._next_purge = time.monotonic() + PURGE_EVERY_SECONDS
                    conn.execute(delete(seen_jti).where(seen_jti.c.expires_at < utcnow()))
                if dialect in ("sqlite", "postgresql"):
                    return conn.execute(_claim_jti(dialect), row).first() is not None
            return self._insert_jti_alone(row)  # no ON CONFLICT in this database: a duplicate is an error
        except SQLAlchemyError as exc:
            raise self._unavailable(exc) from exc

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until the cards queued by this process are written. False on time-out, or while the
        database is down and rows wait for it."""
        return self._writer.flush(timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued, then stop the writer (a worker's exit)."""
        self._writer.close(timeout)

    def _write_batch(self, jobs: Sequence[Job]) -> list[Job]:
        """The writer's work for one batch; returns the card jobs to try again later."""
        again: list[Job] = []
        logged = [job for job in jobs if isinstance(job.payload, _Invocations)]
        if logged:
            again += self._write_rows(invocations, logged)
            self._prune_if_due()
        cards = [job for job in jobs if not isinstance(job.payload, _Invocations)]
        if cards:
            again += self._write_rows(cards_issued, cards)
        return again

    def _prune_if_due(self) -> None:
        """The service prunes its invocation log itself, at most every PRUNE_EVERY_SECONDS per process."""
        if self.audit_retention_days is None or time.monotonic() < self._next_prune:
            return
        self._next_prune = time.monotonic() + PRUNE_EVERY_SECONDS
        try:
            gone = self.prune_invocations(self.audit_retention_days)
        except StoreUnavailable as exc:
            log.warning("invocation log not pruned (%s); tried again later", exc)
            return
        if gone:
            log.info("invocation log: %d row(s) older than %d days pruned", gone, self.audit_retention_days)

    def _write_rows(self, table: Table, jobs: Sequence[Job]) -> list[Job]:
        try:
            self._write(table, [row for job in jobs for row in job.payload])
        except InvalidRecord:
            return self._write_one_by_one(jobs, table)  # find the bad record(s); store all the others
        except StoreUnavailable as exc:
            rows = sum(len(job.payload) for job in jobs)
            log.warning("database unavailable (%s): %d %s record(s) kept for a later try", exc, rows, table.name)
            return list(jobs)
        return []

    def _write_one_by_one(self, cards: Sequence[Job], table: Table = cards_issued) -> list[Job]:
        """After a batch was refused for its data: each record in a transaction of its own, dropping only those
        the database refuses. Returns the jobs (holding their unwritten records) to try again later when the
        database goes away meanwhile."""
        for position, job in enumerate(cards):
            rows = list(job.payload)
            for index, row in enumerate(rows):
                try:
                    self._write(table, [row])
                except InvalidRecord as exc:
                    self._drop(row, exc)
                except StoreUnavailable as exc:
                    job.payload = _Invocations(rows[index:]) if isinstance(job.payload, _Invocations) \
                        else rows[index:]
                    again = list(cards[position:])
                    log.warning("database unavailable (%s): %d card record(s) kept for a later try", exc,
                                sum(len(j.payload) for j in again))
                    return again
        return []

    def _insert_jti_alone(self, row: dict[str, Any]) -> bool:
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(seen_jti), row)
            return True
        except IntegrityError:
            return False

    def add_feedback(self, rows: list[dict[str, Any]]) -> int:
        """Store feedback entries, all or none (one transaction); returns how many were new.

        Rows: the columns of `feedback` except id and fingerprint, accepted_suggestions as a list.
        An entry identical to one already stored (a client retry) is skipped, not duplicated.
        Raises InvalidRecord (with the index of the entry) when a value cannot be stored, whatever the
        database: checked against the column types and lengths first; StoreUnavailable when the database is.
        """
        if not rows:
            return 0
        self.ensure_schema()
        self._check_available()
        prepared = [check_record(feedback, self._prepare_feedback(index, row), index)
                    for index, row in enumerate(rows)]
        try:
            try:
                return self._insert_feedback(prepared)
            except IntegrityError:
                # databases without ON CONFLICT: a concurrent copy of an entry won; a second pass skips it
                return self._insert_feedback(prepared)
        except SQLAlchemyError as exc:
            raise self._unavailable(exc, feedback) from exc
        except (TypeError, ValueError) as exc:  # a driver refusing a value before it reached the database
            raise InvalidRecord(feedback.name, "-", _permanent(exc) or BAD_TYPE) from exc

    @staticmethod
    def _prepare_feedback(index: int, row: dict[str, Any]) -> dict[str, Any]:
        """The row as stored (times in UTC, suggestions as JSON, its fingerprint). Raises InvalidRecord."""
        try:
            return {**row, "outcome_timestamp": as_utc(row["outcome_timestamp"]),
                    "received_at": as_utc(row["received_at"]), "fingerprint": feedback_fingerprint(row),
                    "accepted_suggestions": json.dumps(list(row["accepted_suggestions"]))}
        except (KeyError, AttributeError, TypeError, ValueError, OverflowError):
            raise InvalidRecord(feedback.name, "-", BAD_TYPE, index) from None

    def _insert_feedback(self, rows: list[dict[str, Any]]) -> int:
        with self.engine.begin() as conn:
            return sum(self._insert_new(conn, row) for row in rows)

    @staticmethod
    def _insert_new(conn: Connection, row: dict[str, Any]) -> bool:
        """Insert a feedback row unless its fingerprint is stored already; True when inserted."""
        dialect = conn.dialect.name
        if dialect in ("sqlite", "postgresql"):
            statement = _insert_ignoring_duplicates(feedback, dialect, feedback.c.fingerprint)
            return conn.execute(statement, row).first() is not None
        exists = conn.execute(select(feedback.c.id).where(feedback.c.fingerprint == row["fingerprint"])).first()
        if exists:
            return False
        conn.execute(insert(feedback).values(**row))
        return True

    # --- reads ------------------------------------------------------------------------------------------

    def issued(self, card_uuids: Iterable[str]) -> dict[str, dict[str, Any]]:
        """The issued-card rows for these uuids (unknown ones are absent)."""
        uuids = list(set(card_uuids))
        if not uuids:
            return {}
        self._check_available()
        self.flush(timeout=2.0)  # this process's own cards first
        self.ensure_schema()
        self._check_available()
        try:
            with self.engine.connect() as conn:
                rows = conn.execute(select(cards_issued).where(cards_issued.c.card_uuid.in_(uuids))).mappings()
                return {row["card_uuid"]: {**row, "suggestions": json.loads(row["suggestions"])} for row in rows}
        except SQLAlchemyError as exc:
            raise self._unavailable(exc) from exc


@functools.lru_cache(maxsize=2)
def _claim_jti(dialect: str) -> Any:
    """The statement that records a JWT id unless seen, built once (building it cost a fifth of the check)."""
    return _insert_ignoring_duplicates(seen_jti, dialect, seen_jti.c.iss, seen_jti.c.jti)


def _insert_ignoring_duplicates(table: Table, dialect: str, *unique: Column) -> Any:
    """INSERT … ON CONFLICT (unique) DO NOTHING RETURNING, for "sqlite" and "postgresql": the statement
    returns a row when it inserted, none when the row was there already."""
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as postgresql_insert
        return postgresql_insert(table).on_conflict_do_nothing(index_elements=list(unique)).returning(unique[0])
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert
    return sqlite_insert(table).on_conflict_do_nothing(index_elements=list(unique)).returning(unique[0])
