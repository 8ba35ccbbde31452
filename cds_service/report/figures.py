"""The report's figures, read from the database: cards issued, feedback, accepted / overridden counts,
alternatives chosen and override reasons, in total, per policy version and per UTC day.

Reads the database named by CDS_DATABASE_URL and never writes to it. Rates are shares of the feedback received
(a card nobody acted on is never reported by the EHR). Days are UTC days: cards by the time they were issued,
feedback by its outcomeTimestamp.

Per-day figures cover only what can be drawn honestly, in bounded time and size: records dated inside the
window feedback accepts (from 2000-01-01 to a day after the report is made), and at most MAX_REPORT_DAYS
days, the latest ones. Records outside are counted in the totals and named in a note, not drawn.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import inspect, select
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import SQLAlchemyError

from cds_service.storage.feedback import timestamp_window
from cds_service.storage.store import as_utc, cards_issued, feedback, make_engine, safe_url

UNKNOWN_VERSION = "unknown"  # feedback about a card this database has no record of
UNKNOWN_SUGGESTION = "(unknown suggestion)"
MAX_REPORT_DAYS = 3 * 366  # the longest period shown per day (the latest days are kept)


@dataclass
class Figures:
    """The counts for one slice of the data (everything, or one policy version)."""

    cards_issued: int = 0
    feedback_received: int = 0
    accepted: int = 0
    overridden: int = 0
    override_reasons: Counter[str] = field(default_factory=Counter)      # reason code → count
    accepted_suggestions: Counter[str] = field(default_factory=Counter)  # alternative label → count
    overridden_without_reason: int = 0

    def rate(self, count: int) -> float | None:
        return round(count / self.feedback_received, 4) if self.feedback_received else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "cards_issued": self.cards_issued,
            "feedback_received": self.feedback_received,
            "accepted": self.accepted,
            "overridden": self.overridden,
            "acceptance_rate": self.rate(self.accepted),
            "override_rate": self.rate(self.overridden),
            "override_reasons": dict(ranked(self.override_reasons)),
            "overridden_without_reason": self.overridden_without_reason,
            "accepted_suggestions": dict(ranked(self.accepted_suggestions)),
        }


@dataclass
class Day:
    cards_issued: int = 0
    accepted: int = 0
    overridden: int = 0


@dataclass
class Report:
    since: datetime | None
    generated_at: datetime
    total: Figures = field(default_factory=Figures)
    by_version: dict[str, Figures] = field(default_factory=dict)
    by_day: dict[date, Day] = field(default_factory=dict)
    reason_displays: dict[str, str] = field(default_factory=dict)  # reason code → display
    outside_window: int = 0  # records dated outside the accepted window: in the totals, not per day
    cut_before: date | None = None  # days before this were left out of the per-day figures (too long a period)
    cut_records: int = 0  # records on those days

    def version(self, policy_id: str | None, version: str | None) -> Figures:
        """The figures of one pack's version ("<policy id> <version>"): packs are counted apart even when
        their versions are spelt alike."""
        key = f"{policy_id} {version}" if policy_id and version else UNKNOWN_VERSION
        return self.by_version.setdefault(key, Figures())

    def day(self, moment: datetime) -> Day:
        """The per-day counts of `moment`'s UTC day; a throwaway Day when it lies outside the window."""
        moment = as_utc(moment)
        earliest, latest = timestamp_window(self.generated_at)
        if not earliest <= moment <= latest:
            self.outside_window += 1
            return Day()
        return self.by_day.setdefault(moment.date(), Day())

    def bound_days(self) -> None:
        """Keep the latest MAX_REPORT_DAYS days of by_day; count the records of the days left out."""
        if self.by_day and (max(self.by_day) - min(self.by_day)).days >= MAX_REPORT_DAYS:
            self.cut_before = max(self.by_day) - timedelta(days=MAX_REPORT_DAYS - 1)
            for day in [d for d in self.by_day if d < self.cut_before]:
                counts = self.by_day.pop(day)
                self.cut_records += counts.cards_issued + counts.accepted + counts.overridden

    def day_note(self) -> str | None:
        """Why some records are in the totals but not in the per-day figures, or None when all are."""
        notes = []
        if self.outside_window:
            earliest, latest = timestamp_window(self.generated_at)
            notes.append(f"{self.outside_window} record(s) dated before {earliest.date().isoformat()} or after "
                         f"{latest.date().isoformat()}")
        if self.cut_before is not None:
            notes.append(f"{self.cut_records} record(s) dated before {self.cut_before.isoformat()} (per-day "
                         f"figures cover at most {MAX_REPORT_DAYS} days, the latest)")
        if not notes:
            return None
        return "Not shown per day, but counted in the totals: " + "; ".join(notes) + "."

    def as_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"generated_at": self.generated_at.isoformat(timespec="seconds")}
        if self.since is not None:
            body["since"] = self.since.isoformat()
        body.update(self.total.as_dict())
        body["by_policy_version"] = {v: f.as_dict() for v, f in sorted(self.by_version.items())}
        body["by_day"] = {d.isoformat(): vars(counts).copy() for d, counts in sorted(self.by_day.items())}
        note = self.day_note()
        if note:
            body["by_day_note"] = note
        return body


