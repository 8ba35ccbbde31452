"""`cds-service report`: how clinicians answered the cards, for the payer.

Reads the database named by CDS_DATABASE_URL (never writes to it) and prints cards issued, feedback
received, accepted / overridden counts and rates, the alternatives chosen and the override reasons, in
total and per policy version, as a terminal table, CSV, JSON, or one self-contained HTML page with charts.

Rates are shares of the feedback received (a card nobody acted on is never reported by the EHR).
Days are UTC days: cards by the time they were issued, feedback by its outcomeTimestamp.

Per-day figures cover only what can be drawn honestly, in bounded time and size: records dated inside the
window feedback accepts (from 2000-01-01 to a day after the report is made), and at most MAX_REPORT_DAYS
days, the latest ones. Records outside are counted in the totals and named in a note, not drawn.

Text that came from clients (override reason codes and displays) is made safe for each output: HTML is
escaped, CSV cells cannot run as spreadsheet formulas, the table shows control characters as escapes.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, timezone
from pathlib import Path
from typing import Any, Iterable

from sqlalchemy import inspect, select
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import SQLAlchemyError

from cds_service.config import Settings
from cds_service.storage.feedback import timestamp_window
from cds_service.safetext import csv_cell, printable
from cds_service.storage.store import as_utc, cards_issued, feedback, make_engine, safe_url

FORMATS = ("table", "csv", "json", "html")
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
    override_reasons: Counter = field(default_factory=Counter)      # reason code → count
    accepted_suggestions: Counter = field(default_factory=Counter)  # alternative label → count
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
            "override_reasons": dict(_ranked(self.override_reasons)),
            "overridden_without_reason": self.overridden_without_reason,
            "accepted_suggestions": dict(_ranked(self.accepted_suggestions)),
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

    def version(self, version: str | None) -> Figures:
        return self.by_version.setdefault(version or UNKNOWN_VERSION, Figures())

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


def _ranked(counter: Counter) -> list[tuple[str, int]]:
    """Most frequent first, ties by name: stable output."""
    return sorted(counter.items(), key=lambda item: (-item[1], item[0]))


# --- reading the database ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class PolicyLabels:
    """What the policy data says about alternative ids and override reason codes."""

    alternatives: dict[str, dict[str, str]]  # policy id → alternative id → label
    reasons: dict[str, str]                  # override reason code → display

    @classmethod
    def load(cls, cards_dir: Path) -> "PolicyLabels":
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

    cards = select(cards_issued.c.policy_version, cards_issued.c.issued_at)
    if since is not None:
        cards = cards.where(cards_issued.c.issued_at >= since)
    for version, issued_at in stream.execute(cards):
        report.total.cards_issued += 1
        report.version(version).cards_issued += 1
        report.day(issued_at).cards_issued += 1

    joined = feedback.outerjoin(cards_issued, feedback.c.card_uuid == cards_issued.c.card_uuid)
    answers = select(feedback.c.outcome, feedback.c.accepted_suggestions, feedback.c.override_code,
                     feedback.c.override_display, feedback.c.outcome_timestamp, cards_issued.c.policy_id,
                     cards_issued.c.policy_version, cards_issued.c.suggestions).select_from(joined)
    if since is not None:
        answers = answers.where(feedback.c.outcome_timestamp >= since)
    for row in stream.execute(answers):
        slices = (report.total, report.version(row.policy_version))
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


# --- rendering --------------------------------------------------------------------------------------------

def _percent(rate: float | None) -> str:
    return "-" if rate is None else f"{rate * 100:.1f}%"


def _table_section(title: str, figures: Figures, displays: dict[str, str]) -> list[str]:
    lines = [title, "-" * len(title)]
    lines.append(f"  {'Cards issued':<22}{figures.cards_issued:>8}")
    lines.append(f"  {'Feedback received':<22}{figures.feedback_received:>8}")
    lines.append(f"  {'Accepted':<22}{figures.accepted:>8}  ({_percent(figures.rate(figures.accepted))} "
                 "of feedback)")
    lines.append(f"  {'Overridden':<22}{figures.overridden:>8}  ({_percent(figures.rate(figures.overridden))} "
                 "of feedback)")
    lines.append("  Alternatives chosen:")
    chosen = [(printable(label), count) for label, count in _ranked(figures.accepted_suggestions)]
    width = max([len(label) for label, _ in chosen] + [10])
    lines.extend(f"    {label:<{width}}  {count:>6}" for label, count in chosen)
    if not chosen:
        lines.append("    (none)")
    lines.append("  Override reasons:")
    reasons = [(printable(f"{code} ({displays[code]})" if code in displays else code), count)
               for code, count in _ranked(figures.override_reasons)]
    if figures.overridden_without_reason:
        reasons.append(("no reason given", figures.overridden_without_reason))
    width = max([len(label) for label, _ in reasons] + [10])
    lines.extend(f"    {label:<{width}}  {count:>6}" for label, count in reasons)
    if not reasons:
        lines.append("    (none)")
    return lines


def render_table(report: Report) -> str:
    """Plain text for a terminal; every line is made printable (client text may hold escape sequences)."""
    period = f"since {report.since.isoformat()}" if report.since else "all records"
    lines = ["Sacroplasty coverage cards: how clinicians answered",
             f"Period: {period} (UTC); generated {report.generated_at.isoformat(timespec='seconds')}",
             "Rates are shares of the feedback received."]
    note = report.day_note()
    if note:
        lines.append(note)
    lines.append("")
    lines += _table_section("All policy versions", report.total, report.reason_displays)
    for version, figures in sorted(report.by_version.items()):
        lines.append("")
        lines += _table_section(f"Policy version {version}", figures, report.reason_displays)
    return "\n".join(printable(line) for line in lines) + "\n"


def _csv_rows(scope: str, figures: Figures) -> Iterable[list[Any]]:
    for metric in ("cards_issued", "feedback_received", "accepted", "overridden"):
        yield [scope, "", metric, "", getattr(figures, metric)]
    for metric, count in (("acceptance_rate", figures.accepted), ("override_rate", figures.overridden)):
        rate = figures.rate(count)
        yield [scope, "", metric, "", "" if rate is None else rate]
    yield [scope, "", "overridden_without_reason", "", figures.overridden_without_reason]
    for label, count in _ranked(figures.accepted_suggestions):
        yield [scope, "", "accepted_suggestions", label, count]
    for code, count in _ranked(figures.override_reasons):
        yield [scope, "", "override_reasons", code, count]


def render_csv(report: Report) -> str:
    """Tidy rows: policy_version (all = every version), day (UTC, daily rows only), metric, category, value.

    Text cells (policy_version, category: reason codes and labels come from clients) go through csv_cell,
    so none starts a formula, and are always quoted (a carriage return inside one cannot end the row);
    values are numbers and stay bare numbers."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n", quoting=csv.QUOTE_NONNUMERIC)
    writer.writerow(["policy_version", "day", "metric", "category", "value"])
    rows: list[Iterable[list[Any]]] = [_csv_rows("all", report.total)]
    rows += [_csv_rows(version, figures) for version, figures in sorted(report.by_version.items())]
    for row_set in rows:
        writer.writerows([csv_cell(cell) for cell in row] for row in row_set)
    for day, counts in sorted(report.by_day.items()):
        for metric, value in vars(counts).items():
            writer.writerow(["all", day.isoformat(), metric, "", value])
    if report.outside_window or report.cut_records:
        writer.writerow(["all", "", "records_not_shown_per_day", "", report.outside_window + report.cut_records])
    return out.getvalue()


