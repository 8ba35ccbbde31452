"""POST /cds-services/{id}/feedback: validate CDS Hooks 2.0 feedback and store it, all entries or none.

The request is `{"feedback": [Feedback, ...]}`; each Feedback has `card`, `outcome` (accepted | overridden),
`acceptedSuggestions` (required when accepted), optional `overrideReason` {`reason` Coding, `userComment`}
(or, from older clients, the Coding itself: {`code`, `system`, `display`}, stored the same way)
and `outcomeTimestamp` (RFC 3339). The spec gives no response body or status for feedback; this service
answers 200 with `{"stored": n, "duplicates": m}`, a 400 naming every bad entry and field, a 413 for more
than MAX_ENTRIES entries, or 503 when the database cannot take it (nothing stored: the client should send
it again). A 400 or 413 is final: the same request will never be stored.

Bounds (what one request may cost): at most MAX_ENTRIES entries, MAX_ACCEPTED_SUGGESTIONS suggestion ids per
entry, ids and codes no longer than their columns, a userComment of at most MAX_COMMENT characters, no NUL
(or other control characters outside a comment's line breaks and tabs), and an outcomeTimestamp between
EARLIEST_TIMESTAMP and FUTURE_TOLERANCE from now.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from cds_service.errors import ApiError, bad_request
from cds_service.storage.store import (
    MAX_CODE,
    MAX_DISPLAY,
    MAX_ID,
    MAX_SYSTEM,
    NUL_CHARACTER,
    RETRY_AFTER_SECONDS,
    TOO_LONG,
    InvalidRecord,
    Store,
    StoreUnavailable,
    utcnow,
)

log = logging.getLogger(__name__)

OUTCOMES = ("accepted", "overridden")
# Another worker writes the cards it issued a moment after answering (store.py), so a card not found at once
# is looked up again after these pauses (seconds) before its feedback is marked as about an unknown card.
UNKNOWN_CARD_RECHECKS = (0.02, 0.05, 0.1, 0.2)
MAX_PROBLEMS_SHOWN = 20
MAX_ENTRIES = 100                 # entries per request; more is a 413 (an EHR sends one or a few at a time)
MAX_ACCEPTED_SUGGESTIONS = 50     # suggestion ids per entry (a card offers a handful)
MAX_COMMENT = 2000                # characters of a userComment (the one free text; the column has no length)
EARLIEST_TIMESTAMP = datetime(2000, 1, 1, tzinfo=timezone.utc)  # no CDS Hooks feedback is older
FUTURE_TOLERANCE = timedelta(days=1)  # clocks differ, but not by more than this

# NUL (PostgreSQL text cannot hold it), the other C0 and C1 controls, DEL and unpaired surrogates; a
# userComment may keep its line breaks and tabs.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_CONTROL_IN_COMMENT = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")

# RFC 3339 §5.6 date-time (the profile of ISO 8601 the spec names): full date, 'T', time, Z or offset.
_RFC3339 = re.compile(
    r"(?P<main>\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2})(?:\.(?P<fraction>\d+))?(?P<offset>[Zz]|[+-]\d{2}:\d{2})")


@dataclass(frozen=True)
class Feedback:
    """One validated feedback entry."""

    card: str
    outcome: str
    accepted_suggestions: tuple[str, ...]
    override_system: str | None
    override_code: str | None
    override_display: str | None
    user_comment: str | None
    outcome_timestamp: datetime


class _OutOfRange(ValueError):
    """An RFC 3339 date-time that has no UTC value Python can hold (e.g. 9999-12-31T23:59:59-23:59)."""


def _parse_rfc3339(value: str) -> datetime | None:
    """An RFC 3339 date-time as an aware UTC datetime, None when it is not one. Raises _OutOfRange."""
    match = _RFC3339.fullmatch(value)
    if not match:
        return None
    fraction = (match["fraction"] or "")[:6].ljust(6, "0")
    offset = "+00:00" if match["offset"] in ("Z", "z") else match["offset"]
    try:  # fromisoformat checks the calendar (month 13, Feb 30, hour 24, second 60 all fail)
        moment = datetime.fromisoformat(f"{match['main'].replace('t', 'T')}.{fraction}{offset}")
    except ValueError:
        return None
    try:
        return moment.astimezone(timezone.utc)
    except OverflowError:  # year 1 or 9999 with an offset that leaves the calendar
        raise _OutOfRange(value) from None


def timestamp_window(now: datetime) -> tuple[datetime, datetime]:
    """The outcomeTimestamps accepted at `now`: from EARLIEST_TIMESTAMP to FUTURE_TOLERANCE ahead."""
    return EARLIEST_TIMESTAMP, now + FUTURE_TOLERANCE


class _Problems:
    """Collects every problem in a request, so one 400 names them all."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []

    def add(self, field: str, message: str) -> None:
        self.items.append((field, message))

    def string(self, obj: dict[str, Any], key: str, field: str, required: bool, max_length: int | None = None,
               control: re.Pattern[str] = _CONTROL) -> str | None:
        """obj[key] as a non-empty string (the spec forbids null and "" for every attribute), no longer than
        `max_length`, without the characters `control` finds."""
        if key not in obj:
            if required:
                self.add(field, "is required")
            return None
        value = obj[key]
        if not isinstance(value, str):
            self.add(field, "must be a string" + (" (omit it rather than send null)" if value is None else ""))
            return None
        if not value.strip():
            self.add(field, "must not be empty")
            return None
        if max_length is not None and len(value) > max_length:
            self.add(field, f"is longer than {max_length} characters")
            return None
        bad = control.search(value)
        if bad is not None:
            char = bad.group()
            what = "a NUL character" if char == "\x00" else f"the control character U+{ord(char):04X}"
            self.add(field, f"contains {what}, which is not accepted")
            return None
        return value

    def error(self) -> ApiError:
        shown = self.items[:MAX_PROBLEMS_SHOWN]
        more = len(self.items) - len(shown)
        message = "invalid feedback, nothing was stored: " + "; ".join(f"{f}: {m}" for f, m in shown)
        if more:
            message += f"; and {more} more"
        return bad_request(message, field=self.items[0][0])


