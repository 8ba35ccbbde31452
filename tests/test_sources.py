"""Every statement a card makes is traced to the policy text (cards/<pack>/sources.json), and every code a
created order carries to the code book (cards/codes.md)."""

from __future__ import annotations

import json
import re

import pytest

from cds_service.config import Settings
from cds_service.pipeline.policy import load_policies

CARDS = Settings().cards_dir
POLICY = load_policies(CARDS)[0]
PACK = next(p.parent for p in CARDS.glob("*/policy.json")
            if json.loads(p.read_text())["id"] == POLICY.id)
SOURCES = json.loads((PACK / "sources.json").read_text(encoding="utf-8"))
CODE_BOOK = (CARDS / "codes.md").read_text(encoding="utf-8")


def normal(text: str) -> str:
    """Compare quotes whitespace-insensitively (the policy text is a PDF extraction with hard line breaks)."""
    return " ".join(text.replace("’", "'").split())


POLICY_TEXT = normal((PACK / SOURCES["document"]).read_text(encoding="utf-8"))
ENTRIES = {entry["where"]: entry for entry in SOURCES["entries"]}


def card_texts() -> dict[str, str]:
    """Every text of the pack that a card, a created order or a CRD update shows, by where it lives."""
    meta = json.loads((PACK / "policy.json").read_text(encoding="utf-8"))
    texts = {
        "policy.json:revision_date": meta["revision_date"],
        "policy.json:effective_date": meta["effective_date"],
        "policy.json:crd.coverage_reason": meta["crd"]["coverage_reason"],
        "policy.json:crd.coverage_action_description": meta["crd"]["coverage_action_description"],
    }
    for key in ("summary", "note_on_created_order", "policy_page_link", "alternatives_offered",
                "alternatives_listed", "also_covered", "delete_description", "create_description", "unnamed_order",
                "not_the_orderer"):
        texts[f"policy.json:card.{key}"] = meta["card"][key]
    for key, message in meta["messages"].items():
        texts[f"policy.json:messages.{key}"] = message
    for reason in meta["override_reasons"]:
        texts[f"policy.json:override_reasons.{reason['code']}"] = reason["display"]
    for number, line in enumerate((PACK / "detail.md").read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip() and not re.fullmatch(r"\s*\$\w+\s*", line):  # a bare placeholder is traced where it is filled
            texts[f"detail.md:{number}"] = line
    for alternative in POLICY.alternatives:
        texts[f"alternatives.json:orderable.{alternative.id}"] = alternative.label
    for other in POLICY.also_covered:
        texts[f"alternatives.json:also_covered.{other.id}"] = other.card_text
    return texts


@pytest.mark.parametrize("where", sorted(card_texts()))
def test_every_card_text_is_traced(where: str) -> None:
    assert where in ENTRIES, f"{where} ({card_texts()[where]!r}) has no entry in sources.json"
    assert ENTRIES[where]["quotes"], where


@pytest.mark.parametrize("where", sorted(ENTRIES))
def test_every_quote_is_in_the_policy_text(where: str) -> None:
    for quote in ENTRIES[where]["quotes"]:
        assert normal(quote) in POLICY_TEXT, f"{where}: not in the policy text: {quote!r}"


def test_no_entry_names_a_text_that_is_gone() -> None:
    assert set(ENTRIES) <= set(card_texts())


@pytest.mark.parametrize("alternative", POLICY.alternatives, ids=lambda a: a.id)
def test_created_order_codes_are_in_the_code_book(alternative) -> None:
    entry = ENTRIES[f"alternatives.json:orderable.{alternative.id}"]
    assert normal(alternative.policy_text) in POLICY_TEXT  # the policy's own line, verbatim
    codes = {c["code"] for c in alternative.codings}
    assert entry["code_book"] in codes
    for code in codes:
        assert re.search(rf"\|\s*{re.escape(code)}\s*\|", CODE_BOOK), f"{code} is not in codes.md"


def test_the_check_fails_on_an_invented_statement() -> None:
    assert normal("Sacroplasty is covered for oncology patients.") not in POLICY_TEXT
    assert normal("Percutaneous sacral augmentation (sacroplasty) is medically necessary.") not in POLICY_TEXT