@dataclass(frozen=True)
class PolicyLabels:
    """What the policy data says about alternative ids and override reason codes."""

    alternatives: dict[str, dict[str, str]]  # policy id → alternative id → label
    reasons: dict[str, str]                  # override reason code → display

    @classmethod
    def load(cls, cards_dir: Path) -> PolicyLabels:
        from cds_service.pipeline.policy import PolicyError, load_policies

        try:
            policies = load_policies(cards_dir)
        except PolicyError:
            return cls({}, {})  # labels fall back to the stored alternative ids and reason codes
        return cls({p.id: {a.id: a.label for a in p.alternatives} for p in policies},
                   {r["code"]: r["display"] for p in policies for r in p.override_reasons})

    def alternative(self, policy_id: str | None, alternative_id: str | None) -> str:
        if alternative_id is None:
            return UNKNOWN_SUGGESTION
        return self.alternatives.get(policy_id or "", {}).get(alternative_id, alternative_id)


def gather(conn: Connection, labels: PolicyLabels, since: datetime | None = None,
           now: datetime | None = None) -> Report:
    """Count everything from the database (rows are streamed, so the size of the database does not matter)."""
    report = Report(since=since, generated_at=now or datetime.now(timezone.utc))
    report.reason_displays.update(labels.reasons)
    stream = conn.execution_options(yield_per=2000)

    cards = select(cards_issued.c.policy_id, cards_issued.c.policy_version, cards_issued.c.issued_at)
    if since is not None:
        cards = cards.where(cards_issued.c.issued_at >= since)
    for policy_id, version, issued_at in stream.execute(cards):
        report.total.cards_issued += 1
        report.version(policy_id, version).cards_issued += 1
        report.day(issued_at).cards_issued += 1

    joined = feedback.outerjoin(cards_issued, feedback.c.card_uuid == cards_issued.c.card_uuid)
    answers = select(feedback.c.outcome, feedback.c.accepted_suggestions, feedback.c.override_code,
                     feedback.c.override_display, feedback.c.outcome_timestamp, cards_issued.c.policy_id,
                     cards_issued.c.policy_version, cards_issued.c.suggestions).select_from(joined)
    if since is not None:
        answers = answers.where(feedback.c.outcome_timestamp >= since)
    for row in stream.execute(answers):
        slices = (report.total, report.version(row.policy_id, row.policy_version))
        day = report.day(row.outcome_timestamp)
        for figures in slices:
            figures.feedback_received += 1
        if row.outcome == "accepted":
            offered = json.loads(row.suggestions) if row.suggestions else {}
            chosen = [labels.alternative(row.policy_id, offered.get(s))
                      for s in dict.fromkeys(json.loads(row.accepted_suggestions))]
            day.accepted += 1
            for figures in slices:
                figures.accepted += 1
                figures.accepted_suggestions.update(chosen)
        elif row.outcome == "overridden":
            day.overridden += 1
            for figures in slices:
                figures.overridden += 1
                if row.override_code:
                    figures.override_reasons[row.override_code] += 1
                else:
                    figures.overridden_without_reason += 1
            if row.override_code and row.override_display:
                report.reason_displays.setdefault(row.override_code, row.override_display)
    report.bound_days()
    return report


class ReportError(Exception):
    """The report cannot be made; the message says why (no stack trace for the user)."""


def _check_database(url: str) -> None:
    """Refuse, rather than create, a database the service never wrote to."""
    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001 - SQLAlchemy raises several types for a malformed URL
        raise ReportError(f"CDS_DATABASE_URL is not a valid SQLAlchemy URL ({safe_url(url)})") from None
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database in ("", ":memory:") or not Path(database).is_file():
            raise ReportError(f"no database file at {database or '(memory)'}: has the service run? "
                              "Set CDS_DATABASE_URL to the service's database")


def build_report(url: str, since: datetime | None, cards_dir: Path) -> Report:
    """The report for the database at `url`. Raises ReportError."""
    _check_database(url)
    try:
        engine = make_engine(url)
    except Exception as exc:  # noqa: BLE001 - e.g. the URL names a driver that is not installed
        raise ReportError(f"cannot use {safe_url(url)}: {exc}") from None
    try:
        with engine.connect() as conn:
            missing = {"cards_issued", "feedback"} - set(inspect(conn).get_table_names())
            if missing:
                raise ReportError(f"{safe_url(url)} has no {' or '.join(sorted(missing))} table: "
                                  "has the service run against it?")
            return gather(conn, PolicyLabels.load(cards_dir), since)
    except SQLAlchemyError as exc:
        raise ReportError(f"cannot read {safe_url(url)}: {type(exc).__name__}: "
                          f"{str(getattr(exc, 'orig', exc)).strip().splitlines()[0]}") from None
    finally:
        engine.dispose()


def ranked(counter: Counter[str]) -> list[tuple[str, int]]:
    """Most frequent first, ties by name: stable output."""
    return sorted(counter.items(), key=lambda item: (-item[1], item[0]))


def percent(rate: float | None) -> str:
    """A rate as the table and the HTML page show it."""
    return "-" if rate is None else f"{rate * 100:.1f}%"
