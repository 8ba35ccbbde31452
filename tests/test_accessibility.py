"""Every HTML page the service serves or writes has no serious or critical violation under axe-core.

The pages: the card viewer (GET / in dev mode, before and after a card is shown), the production front page
(GET / without dev mode), the public policy page (GET /policies/<policy id>) and the HTML report
(`cds-service report --format html`). Each is loaded in headless Chromium (as in test_viewer.py), axe-core is
injected and run, and the test lists every serious or critical violation it finds. A page with a deliberate
fault shows the check can fail.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests
from axe_helper import (
    assert_accessible,
    assert_url_accessible,
    axe_source,
    describe,
    inject_axe,
    open_all_details,
    open_page,
    pinned_version,
    run_axe,
    serious,
)
from conftest import ROOT
from test_report import seed
from test_viewer import SACRO, SERVICES, Page, browser  # noqa: F401 - browser is a fixture

from cds_service import cli
from cds_service.storage.store import Store

POLICY = json.loads((ROOT / "cards/ccp1247-sacroplasty/policy.json").read_text(encoding="utf-8"))


@pytest.fixture(autouse=True)
def axe_installed() -> None:
    """Skip (or fail, under CDS_REQUIRE_BROWSER) before any server starts when axe-core is missing."""
    axe_source()


@pytest.fixture
def dev_url(start_server, tmp_path: Path) -> str:
    return start_server(env={"CDS_DATABASE_URL": f"sqlite:///{tmp_path / 'a11y-dev.sqlite3'}"},
                        args=["--dev"]).url


@pytest.fixture
def production_url(start_server, tmp_path: Path) -> str:
    return start_server(env={"CDS_DATABASE_URL": f"sqlite:///{tmp_path / 'a11y-prod.sqlite3'}",
                             "CDS_PUBLIC_URL": "https://cds.example.org"}, args=[]).url


# ----- the harness is live ------------------------------------------------------------------------------

BAD_PAGE = """<!doctype html><html><head><title>bad</title></head><body><main>
<p style="color:#aaa;background:#fff">Light grey on white</p>
<img src="data:image/gif;base64,R0lGODlhAQABAAAAACw=">
<label>Name</label><input type="text">
</main></body></html>"""


def test_axe_finds_the_faults_of_a_deliberately_bad_page(browser) -> None:
    page = browser.new_page()
    page.set_content(BAD_PAGE)
    assert inject_axe(page) == pinned_version()  # the pinned axe-core, really running in the page
    found = {v["id"]: v["impact"] for v in serious(run_axe(page))}
    assert {"html-has-lang", "color-contrast", "image-alt", "label"} <= set(found), describe(run_axe(page))
    with pytest.raises(AssertionError, match="color-contrast"):
        assert_accessible(page, "the bad page")
    page.close()


def test_axe_runs_under_the_viewers_strict_csp(browser, dev_url: str) -> None:
    """Injecting axe must not need the CSP relaxed: the page keeps script-src 'self' and axe still runs."""
    page = open_page(browser, dev_url + "/")
    csp = requests.get(dev_url + "/", timeout=10).headers["Content-Security-Policy"]
    assert "'unsafe-inline'" not in csp and "script-src 'self'" in csp
    assert inject_axe(page) == pinned_version()
    page.close()


# ----- the pages ----------------------------------------------------------------------------------------

def test_viewer_before_any_call(browser, dev_url: str) -> None:
    tab = Page(browser, dev_url)
    assert_accessible(tab.page, "the viewer (GET / in dev mode)")
    assert tab.errors == []


def test_viewer_with_a_card_and_its_outcome(browser, dev_url: str) -> None:
    tab = Page(browser, dev_url)
    response = tab.fire(SACRO)
    assert tab.page.locator(".card").count() == len(response["cards"]) >= 1
    open_all_details(tab.page)
    assert_accessible(tab.page, "the viewer showing a card")
    tab.page.locator(".card button.suggestion").first.click()  # the applied actions and the sent feedback
    tab.page.wait_for_selector(".card .feedback.sent, .card .feedback.failed")
    open_all_details(tab.page)
    assert_accessible(tab.page, "the viewer after a suggestion was chosen")
    assert tab.errors == []


def test_viewer_with_no_card(browser, dev_url: str) -> None:
    tab = Page(browser, dev_url)
    response = tab.fire("order-select-vertebroplasty-lumbar.json")
    assert response["cards"] == [] and "No cards" in (tab.page.text_content("#cards") or "")
    assert_accessible(tab.page, "the viewer with no card")


def test_viewer_with_a_card_of_each_indicator(browser, dev_url: str) -> None:
    """The badge colours of info, warning and critical cards (the service itself sends only warning)."""
    cards = [{"uuid": f"card-{indicator}", "summary": f"An {indicator} card", "indicator": indicator,
              "detail": "Some **detail** with a [link](https://example.org/policy).",
              "source": {"label": "Example policy", "url": "https://example.org/policy"},
              "suggestions": [{"label": "Order something else", "uuid": f"s-{indicator}", "actions": []}],
              "selectionBehavior": "at-most-one",
              "overrideReasons": [{"system": "urn:x", "code": "x", "display": "A reason"}]}
             for indicator in ("info", "warning", "critical", "unexpected")]
    tab = Page(browser, dev_url)
    tab.page.route(f"**/cds-services/{SERVICES['order-select']['id']}",
                   lambda route: route.fulfill(status=200, content_type="application/json",
                                               body=json.dumps({"cards": cards})))
    tab.fire(SACRO)
    assert tab.page.locator(".card .badge").count() == len(cards)
    assert_accessible(tab.page, "the viewer showing cards of every indicator")


def test_production_front_page(browser, production_url: str) -> None:
    assert POLICY["number"] in requests.get(production_url + "/", timeout=10).text
    assert_url_accessible(browser, production_url + "/", "the production front page (GET /)")


def test_policy_page(browser, production_url: str) -> None:
    url = f"{production_url}/policies/{POLICY['id']}"
    assert requests.get(url, timeout=10).status_code == 200
    assert_url_accessible(browser, url, f"the policy page (GET /policies/{POLICY['id']})")


@pytest.mark.parametrize("seeded_rows", [True, False], ids=["with-records", "empty"])
def test_html_report(browser, tmp_path: Path, monkeypatch, capsys, seeded_rows: bool) -> None:
    url = f"sqlite:///{tmp_path / 'report.sqlite3'}"
    if seeded_rows:
        seed(url)
    else:
        store = Store(url)
        store.ensure_schema()  # the tables, and no row
        store.engine.dispose()
    monkeypatch.setenv("CDS_DATABASE_URL", url)
    output = tmp_path / "report.html"
    assert cli.main(["report", "--format", "html", "--output", str(output)]) == 0, capsys.readouterr().err
    html = output.read_text(encoding="utf-8")
    assert ("<svg" in html) == seeded_rows
    assert_url_accessible(browser, output.as_uri(), "the HTML report")
