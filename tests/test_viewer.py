"""The card viewer (GET / in dev mode) and the production front page.

Page-level checks use the Flask test client. The viewer itself is driven in a real headless Chromium
(Debian's `chromium` package, through Playwright for Python); those tests skip, saying why, only when no
browser can be found here. Set CDS_REQUIRE_BROWSER=1 (as .ci/run does) to make a missing browser a failure,
and CDS_VIEWER_SCREENSHOT=docs/viewer.png to write the README screenshot while the tests run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from conftest import FIXTURES, ROOT
from sqlalchemy import select

from cds_service import create_app
from cds_service.config import Settings
from cds_service.storage.store import Store
from cds_service.storage.store import feedback as feedback_table

POLICY = json.loads((ROOT / "cards/ccp1247-sacroplasty/policy.json").read_text(encoding="utf-8"))
SERVICES = {s["hook"]: s for s in json.loads((ROOT / "cards/services.json").read_text(encoding="utf-8"))["services"]}
SACRO = "order-select-sacroplasty-cpt.json"
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run"]


class Scripts(HTMLParser):
    """Collects <script> tags and inline event-handler attributes of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[dict[str, str | None]] = []
        self.handlers: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "script":
            self.scripts.append(dict(attrs))
        self.handlers += [name for name, _ in attrs if name.startswith("on")]


# ----- the pages, without a browser -------------------------------------------------------------------

def test_dev_page_is_the_viewer_under_a_strict_csp(client) -> None:
    response = client.get("/")
    assert response.status_code == 200 and response.mimetype == "text/html"
    csp = {d.split()[0]: d.split()[1:] for d in response.headers["Content-Security-Policy"].split("; ")}
    assert csp["script-src"] == ["'self'"] and csp["default-src"] == ["'none'"]
    assert csp["connect-src"] == ["'self'"]
    assert "'unsafe-inline'" not in response.headers["Content-Security-Policy"]
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    page = Scripts()
    page.feed(response.get_data(as_text=True))
    assert page.scripts and all(s.get("src") for s in page.scripts)  # no inline script at all
    assert page.handlers == []
    for script in page.scripts:
        assert script["src"].startswith("/")  # shipped with the app: no CDN, works offline
        assert client.get(script["src"]).status_code == 200


def test_dev_page_lists_every_example_request(client) -> None:
    html = client.get("/").get_data(as_text=True)
    for path in FIXTURES.glob("*.json"):
        assert f'value="{path.name}"' in html
    for service in SERVICES.values():
        assert f'value="{service["id"]}"' in html


