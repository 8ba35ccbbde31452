"""docs/clinical-safety.md, the hazard log, names for each control the tests that show it: each named test must
exist, and each hazard must name at least one."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LOG = ROOT / "docs" / "clinical-safety.md"
TEST_REF = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")
HAZARD = re.compile(r"^### (H\d+)\b", re.MULTILINE)


def hazards(text: str) -> dict[str, str]:
    """Hazard id → its section of the log."""
    starts = [(m.group(1), m.start()) for m in HAZARD.finditer(text)]
    ends = [start for _, start in starts[1:]] + [len(text)]
    return {hazard: text[start:end] for (hazard, start), end in zip(starts, ends, strict=True)}


def defined_tests(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.name for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test")}


def missing_tests(text: str) -> list[str]:
    missing = []
    for file, name in TEST_REF.findall(text):
        path = ROOT / file
        if not path.is_file() or name not in defined_tests(path):
            missing.append(f"{file}::{name}")
    return missing


LOG_TEXT = LOG.read_text(encoding="utf-8")


def test_the_log_has_hazards() -> None:
    assert len(hazards(LOG_TEXT)) >= 10


@pytest.mark.parametrize("hazard", sorted(hazards(LOG_TEXT)))
def test_each_hazard_names_controls_and_existing_tests(hazard: str) -> None:
    section = hazards(LOG_TEXT)[hazard]
    for field in ("Cause", "Effect", "Controls", "Tests"):
        assert f"**{field}**" in section, f"{hazard}: no {field}"
    assert TEST_REF.search(section), f"{hazard} names no test"
    assert missing_tests(section) == [], f"{hazard} names tests that do not exist"


def test_a_named_test_that_does_not_exist_is_caught() -> None:
    assert missing_tests("`tests/test_clinical_safety.py::test_no_such_test`") == [
        "tests/test_clinical_safety.py::test_no_such_test"]
    assert missing_tests("`tests/no_such_file.py::test_x`") == ["tests/no_such_file.py::test_x"]
    assert missing_tests("`tests/test_clinical_safety.py::test_the_log_has_hazards`") == []
