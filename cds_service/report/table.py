"""The report as plain text for a terminal; client text (reason codes, labels) is made printable."""

from __future__ import annotations

from cds_service.report.figures import Figures, Report, percent, ranked
from cds_service.safetext import printable


def _table_section(title: str, figures: Figures, displays: dict[str, str]) -> list[str]:
    lines = [title, "-" * len(title)]
    lines.append(f"  {'Cards issued':<22}{figures.cards_issued:>8}")
    lines.append(f"  {'Feedback received':<22}{figures.feedback_received:>8}")
    lines.append(f"  {'Accepted':<22}{figures.accepted:>8}  ({percent(figures.rate(figures.accepted))} "
                 "of feedback)")
    lines.append(f"  {'Overridden':<22}{figures.overridden:>8}  ({percent(figures.rate(figures.overridden))} "
                 "of feedback)")
    lines.append("  Alternatives chosen:")
    chosen = [(printable(label), count) for label, count in ranked(figures.accepted_suggestions)]
    width = max([len(label) for label, _ in chosen] + [10])
    lines.extend(f"    {label:<{width}}  {count:>6}" for label, count in chosen)
    if not chosen:
        lines.append("    (none)")
    lines.append("  Override reasons:")
    reasons = [(printable(f"{code} ({displays[code]})" if code in displays else code), count)
               for code, count in ranked(figures.override_reasons)]
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
    lines = ["Coverage cards: how clinicians answered",
             f"Period: {period} (UTC); generated {report.generated_at.isoformat(timespec='seconds')}",
             "Rates are shares of the feedback received."]
    note = report.day_note()
    if note:
        lines.append(note)
    lines.append("")
    lines += _table_section("All policy versions", report.total, report.reason_displays)
    for version, figures in sorted(report.by_version.items()):
        lines.append("")
        lines += _table_section(f"Policy pack and version {version}", figures, report.reason_displays)
    return "\n".join(printable(line) for line in lines) + "\n"