def test_a_fixture_is_served_as_stored(client) -> None:
    response = client.get(f"/viewer/fixtures/{SACRO}")
    assert response.status_code == 200 and response.mimetype == "application/json"
    assert response.get_json() == json.loads((FIXTURES / SACRO).read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", ["nope.json", "..%2Fpyproject.toml", "..%2F..%2Fetc%2Fpasswd", "conftest.py"])
def test_only_listed_fixtures_are_served(client, name: str) -> None:
    response = client.get(f"/viewer/fixtures/{name}")
    assert response.status_code == 404
    assert response.get_json()["error"] == "not_found"


@pytest.fixture
def production_client(tmp_path: Path):
    settings = Settings(dev=False, database_url=f"sqlite:///{tmp_path / 'prod.sqlite3'}",
                        public_url="https://cds.example.org")
    return create_app(settings).test_client()


def test_production_front_page_names_the_service_and_nothing_more(production_client) -> None:
    response = production_client.get("/")
    assert response.status_code == 200
    html = response.get_data(as_text=True)
    assert POLICY["number"] in html and POLICY["version"] in html
    assert "https://cds.example.org/cds-services" in html
    for service in SERVICES.values():
        assert f"/cds-services/{service['id']}" in html
    page = Scripts()
    page.feed(html)
    assert page.scripts == [] and page.handlers == []
    assert "viewer" not in html.lower() and ".json" not in html
    assert "script-src" not in response.headers["Content-Security-Policy"]  # default-src 'none': no script


@pytest.mark.parametrize("path", [f"/viewer/fixtures/{SACRO}", "/viewer/static/viewer.js",
                                  "/viewer/static/markdown.js", "/static/viewer.js"])
def test_production_exposes_no_viewer_and_no_fixture(production_client, path: str) -> None:
    response = production_client.get(path)
    assert response.status_code == 404
    assert response.get_json()["error"] == "not_found"


# ----- in a real browser ------------------------------------------------------------------------------

def find_chromium() -> str | None:
    for candidate in (os.environ.get("CDS_TEST_CHROMIUM"), shutil.which("chromium"),
                      shutil.which("chromium-browser"), shutil.which("google-chrome")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def no_browser(reason: str) -> None:
    if os.environ.get("CDS_REQUIRE_BROWSER"):
        pytest.fail(f"{reason} (CDS_REQUIRE_BROWSER is set)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        no_browser("Playwright for Python is not installed (pip install playwright)")
    executable = find_chromium()
    if executable is None:
        no_browser("no Chromium found (apt-get install chromium, or set CDS_TEST_CHROMIUM)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable, args=BROWSER_ARGS)
        yield chromium
        chromium.close()


class Page:
    """A browser tab on the viewer, collecting page errors (a script error would be a bug)."""

    def __init__(self, browser: Any, url: str) -> None:
        self.page = browser.new_page(viewport={"width": 1300, "height": 1000})
        self.errors: list[str] = []
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.goto(url + "/")
        self.page.wait_for_selector("body[data-ready=true]")

    def fire(self, fixture: str = SACRO) -> dict[str, Any]:
        """Load an example request, fire it, and return the response the page received."""
        self.page.select_option("#fixture", fixture)
        self.page.wait_for_selector(f'#request-json[data-loaded="{fixture}"]', state="attached")
        self.page.click("#fire")
        self.page.wait_for_selector("#call-status.ok, #call-status.failed")
        return json.loads(self.page.text_content("#raw-json") or "null")


@pytest.fixture
def dev_server(start_server, tmp_path: Path):
    database = f"sqlite:///{tmp_path / 'viewer.sqlite3'}"
    server = start_server(env={"CDS_DATABASE_URL": database}, args=["--dev"])
    server.store = Store(database)
    return server


def stored_feedback(store: Store) -> list[dict[str, Any]]:
    with store.engine.connect() as conn:
        return [dict(row) for row in conn.execute(select(feedback_table)).mappings()]


def test_viewer_fires_the_sacroplasty_request_and_stores_the_override(browser, dev_server) -> None:
    tab = Page(browser, dev_server.url)
    page = tab.page
    response = tab.fire(SACRO)
    [card] = response["cards"]

    status = page.text_content("#call-status")
    assert re.fullmatch(r"HTTP 200 in \d+ ms · 1 card · 1 system action", status), status
    shown = page.locator(".card")
    assert shown.count() == 1
    assert "indicator-warning" in (shown.get_attribute("class") or "")
    assert page.text_content(".card .summary") == POLICY["card"]["summary"]
    labels = [b.text_content() for b in page.locator(".card button.suggestion").all()]
    assert labels == [s["label"] for s in card["suggestions"]] and len(labels) >= 2
    # the detail's Markdown is rendered: bold, and the link to the policy page; the source links to the policy
    assert page.locator(".card .detail strong").count() >= 2
    hrefs = [a.get_attribute("href") for a in page.locator(".card .detail a").all()]
    assert hrefs == [f"{dev_server.url}/policies/{POLICY['id']}"]
    assert page.get_attribute(".card .source a", "href") == card["source"]["url"]
    assert page.locator(".card .override-reason option").count() == len(card["overrideReasons"]) + 1

    if os.environ.get("CDS_VIEWER_SCREENSHOT"):
        page.mouse.move(0, 0)
        page.screenshot(path=os.environ["CDS_VIEWER_SCREENSHOT"], full_page=True)

    reason = card["overrideReasons"][1]
    page.select_option(".card .override-reason", label=reason["display"])
    page.fill(".card .override-comment", "Discussed with the patient; appeal to follow")
    page.click(".card .override-button")
    page.wait_for_selector(".card .feedback.sent, .card .feedback.failed")
    assert page.locator(".card .feedback.sent").count() == 1, page.text_content(".card .outcome")
    assert page.locator(".card button.suggestion:enabled").count() == 0  # one outcome per card

    rows = stored_feedback(dev_server.store)
    assert len(rows) == 1
    row = rows[0]
    assert row["card_uuid"] == card["uuid"] and row["known_card"]
    assert row["outcome"] == "overridden"
    assert (row["override_system"], row["override_code"], row["override_display"]) == (
        reason["system"], reason["code"], reason["display"])
    assert row["user_comment"] == "Discussed with the patient; appeal to follow"
    assert tab.errors == []


def test_choosing_a_suggestion_shows_its_actions_and_sends_accepted_feedback(browser, dev_server) -> None:
    tab = Page(browser, dev_server.url)
    page = tab.page
    response = tab.fire(SACRO)
    [card] = response["cards"]
    chosen = card["suggestions"][0]
    page.locator(".card button.suggestion").first.click()
    page.wait_for_selector(".card .feedback.sent, .card .feedback.failed")

    applied = page.text_content(".card .applied ul") or ""
    delete = next(a for a in chosen["actions"] if a["type"] == "delete")
    create = next(a for a in chosen["actions"] if a["type"] == "create")
    assert f"Delete {delete['resourceId']}: {delete['description']}" in applied
    assert f"Create ServiceRequest \u201c{create['resource']['code']['text']}\u201d" in applied
    assert json.loads(page.text_content(".card .actions-json") or "null") == chosen["actions"]
    # at-most-one: the other suggestions (and the override) can no longer be chosen
    assert page.locator(".card button.suggestion:enabled").count() == 0
    assert page.locator(".card .override-button:enabled").count() == 0
    assert page.locator(".card .feedback.sent").count() == 1, page.text_content(".card .outcome")

    rows = stored_feedback(dev_server.store)
    assert [(r["card_uuid"], r["outcome"], json.loads(r["accepted_suggestions"])) for r in rows] == [
        (card["uuid"], "accepted", [chosen["uuid"]])]
    assert tab.errors == []


def test_loading_an_order_sign_request_chooses_the_order_sign_service(browser, dev_server) -> None:
    tab = Page(browser, dev_server.url)
    response = tab.fire("order-sign-mixed.json")
    assert tab.page.input_value("#service") == SERVICES["order-sign"]["id"]
    assert tab.page.locator(".card").count() == len(response["cards"]) == 1
    tab.fire("order-select-vertebroplasty-lumbar.json")
    assert tab.page.input_value("#service") == SERVICES["order-select"]["id"]
    assert tab.page.locator(".card").count() == 0
    assert "No cards" in (tab.page.text_content("#cards") or "")


@pytest.mark.parametrize("fixture, hook", [("order-dispatch-sacroplasty.json", "order-dispatch"),
                                           ("appointment-book-sacroplasty-coded.json", "appointment-book")])
def test_the_dispatch_and_booking_services_are_listed_and_chosen(browser, dev_server, fixture: str,
                                                                 hook: str) -> None:
    tab = Page(browser, dev_server.url)
    response = tab.fire(fixture)
    assert tab.page.input_value("#service") == SERVICES[hook]["id"]
    assert tab.page.locator(".card").count() == len(response["cards"]) == 1
    assert tab.page.locator(".card .suggestions").count() == 0
    assert tab.errors == []


HOSTILE_CARD = {
    "uuid": "hostile-card",
    "summary": "<img src=x onerror=\"window.__xss_summary=1\">Summary",
    "indicator": "critical",
    "detail": ("Before <script>window.__xss_script=1</script> after.\n\n"
               "<img src=x onerror=\"window.__xss_img=1\">\n\n"
               "- **bold <b onmouseover=\"window.__xss_b=1\">x</b>**\n"
               "- [click me](javascript:window.__xss_link=1)\n"
               "- [ok](https://example.org/safe)\n\n"
               "<iframe src=\"javascript:window.parent.__xss_frame=1\"></iframe>"),
    "source": {"label": "<svg onload=\"window.__xss_source=1\">", "url": "javascript:window.__xss_src=1"},
    "suggestions": [{"label": "<img src=x onerror=\"window.__xss_suggestion=1\">", "uuid": "s-1",
                     "actions": [{"type": "delete", "description": "<script>window.__xss_action=1</script>",
                                  "resourceId": "ServiceRequest/1"}]}],
    "selectionBehavior": "at-most-one",
    "overrideReasons": [{"system": "urn:x", "code": "x", "display": "<img src=x onerror=\"window.__xss_reason=1\">"}],
    "links": [{"label": "<b>link</b>", "url": "javascript:window.__xss_linkurl=1", "type": "absolute"}],
}
XSS_FLAGS = ["__xss_summary", "__xss_script", "__xss_img", "__xss_b", "__xss_link", "__xss_frame",
             "__xss_source", "__xss_src", "__xss_suggestion", "__xss_action", "__xss_reason", "__xss_linkurl"]


def test_a_card_with_html_is_shown_as_text_and_nothing_runs(browser, dev_server) -> None:
    tab = Page(browser, dev_server.url)
    page = tab.page
    body = json.dumps({"cards": [HOSTILE_CARD]})
    page.route("**/cds-services/sacroplasty-order-select",
               lambda route: route.fulfill(status=200, content_type="application/json", body=body))
    page.route("**/cds-services/sacroplasty-order-select/feedback",
               lambda route: route.fulfill(status=200, content_type="application/json", body="{}"))
    tab.fire(SACRO)
    page.select_option(".card .override-reason", index=1)
    page.locator(".card button.suggestion").first.click()  # shows the action's description too
    for element in page.locator(".card .summary, .card .detail p, .card .detail li").all():
        element.hover()
    for element in page.locator(".card .source span, .card .links span").all():
        element.click()
    page.wait_for_timeout(200)  # let any (wrongly) injected handler run before looking for its traces

    assert page.evaluate("flags => flags.filter(f => f in window)", XSS_FLAGS) == []
    assert page.locator(".card script, .card img, .card svg, .card iframe, .card b").count() == 0
    assert page.locator(".card [onerror], .card [onload], .card [onmouseover]").count() == 0
    hrefs = [a.get_attribute("href") for a in page.locator(".card a").all()]
    assert hrefs == ["https://example.org/safe"]
    text = page.text_content(".card") or ""
    for visible in ("<script>window.__xss_script=1</script>", "<img src=x onerror=\"window.__xss_img=1\">",
                    "[click me](javascript:window.__xss_link=1)", "<svg onload=\"window.__xss_source=1\">",
                    "<script>window.__xss_action=1</script>", "<b onmouseover=\"window.__xss_b=1\">x</b>"):
        assert visible in text, visible
    assert page.text_content(".card .summary") == HOSTILE_CARD["summary"]
    assert tab.errors == []


MARKDOWN_CASES = [
    ("Plain text.", "<p>Plain text.</p>"),
    ("**bold** and *it* and _it_ and `code`", "<p><strong>bold</strong> and <em>it</em> and <em>it</em> and "
                                               "<code>code</code></p>"),
    ("snake_case_name stays", "<p>snake_case_name stays</p>"),
    ("one\ntwo\n\nthree", "<p>one\ntwo</p><p>three</p>"),
    ("- a\n- **b**\n\n1. x\n2. y", "<ul><li>a</li><li><strong>b</strong></li></ul><ol><li>x</li><li>y</li></ol>"),
    ("[site](https://example.org/a?b=1&c=2)",
     '<p><a href="https://example.org/a?b=1&amp;c=2" target="_blank" rel="noopener noreferrer">site</a></p>'),
    ("[x](javascript:alert(1))", "<p>[x](javascript:alert(1))</p>"),
    ("[x](data:text/html,hi)", "<p>[x](data:text/html,hi)</p>"),
    ("[x](/relative)", "<p>[x](/relative)</p>"),
    ("<b>not bold</b> &amp;", "<p>&lt;b&gt;not bold&lt;/b&gt; &amp;amp;</p>"),
    ("\\*not italic\\*", "<p>*not italic*</p>"),
]


def test_the_markdown_subset_renders_as_expected_without_any_csp(browser) -> None:
    """markdown.js on its own, in a page with no CSP at all: safety must not depend on the page's policy."""
    page = browser.new_page()
    page.set_content("<!doctype html><html><body></body></html>")
    page.add_script_tag(path=str(ROOT / "cds_service/web/static/markdown.js"))
    rendered = page.evaluate("""cases => cases.map(text => {
        const box = document.createElement('div');
        box.appendChild(window.CardMarkdown.render(text));
        document.body.appendChild(box);
        return box.innerHTML;
    })""", [text for text, _ in MARKDOWN_CASES])
    assert rendered == [html for _, html in MARKDOWN_CASES]
    hostile = HOSTILE_CARD["detail"] + "\n\n<img src=x onerror=\"window.__xss_plain=1\">"
    page.evaluate("text => document.body.appendChild(window.CardMarkdown.render(text))", hostile)
    page.wait_for_timeout(200)
    assert page.evaluate("flags => flags.filter(f => f in window)", XSS_FLAGS + ["__xss_plain"]) == []
    assert page.locator("body img, body script, body iframe").count() == 0
    page.close()
