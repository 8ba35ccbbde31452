"""The detection table (tests/detection_table.json): realistic orders, each with the expected answer and why.

Precision and recall are printed (run pytest with -s to see them) and must both be 1.0; every row is also its own
test case, so a failure names the order and the reason it was put in the table.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cds_service.config import Settings
from cds_service.pipeline.detect import Detector
from cds_service.pipeline.policy import load_policies

TABLE = json.loads((Path(__file__).parent / "detection_table.json").read_text(encoding="utf-8"))["rows"]


@pytest.fixture(scope="module")
def detector() -> Detector:
    return Detector(load_policies(Settings().cards_dir)[0])


def test_the_table_is_large_and_balanced() -> None:
    positives = [r for r in TABLE if r["expected"]]
    assert len(TABLE) >= 80
    assert len(positives) >= 20 and len(TABLE) - len(positives) >= 40
    assert len({r["id"] for r in TABLE}) == len(TABLE)
    assert all(r["why"].strip() for r in TABLE)
    assert {r["expected"] for r in positives} == {"code", "text", "vertebral-augmentation-site"}


def test_ambiguous_rows_say_why() -> None:
    """A row a coder would query the physician about is marked `"ambiguous": true`; its expected answer is the
    conservative one and its why says what the card does."""
    ambiguous = [r for r in TABLE if "ambiguous" in r]
    assert all(r["ambiguous"] is True for r in ambiguous)
    assert {r["id"] for r in ambiguous} >= {"22514-junction-L4-L5-S1", "22511-junction-L5-S1-site"}
    assert all("card" in r["why"] and "query" in r["why"] for r in ambiguous)


@pytest.mark.parametrize("row", TABLE, ids=[r["id"] for r in TABLE])
def test_row(detector: Detector, row: dict[str, Any]) -> None:
    match = detector.match(row["order"])
    assert (match.rule if match else None) == row["expected"], row["why"]
    if match:
        assert len(match.evidence) <= 200
        assert match.evidence.startswith("text:") == (match.rule != "code" and match.evidence.startswith("text:"))


def test_precision_and_recall(detector: Detector) -> None:
    tp = fp = fn = 0
    for row in TABLE:
        found = detector.match(row["order"]) is not None
        tp += found and bool(row["expected"])
        fp += found and not row["expected"]
        fn += not found and bool(row["expected"])
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    ambiguous = sum(1 for r in TABLE if r.get("ambiguous"))
    print(f"\ndetection table: {len(TABLE)} orders, {tp + fn} sacroplasties, {ambiguous} ambiguous: "
          f"precision {precision:.3f}, recall {recall:.3f} (tp {tp}, fp {fp}, fn {fn})")
    assert (precision, recall) == (1.0, 1.0)
