"""Every CDS_* setting the code reads is documented (README.md or docs/), with its default."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SETTING = re.compile(r"\bCDS_[A-Z][A-Z0-9_]*[A-Z0-9]\b")
CAP = re.compile(r"""_cap\(\s*["']([A-Z][A-Z0-9_]*)["']""")  # limits.py: CDS_<name>
# Not settings: the test harness's own variables, and the Flask config key that holds the Settings object.
TEST_ONLY = re.compile(r"^CDS_(TEST|VIEWER_SCREENSHOT|REQUIRE_BROWSER|SETTINGS$)")


def settings_in_code() -> set[str]:
    found: set[str] = set()
    for path in (ROOT / "cds_service").rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        found |= set(SETTING.findall(text)) | {f"CDS_{name}" for name in CAP.findall(text)}
    return {name for name in found if not TEST_ONLY.match(name)}


def documented() -> str:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return "\n".join(page.read_text(encoding="utf-8") for page in pages)


def test_the_code_reads_settings() -> None:
    assert {"CDS_DEV", "CDS_DATABASE_URL", "CDS_FIXTURES_DIR", "CDS_MAX_ORDER_ELEMENTS"} <= settings_in_code()


@pytest.mark.parametrize("name", sorted(settings_in_code()))
def test_every_setting_is_documented(name: str) -> None:
    assert re.search(rf"`{name}`", documented()), f"{name} is read by the code but documented nowhere"


def test_an_undocumented_setting_is_caught() -> None:
    assert not re.search(r"`CDS_NO_SUCH_SETTING`", documented())
