"""The report as one JSON document."""

from __future__ import annotations

import json

from cds_service.report.figures import Report


def render_json(report: Report) -> str:
    """Totals, per policy version and per day, as Report.as_dict gives them."""
    return json.dumps(report.as_dict(), indent=2, ensure_ascii=False) + "\n"