def _coding(value: Any, field: str, problems: _Problems) -> tuple[str | None, str | None, str | None]:
    """(system, code, display) of a CDS Hooks Coding: code and system required, display optional."""
    if not isinstance(value, dict):
        problems.add(field, "must be a Coding object with 'system' and 'code' strings")
        return None, None, None
    system = problems.string(value, "system", f"{field}.system", True, MAX_SYSTEM)
    code = problems.string(value, "code", f"{field}.code", True, MAX_CODE)
    display = problems.string(value, "display", f"{field}.display", False, MAX_DISPLAY)
    return system, code, display


def _accepted_suggestions(value: Any, field: str, problems: _Problems) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        problems.add(field, "must be a non-empty array of {\"id\": suggestion uuid} objects")
        return ()
    if len(value) > MAX_ACCEPTED_SUGGESTIONS:
        problems.add(field, f"has {len(value)} items; at most {MAX_ACCEPTED_SUGGESTIONS} are accepted")
        return ()
    ids = []
    for j, item in enumerate(value):
        if not isinstance(item, dict):
            problems.add(f"{field}[{j}]", "must be an object with an 'id' string")
            continue
        suggestion_id = problems.string(item, "id", f"{field}[{j}].id", True, MAX_ID)
        if suggestion_id is not None:
            ids.append(suggestion_id)
    return tuple(ids)


def _timestamp(entry: dict[str, Any], field: str, problems: _Problems, now: datetime) -> datetime | None:
    """The entry's outcomeTimestamp: RFC 3339, and inside timestamp_window(now)."""
    raw = problems.string(entry, "outcomeTimestamp", field, True)
    if raw is None:
        return None
    earliest, latest = timestamp_window(now)
    outside = (f"must lie between {earliest.date().isoformat()} and {FUTURE_TOLERANCE.days} day after the "
               "time of the request (UTC)")
    try:
        moment = _parse_rfc3339(raw)
    except _OutOfRange:
        problems.add(field, outside)
        return None
    if moment is None:
        problems.add(field, "must be an RFC 3339 date-time such as 2024-05-01T13:20:50.52Z")
    elif not earliest <= moment <= latest:
        problems.add(field, outside)
        return None
    return moment


def _entry(entry: Any, index: int, problems: _Problems, now: datetime) -> Feedback | None:
    at = f"feedback[{index}]"
    if not isinstance(entry, dict):
        problems.add(at, "must be an object")
        return None
    before = len(problems.items)
    card = problems.string(entry, "card", f"{at}.card", True, MAX_ID)
    outcome = problems.string(entry, "outcome", f"{at}.outcome", True)
    if outcome is not None and outcome not in OUTCOMES:
        problems.add(f"{at}.outcome", "must be 'accepted' or 'overridden'")
    accepted: tuple[str, ...] = ()
    if "acceptedSuggestions" in entry:
        accepted = _accepted_suggestions(entry["acceptedSuggestions"], f"{at}.acceptedSuggestions", problems)
    elif outcome == "accepted":
        problems.add(f"{at}.acceptedSuggestions", "is required when outcome is 'accepted'")
    system = code = display = comment = None
    if "overrideReason" in entry:
        reason = entry["overrideReason"]
        if not isinstance(reason, dict):
            problems.add(f"{at}.overrideReason", "must be an object with 'reason' (a Coding) and/or 'userComment'")
        elif "reason" not in reason and "userComment" not in reason and ("code" in reason or "system" in reason):
            # The pre-2.0 shape (CDS Hooks 1.x drafts): overrideReason is the Coding itself. Stored as the
            # 2.0 shape's reason would be, so reports count both alike.
            system, code, display = _coding(reason, f"{at}.overrideReason", problems)
        else:
            if "reason" not in reason and "userComment" not in reason:
                problems.add(f"{at}.overrideReason", "must hold 'reason', 'userComment' or both")
            if "reason" in reason:
                system, code, display = _coding(reason["reason"], f"{at}.overrideReason.reason", problems)
            comment = problems.string(reason, "userComment", f"{at}.overrideReason.userComment", False,
                                      MAX_COMMENT, _CONTROL_IN_COMMENT)
    timestamp = _timestamp(entry, f"{at}.outcomeTimestamp", problems, now)
    if "extension" in entry and not isinstance(entry["extension"], dict):
        problems.add(f"{at}.extension", "must be an object")
    if len(problems.items) > before:
        return None
    assert card is not None and outcome is not None and timestamp is not None
    return Feedback(card, outcome, accepted, system, code, display, comment, timestamp)