def render_json(report: Report) -> str:
    return json.dumps(report.as_dict(), indent=2, ensure_ascii=False) + "\n"


# --- HTML: charts drawn here as plain geometry, turned into inline SVG by templates/report.html -----------

CHART_WIDTH = 760


def _nice_ceiling(value: int) -> int:
    """A round axis maximum ≥ value: the next multiple of its leading power of ten (23 → 30, 7 → 7)."""
    if value <= 1:
        return 1
    step = 10 ** (len(str(value)) - 1)
    return -(-value // step) * step


DAILY_LIMIT = 180  # days; a longer period is drawn per week (Monday to Sunday) so the bars stay readable


def _buckets(by_day: dict[date, Day]) -> tuple[str, dict[date, Day]]:
    """("day" | "week", counts per bucket start) for the chart."""
    first, last = min(by_day), max(by_day)
    if (last - first).days < DAILY_LIMIT:
        return "day", by_day
    weeks: dict[date, Day] = {}
    for day, counts in by_day.items():
        week = weeks.setdefault(day - timedelta(days=day.weekday()), Day())
        week.cards_issued += counts.cards_issued
        week.accepted += counts.accepted
        week.overridden += counts.overridden
    return "week", weeks


def day_chart(by_day: dict[date, Day]) -> dict[str, Any] | None:
    """Stacked accepted / overridden bars per UTC day (per week over long periods; gaps filled) with
    cards issued as a line. Draws at most the latest MAX_REPORT_DAYS days (Report.bound_days says so)."""
    if not by_day:
        return None
    latest = max(by_day)
    by_day = {d: c for d, c in by_day.items() if (latest - d).days < MAX_REPORT_DAYS}
    unit, by_day = _buckets(by_day)
    step = 1 if unit == "day" else 7
    first, last = min(by_day), max(by_day)
    days = [first + timedelta(days=i) for i in range(0, (last - first).days + 1, step)]
    left, right, top, bottom, height = 44, 12, 14, 40, 260
    plot_w, plot_h = CHART_WIDTH - left - right, height - top - bottom
    peak = _nice_ceiling(max(max(d.accepted + d.overridden, d.cards_issued) for d in by_day.values()))
    slot = plot_w / len(days)
    bar_w = max(slot * 0.7, 1.0)
    scale = plot_h / peak
    label_every = max(1, -(-len(days) // 8))
    bars, points = [], []
    for i, day in enumerate(days):
        counts = by_day.get(day, Day())
        x = left + i * slot + (slot - bar_w) / 2
        accepted_h, overridden_h = counts.accepted * scale, counts.overridden * scale
        base = top + plot_h
        bars.append({
            "x": round(x, 2), "w": round(bar_w, 2),
            "accepted_y": round(base - accepted_h, 2), "accepted_h": round(accepted_h, 2),
            "overridden_y": round(base - accepted_h - overridden_h, 2), "overridden_h": round(overridden_h, 2),
            "title": f"{'week of ' if unit == 'week' else ''}{day.isoformat()}: {counts.accepted} accepted, "
                     f"{counts.overridden} overridden, "
                     f"{counts.cards_issued} cards issued",
            "label": day.isoformat() if i % label_every == 0 else None,
            "label_x": round(left + i * slot + slot / 2, 2),
            "anchor": "end" if left + i * slot + slot / 2 > CHART_WIDTH - right - 36 else "middle",
        })
        points.append((round(left + i * slot + slot / 2, 2), round(base - counts.cards_issued * scale, 2)))
    ticks = [0, peak // 2, peak] if peak % 2 == 0 and peak >= 2 else [0, peak]
    return {
        "width": CHART_WIDTH, "height": height, "left": left, "right": CHART_WIDTH - right, "top": top,
        "base": top + plot_h, "label_y": top + plot_h + 18,
        "ticks": [{"value": t, "y": round(top + plot_h - t * scale, 2)} for t in ticks],
        "bars": bars, "points": points, "polyline": " ".join(f"{x},{y}" for x, y in points),
        "first": first.isoformat(), "last": last.isoformat(), "unit": unit,
    }


def bar_chart(items: list[tuple[str, int]]) -> dict[str, Any] | None:
    """Horizontal bars, the label above each bar."""
    if not items:
        return None
    row, bar_h, label_w = 42, 16, 60
    plot_w = CHART_WIDTH - label_w
    peak = max(count for _, count in items)
    rows = []
    for i, (label, count) in enumerate(items):
        y = i * row
        width = max(plot_w * count / peak, 2)
        rows.append({"label": label, "count": count, "text_y": y + 14, "bar_y": y + 20, "bar_h": bar_h,
                     "bar_w": round(width, 2), "value_x": round(width + 6, 2), "value_y": y + 20 + bar_h - 3})
    return {"width": CHART_WIDTH, "height": len(items) * row + 4, "rows": rows}


def _reason_items(figures: Figures, displays: dict[str, str]) -> list[tuple[str, int]]:
    items = [(f"{displays[code]} ({code})" if code in displays else code, count)
             for code, count in _ranked(figures.override_reasons)]
    if figures.overridden_without_reason:
        items.append(("No reason given", figures.overridden_without_reason))
    return items


def render_html(report: Report) -> str:
    from jinja2 import Environment, FileSystemLoader

    env = Environment(loader=FileSystemLoader(str(Path(__file__).resolve().parent)), autoescape=True,
                      trim_blocks=True, lstrip_blocks=True)
    total = report.total
    return env.get_template("report.html").render(
        report=report,
        total=total,
        percent=_percent,
        versions=sorted(report.by_version.items()),
        days=day_chart(report.by_day),
        alternatives=_ranked(total.accepted_suggestions),
        alternatives_chart=bar_chart(_ranked(total.accepted_suggestions)),
        reasons=_reason_items(total, report.reason_displays),
        reasons_chart=bar_chart(_reason_items(total, report.reason_displays)),
    )


RENDERERS = {"table": render_table, "csv": render_csv, "json": render_json, "html": render_html}


# --- command line -----------------------------------------------------------------------------------------

def parse_since(value: str) -> datetime:
    """--since: a date (midnight UTC) or a date-time (UTC unless an offset is given)."""
    text = value.strip()
    try:
        if len(text) == 10:
            return datetime.combine(date.fromisoformat(text), time(0), tzinfo=timezone.utc)
        moment = datetime.fromisoformat(text[:-1] + "+00:00" if text[-1:] in ("Z", "z") else text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a date (YYYY-MM-DD) or date-time") from None
    return as_utc(moment)


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


def run(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    try:
        report = build_report(settings.database_url, args.since, settings.cards_dir)
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    output = RENDERERS[args.format](report)
    if args.output is None:
        sys.stdout.write(output)
        return 0
    try:
        Path(args.output).write_text(output, encoding="utf-8")
    except OSError as exc:
        print(f"error: cannot write {args.output}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.format} report to {args.output}", file=sys.stderr)
    return 0


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = ("How clinicians answered the cards: cards issued, feedback, acceptance and override "
                          "rates, alternatives chosen, override reasons, per policy version. Reads the database "
                          "named by CDS_DATABASE_URL.")
    parser.add_argument("--since", type=parse_since, metavar="DATE",
                        help="only cards issued and feedback given from this UTC date (YYYY-MM-DD) on")
    parser.add_argument("--format", choices=FORMATS, default="table",
                        help="table (default), csv, json, or html (one self-contained page with charts)")
    parser.add_argument("--output", metavar="FILE", help="write to FILE instead of standard output")
    parser.set_defaults(func=run)
