"""`cds-service report`: how clinicians answered the cards, for the payer. This module is the entry point:
figures.py reads the database into figures; table.py, csv_out.py, json_out.py and html.py each render them.

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

import sys
from collections.abc import Callable
from datetime import date, datetime, time, timezone
from pathlib import Path

from cds_service.config import Settings
from cds_service.report.csv_out import render_csv
from cds_service.report.figures import (
    MAX_REPORT_DAYS,
    Day,
    Figures,
    PolicyLabels,
    Report,
    ReportError,
    build_report,
    gather,
)
from cds_service.report.html import bar_chart, day_chart, render_html
from cds_service.report.json_out import render_json
from cds_service.report.table import render_table
from cds_service.storage.store import as_utc

__all__ = [
    "FORMATS", "MAX_REPORT_DAYS", "RENDERERS", "Day", "Figures", "PolicyLabels", "Report", "ReportError",
    "bar_chart", "build_report", "day_chart", "gather", "parse_since", "render_csv", "render_html",
    "render_json", "render_table", "write_report",
]

RENDERERS: dict[str, Callable[[Report], str]] = {
    "table": render_table, "csv": render_csv, "json": render_json, "html": render_html,
}
FORMATS = tuple(RENDERERS)


def parse_since(value: str) -> datetime:
    """--since: a date (midnight UTC) or a date-time (UTC unless an offset is given). Raises ValueError."""
    text = value.strip()
    try:
        if len(text) == 10:
            return datetime.combine(date.fromisoformat(text), time(0), tzinfo=timezone.utc)
        moment = datetime.fromisoformat(text[:-1] + "+00:00" if text[-1:] in ("Z", "z") else text)
    except ValueError:
        raise ValueError(f"{value!r} is not a date (YYYY-MM-DD) or date-time") from None
    return as_utc(moment)


def write_report(since: datetime | None, fmt: str = "table", output: str | None = None,
                 settings: Settings | None = None) -> int:
    """`cds-service report`: make the report of the service's database in `fmt` and print it or write it to
    `output`. Returns the exit code (1 when the report cannot be made or written)."""
    settings = settings or Settings.from_env()
    try:
        report = build_report(settings.database_url, since, settings.cards_dir)
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    text = RENDERERS[fmt](report)
    if output is None:
        sys.stdout.write(text)
        return 0
    try:
        Path(output).write_text(text, encoding="utf-8")
    except OSError as exc:
        print(f"error: cannot write {output}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(f"wrote {fmt} report to {output}", file=sys.stderr)
    return 0