def parse_feedback(body: Any, now: datetime | None = None) -> list[Feedback]:
    """The validated entries of a feedback request received at `now`. Raises a 400 ApiError naming every bad
    field, or a 413 for more than MAX_ENTRIES entries (before looking at any)."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object with a 'feedback' array", field="feedback")
    if "feedback" not in body:
        raise bad_request("'feedback' is required: an array of feedback entries", field="feedback")
    entries = body["feedback"]
    if not isinstance(entries, list):
        raise bad_request("'feedback' must be an array of feedback entries", field="feedback")
    if not entries:
        raise bad_request("'feedback' must not be empty", field="feedback")
    if len(entries) > MAX_ENTRIES:
        raise ApiError(413, "too_many_entries", f"'feedback' has {len(entries)} entries; at most {MAX_ENTRIES} "
                       "are accepted in one request, nothing was stored: send them in several requests",
                       field="feedback")
    now = now or utcnow()
    problems = _Problems()
    if "extension" in body and not isinstance(body["extension"], dict):
        problems.add("extension", "must be an object")
    parsed = [_entry(entry, i, problems, now) for i, entry in enumerate(entries)]
    if problems.items:
        raise problems.error()
    return [p for p in parsed if p is not None]


def _issued(store: Any, cards: set[str]) -> dict[str, Any]:
    """The issued-card records of `cards`, allowing for cards still on their way to the database."""
    known = store.issued(cards)
    for pause in UNKNOWN_CARD_RECHECKS:
        if len(known) == len(cards):
            break
        time.sleep(pause)
        known.update(store.issued(cards - known.keys()))
    return known


# Request field of each feedback column, for a 400 when the store refuses a value.
_FIELDS = {"card_uuid": "card", "outcome": "outcome", "accepted_suggestions": "acceptedSuggestions",
           "override_system": "overrideReason.reason.system", "override_code": "overrideReason.reason.code",
           "override_display": "overrideReason.reason.display", "user_comment": "overrideReason.userComment",
           "outcome_timestamp": "outcomeTimestamp"}
_REASONS = {TOO_LONG: "is too long to be stored", NUL_CHARACTER: "contains a NUL character, which is not accepted"}


def _refused(exc: InvalidRecord) -> ApiError:
    """A 400 for an entry the database can never hold (a retry would fail the same way, so not a 503)."""
    entry = "feedback" if exc.index is None else f"feedback[{exc.index}]"
    field = f"{entry}.{_FIELDS[exc.column]}" if exc.column in _FIELDS else entry
    why = _REASONS.get(exc.reason, f"cannot be stored ({exc.reason.replace('_', ' ')})")
    return bad_request(f"invalid feedback, nothing was stored: {field}: {why}", field=field)


def receive(store: Store | None, service_id: str, body: Any) -> dict[str, Any]:
    """Validate and store one feedback request for the service `service_id`; the JSON answer. Raises
    ApiError (400, 503)."""
    received_at = utcnow()
    entries = parse_feedback(body, received_at)
    unavailable = ApiError(503, "database_unavailable",
                           "the feedback could not be stored because the database is unavailable; nothing was "
                           "stored, send it again later", headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
    if store is None:
        raise unavailable
    try:
        known = _issued(store, {e.card for e in entries})
        stored = store.add_feedback([{
            "card_uuid": e.card,
            "service_id": service_id,
            "known_card": e.card in known,
            "outcome": e.outcome,
            "accepted_suggestions": list(e.accepted_suggestions),
            "override_system": e.override_system,
            "override_code": e.override_code,
            "override_display": e.override_display,
            "user_comment": e.user_comment,
            "outcome_timestamp": e.outcome_timestamp,
            "received_at": received_at,
        } for e in entries])
    except InvalidRecord as exc:  # validation above should have caught it; the store checks again
        log.error("feedback for service=%s not stored (%d entries): %s.%s %s", service_id, len(entries),
                  exc.table, exc.column, exc.reason)
        raise _refused(exc) from None
    except StoreUnavailable as exc:
        log.error("feedback for service=%s not stored (%d entries): database unavailable (%s)",
                  service_id, len(entries), exc)
        raise unavailable from None
    unknown = sum(1 for e in entries if e.card not in known)
    log.info("feedback service=%s entries=%d stored=%d duplicates=%d unknown_cards=%d",
             service_id, len(entries), stored, len(entries) - stored, unknown)
    return {"stored": stored, "duplicates": len(entries) - stored}
