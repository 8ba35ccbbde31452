"""The report as one self-contained HTML page: charts drawn here as plain geometry, turned into inline SVG by
report.html (client text is escaped by the template's autoescape)."""

from __future__ import annotations

from datetime import date, timedelta
from pathlib import Path
from typing import Any

from cds_service.report.figures import MAX_REPORT_DAYS, Day, Figures, Report, percent, ranked

CHART_WIDTH = 760


def _nice_ceiling(value: int) -> int:
    """A round axis maximum ≥ value: the next multiple of its leading power of ten (23 → 30, 7 → 7)."""
    if value <= 1:
        return 1
    step: int = 10 ** (len(str(value)) - 1)
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
             for code, count in ranked(figures.override_reasons)]
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
        percent=percent,
        versions=sorted(report.by_version.items()),
        days=day_chart(report.by_day),
        alternatives=ranked(total.accepted_suggestions),
        alternatives_chart=bar_chart(ranked(total.accepted_suggestions)),
        reasons=_reason_items(total, report.reason_displays),
        reasons_chart=bar_chart(_reason_items(total, report.reason_displays)),
    )
