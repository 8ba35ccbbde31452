"""The report as tidy CSV rows; text cells cannot run as spreadsheet formulas."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from typing import Any

from cds_service.report.figures import Figures, Report, ranked
from cds_service.safetext import csv_cell


def _csv_rows(scope: str, figures: Figures) -> Iterable[list[Any]]:
    for metric in ("cards_issued", "feedback_received", "accepted", "overridden"):
        yield [scope, "", metric, "", getattr(figures, metric)]
    for metric, count in (("acceptance_rate", figures.accepted), ("override_rate", figures.overridden)):
        rate = figures.rate(count)
        yield [scope, "", metric, "", "" if rate is None else rate]
    yield [scope, "", "overridden_without_reason", "", figures.overridden_without_reason]
    for label, count in ranked(figures.accepted_suggestions):
        yield [scope, "", "accepted_suggestions", label, count]
    for code, count in ranked(figures.override_reasons):
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
