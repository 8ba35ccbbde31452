"""Accessibility checks with axe-core (npm), run in the headless Chromium of the browser tests.

axe-core is installed from tests/a11y/package-lock.json (`npm ci --prefix tests/a11y`, which .ci/run and
`make test` do when npm is present). Without it the checks skip, saying why; under CDS_REQUIRE_BROWSER=1 (CI)
a missing axe-core is a failure, like a missing browser.

axe.min.js is injected through the DevTools protocol (page.evaluate), not as a <script> tag: the pages keep
their strict Content-Security-Policy (no inline script) while they are checked, and the check still runs.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest

A11Y_DIR = Path(__file__).resolve().parent / "a11y"
AXE_PACKAGE = A11Y_DIR / "package.json"
AXE_SCRIPT = A11Y_DIR / "node_modules" / "axe-core" / "axe.min.js"
FAILING_IMPACTS = ("serious", "critical")


def axe_path() -> Path:
    """Where axe.min.js is: CDS_TEST_AXE if set, else tests/a11y/node_modules (from `npm ci`)."""
    return Path(os.environ.get("CDS_TEST_AXE") or AXE_SCRIPT)


def pinned_version() -> str:
    """The axe-core version tests/a11y/package.json pins (the lockfile holds its hash)."""
    return json.loads(AXE_PACKAGE.read_text(encoding="utf-8"))["devDependencies"]["axe-core"]


@lru_cache(maxsize=1)
def _axe_source(path: str) -> str:
    return Path(path).read_text(encoding="utf-8")


def axe_source() -> str:
    """axe.min.js's text; skips the test (fails it under CDS_REQUIRE_BROWSER) when it is not installed."""
    path = axe_path()
    if not path.is_file():
        reason = f"axe-core is not installed ({path} missing: run `npm ci --prefix tests/a11y`)"
        if os.environ.get("CDS_REQUIRE_BROWSER"):
            pytest.fail(f"{reason} (CDS_REQUIRE_BROWSER is set)")
        pytest.skip(reason)
    return _axe_source(str(path))


def inject_axe(page: Any) -> str:
    """Load axe-core into the page's main world, whatever its CSP says; returns axe.version (proof it runs)."""
    if not page.evaluate("() => typeof window.axe === 'object' && typeof window.axe.run === 'function'"):
        page.evaluate(f"() => {{ {axe_source()}\n}}")
    version = page.evaluate("() => (typeof window.axe === 'object' && window.axe.version) || null")
    assert version, "axe-core did not load into the page"
    return version


def run_axe(page: Any, options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """axe.run() on the whole document; returns its violations (all impacts) as plain dicts."""
    inject_axe(page)
    return page.evaluate(
        """async options => {
            const results = await window.axe.run(document, options);
            return results.violations.map(v => ({
                id: v.id, impact: v.impact, help: v.help, helpUrl: v.helpUrl,
                nodes: v.nodes.map(n => ({target: n.target.map(String), summary: n.failureSummary || ''})),
            }));
        }""",
        {"resultTypes": ["violations"], **(options or {})},
    )


def serious(violations: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The violations the project does not accept: impact serious or critical."""
    return [v for v in violations if v["impact"] in FAILING_IMPACTS]


def describe(violations: list[dict[str, Any]]) -> str:
    """One readable block per violation: id, impact, help and the offending nodes."""
    lines: list[str] = []
    for v in violations:
        lines.append(f"- {v['id']} ({v['impact']}): {v['help']} <{v['helpUrl']}>")
        for node in v["nodes"]:
            lines.append(f"    at {' '.join(node['target'])}")
            lines += [f"       {line}" for line in node["summary"].splitlines() if line.strip()]
    return "\n".join(lines)


def assert_accessible(page: Any, what: str) -> list[dict[str, Any]]:
    """Fail, listing each one, if axe finds a serious or critical violation; return the lesser ones."""
    violations = run_axe(page)
    bad = serious(violations)
    assert not bad, f"{what}: {len(bad)} serious/critical accessibility violation(s) under axe-core\n" + describe(bad)
    return violations


def open_all_details(page: Any) -> None:
    """Open every <details>, so that axe checks what it folds away too."""
    page.evaluate("() => document.querySelectorAll('details').forEach(d => { d.open = true; })")


def open_page(browser: Any, url: str) -> Any:
    """A new tab on url (desktop viewport, as the viewer tests use); fails on an HTTP error status."""
    page = browser.new_page(viewport={"width": 1300, "height": 1000})
    response = page.goto(url)
    assert response is not None and response.ok, f"{url}: HTTP {response.status if response else '?'}"
    return page


def assert_url_accessible(browser: Any, url: str, what: str) -> list[dict[str, Any]]:
    """Load url (http(s):// or file://) in a new tab, with every <details> opened, and assert_accessible it."""
    page = open_page(browser, url)
    try:
        open_all_details(page)
        return assert_accessible(page, what)
    finally:
        page.close()
