"""The policy pack schema (pipeline/schema.py): a malformed pack is refused at load, naming the file, the field and
what is wrong; `serve` and `evaluate` stop at start with that one line; and no English card text lives in Python."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cds_service.config import Settings
from cds_service.pipeline import schema
from cds_service.pipeline.policy import PolicyError, load_catalogue, load_policies, load_policy
from cds_service.pipeline.rules import RULES

ROOT = Path(__file__).resolve().parent.parent
CARDS = Settings().cards_dir
PACK = "ccp1247-sacroplasty"


@pytest.fixture
def cards(tmp_path: Path) -> Path:
    """A copy of cards/ to break one file of."""
    shutil.copytree(CARDS, tmp_path / "cards")
    return tmp_path / "cards"


def edit_json(path: Path, change: Callable[[Any], None]) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    change(data)
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")


def refusal(folder: Path) -> str:
    with pytest.raises(PolicyError) as caught:
        load_policy(folder)
    message = str(caught.value)
    assert "\n" not in message  # one line
    return message


def test_the_shipped_packs_and_services_are_valid() -> None:
    catalogue = load_catalogue(CARDS)
    policy = catalogue.packs[0]
    assert policy.id == "ccp-1247-sacroplasty"
    assert [a.id for a in policy.alternatives][:2] == ["facet-joint-injection", "chiropractic-manipulation"]
    assert policy.alternatives[1].rule == "chiropractic-first-four-weeks"
    assert policy.messages["plan_member"].startswith("The patient is covered")
    assert policy.detection["codes"][0]["code"] == "0200T"  # the raw data the detector reads, as before
    assert {s.hook for s in catalogue.services} == {"order-select", "order-sign", "order-dispatch", "appointment-book"}


# Each kind of malformed pack: (file, how it is broken, what the message must name).
BROKEN: dict[str, tuple[str, Callable[[Any], None], list[str]]] = {
    "missing key": ("policy.json", lambda d: d["card"].pop("summary"),
                    ["policy.json: card.summary: missing"]),
    "unknown key": ("alternatives.json", lambda d: d["orderable"][0].update(lable="x"),
                    ["alternatives.json: orderable[0].lable: unknown key"]),
    "wrong type": ("conditions.json", lambda d: d.update(onset_window_days="28"),
                   ["conditions.json: onset_window_days: "]),
    "unknown placeholder in a card text": ("policy.json", lambda d: d["card"].update(
        create_description="Add a draft order: $txt."),
        ["policy.json: card.create_description: unknown placeholder $txt"]),
    "placeholder in a verbatim text": ("policy.json", lambda d: d["messages"].update(
        plan_member="The patient is covered by $payer."), ["policy.json: messages.plan_member: $payer"]),
    "unknown rule": ("alternatives.json", lambda d: d["orderable"][1].update(rule="chiropractic-4-weeks"),
                     ["alternatives.json: orderable[1].rule: unknown rule 'chiropractic-4-weeks'"]),
    "bad code system": ("conditions.json", lambda d: d["contraindications"]["fracture"]["codes"][0].update(
        system="icd-10-cm"), ["conditions.json: contraindications.fracture.codes[0].system: 'icd-10-cm' is not an "
                              "absolute URI"]),
    "bare OID as code system": ("detection.json", lambda d: d["code_systems"]["CPT"].append("2.16.840.1.113883.6.12"),
                                ["detection.json: code_systems.CPT[2]: "]),
    "bad urn:oid": ("policy.json", lambda d: d["override_reasons"][0].update(system="urn:oid:2.16.x"),
                    ["policy.json: override_reasons[0].system: 'urn:oid:2.16.x' is not a valid urn:oid"]),
    "bad regular expression": ("detection.json", lambda d: d["code_formats"].update(CPT="[0-9]{4}(?P<x"),
                               ["detection.json: code_formats.CPT: regular expression"]),
    "bad regular expression, codes without system": (
        "detection.json", lambda d: d["codes_without_system"].update(format="([0-9]{4}T"),
        ["detection.json: codes_without_system.format: regular expression"]),
    "unknown value set": ("alternatives.json", lambda d: d["orderable"][2].update(reasons_that_fit=["back_pain"]),
                          ["alternatives.json: orderable[2].reasons_that_fit[0]: 'back_pain' is no value set"]),
    "unknown contraindication kind": ("alternatives.json", lambda d: d["orderable"][0].update(
        withheld_when=["infection"]), ["alternatives.json: orderable[0].withheld_when[0]: 'infection'"]),
    "missing message": ("policy.json", lambda d: d["messages"].pop("chiro_too_late"),
                        ["policy.json: messages.chiro_too_late: missing"]),
    "misspelt message": ("policy.json", lambda d: d["messages"].update(plan_membr=d["messages"].pop("plan_member")),
                         ["policy.json: messages.plan_member: missing"]),
    "new contraindication kind without its message": (
        "conditions.json", lambda d: d["contraindications"].update(
            osteopenia={"name": "osteopenia", "codes": [], "words": ["osteopenia"]}),
        ["policy.json: messages.chiro_contraindicated_osteopenia: missing"]),
    "code system label not declared": ("detection.json", lambda d: d["codes"][0].update(systems=["CPT4"]),
                                       ["detection.json: codes[0].systems[0]: 'CPT4' is not a key of code_systems"]),
    "unknown text rule kind": ("detection.json", lambda d: d["text"]["rules"][0].update(rule="vertebral-site"),
                               ["detection.json: text.rules[0].rule: "]),
    "empty detection word": ("detection.json", lambda d: d["text"]["rules"][1]["words"].append("~"),
                             ["detection.json: text.rules[1].words[1]: "]),
    "quote not in the policy text": ("sources.json", lambda d: d["entries"][0]["quotes"].append(
        "Sacroplasty is covered for oncology patients."),
        ["sources.json: entries[0].quotes[1]: not in policy-text.txt"]),
}


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_a_malformed_pack_is_refused_naming_file_and_field(cards: Path, kind: str) -> None:
    name, change, expected = BROKEN[kind]
    edit_json(cards / PACK / name, change)
    message = refusal(cards / PACK)
    assert str(cards / PACK / name.split(":")[0]) in message or str(cards / PACK) in message
    for part in expected:
        assert part in message, message


def test_a_comment_key_is_allowed_anywhere(cards: Path) -> None:
    edit_json(cards / PACK / "alternatives.json", lambda d: d["orderable"][0].update(_note="why this code"))
    edit_json(cards / PACK / "policy.json", lambda d: d["card"].update(_why="a comment"))
    assert load_policy(cards / PACK).alternatives[0].id == "facet-joint-injection"


@pytest.mark.parametrize("file, text, placeholder", [
    ("detail.md", "\n$advice\n", "$advice"),
    ("page.md", "\nSee ${link}.\n", "$link"),
])
def test_an_unknown_placeholder_in_a_markdown_template_is_refused(cards: Path, file: str, text: str,
                                                                  placeholder: str) -> None:
    with open(cards / PACK / file, "a", encoding="utf-8") as handle:
        handle.write(text)
    message = refusal(cards / PACK)
    assert f"{cards / PACK / file}: (template): unknown placeholder {placeholder}" in message


def test_a_stray_dollar_in_a_template_is_refused(cards: Path) -> None:
    with open(cards / PACK / "detail.md", "a", encoding="utf-8") as handle:
        handle.write("\nCosts $ 100.\n")
    assert "detail.md: (template): a '$' that starts no placeholder" in refusal(cards / PACK)


@pytest.mark.parametrize("file, content, what", [
    ("page.md", None, "page.md: missing file"),
    ("detection.json", "{not json", "detection.json: not valid JSON"),
    ("conditions.json", "[]", "conditions.json: (top level): expected a JSON object"),
])
def test_a_missing_or_unreadable_file_is_refused(cards: Path, file: str, content: str | None, what: str) -> None:
    if content is None:
        (cards / PACK / file).unlink()
    else:
        (cards / PACK / file).write_text(content, encoding="utf-8")
    assert what in refusal(cards / PACK)


def test_every_problem_is_listed_and_the_message_counts_the_rest(cards: Path) -> None:
    edit_json(cards / PACK / "policy.json", lambda d: d["card"].pop("summary"))
    edit_json(cards / PACK / "detection.json", lambda d: d["code_formats"].update(CPT="[0-9"))
    with pytest.raises(PolicyError) as caught:
        load_policy(cards / PACK)
    assert len(caught.value.problems) == 2
    assert "and 1 more problem(s)" in str(caught.value)


@pytest.mark.parametrize("change, expected", [
    (lambda d: d["services"][0].update(description="Checks orders against $pack."),
     "services.json: services[0].description: unknown placeholder $pack"),
    (lambda d: d["services"][1].update(hook="order-select"), "services.json: services[1].hook: a second service"),
    (lambda d: d["crd"]["options"][0].update(response="cost"), "services.json: crd.options[0].response: "),
    (lambda d: d["crd"]["options"][1].pop("default"), "services.json: crd.options[1].default: missing"),
    (lambda d: d.update(service=[]), "services.json: service: unknown key"),
])
def test_a_malformed_services_file_is_refused(cards: Path, change: Callable[[Any], None], expected: str) -> None:
    edit_json(cards / "services.json", change)
    with pytest.raises(PolicyError) as caught:
        load_catalogue(cards)
    assert expected in str(caught.value)


def test_two_packs_with_one_id_are_refused(cards: Path) -> None:
    shutil.copytree(cards / PACK, cards / "copy")
    with pytest.raises(PolicyError, match="two packs have the id ccp-1247-sacroplasty"):
        load_policies(cards)


# --- the schema stays in step with the code -------------------------------------------------------------------

def test_every_rule_of_the_registry_declares_its_messages() -> None:
    assert set(RULES) <= set(schema.RULE_MESSAGES)


def _substitute_keywords(path: Path, receiver: str) -> set[str]:
    """The keyword names of every `<...>.<receiver>.substitute(...)` / `<receiver>.substitute(...)` call."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in ("substitute", "safe_substitute"):
            target = node.func.value
            name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", None)
            if name == receiver:
                found |= {k.arg for k in node.keywords if k.arg}
    return found


@pytest.mark.parametrize("module, receiver, allowed", [
    ("pipeline/cards.py", "detail_template", schema.DETAIL_PLACEHOLDERS),
    ("web/policy_page.py", "page_template", schema.PAGE_PLACEHOLDERS),
    ("pipeline/cards.py", "_delete", schema.CARD_TEMPLATES["delete_description"]),
    ("pipeline/cards.py", "_create", schema.CARD_TEMPLATES["create_description"]),
    ("pipeline/cards.py", "_listed", schema.CARD_TEMPLATES["alternatives_listed"]),
])
def test_the_placeholders_the_schema_allows_are_those_the_code_fills(module: str, receiver: str,
                                                                      allowed: frozenset[str]) -> None:
    filled = _substitute_keywords(ROOT / "cds_service" / module, receiver)
    assert filled == set(allowed), f"{module}: {receiver}.substitute fills {sorted(filled)}"


def test_the_message_keys_the_schema_requires_are_those_the_code_asks_for() -> None:
    source = (ROOT / "cds_service" / "pipeline" / "eligibility.py").read_text(encoding="utf-8")
    asked = set(re.findall(r'"((?:plan|coverage|chiro)_[a-z_]+)"', source))
    asked |= {"chiro_contraindicated_{kind}"} if "f\"chiro_contraindicated_{first}\"" in source else set()
    asked.discard("chiro_contraindicated_")
    declared = set(schema.PLAN_MESSAGES) | set(schema.RULE_MESSAGES["chiropractic-first-four-weeks"])
    assert asked == declared


# --- serve and evaluate stop at start -------------------------------------------------------------------------

def _broken_env(cards: Path) -> dict[str, str]:
    edit_json(cards / PACK / "alternatives.json", lambda d: d["orderable"][1].update(rule="chiropractic-4-weeks"))
    return {**os.environ, "CDS_CARDS_DIR": str(cards), "CDS_DEV": "1"}


def test_serve_refuses_a_broken_pack_at_start(cards: Path, tmp_path: Path) -> None:
    from tests.conftest import free_port

    env = {**_broken_env(cards), "CDS_DATABASE_URL": f"sqlite:///{tmp_path / 'cds.sqlite3'}"}
    try:
        result = subprocess.run([sys.executable, "-m", "cds_service.cli", "serve", "--dev", "--host", "127.0.0.1",
                                 "--port", str(free_port()), "--workers", "1"],
                                env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)
    except subprocess.TimeoutExpired:  # it started serving: the very failure this test is about
        pytest.fail("serve started with a broken pack")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1
    assert f"{cards / PACK / 'alternatives.json'}: orderable[1].rule: unknown rule" in lines[0]


def test_evaluate_refuses_a_broken_pack(cards: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "cds_service.cli", "evaluate",
                             str(ROOT / "fixtures" / "order-select-sacroplasty-cpt.json")],
                            env=_broken_env(cards), capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    assert result.stderr.startswith("error: ") and "orderable[1].rule: unknown rule" in result.stderr


# --- all card words in data (issue 14, item 3) ---------------------------------------------------------------

LOG_METHODS = {"debug", "info", "warning", "error", "exception", "critical"}
ERROR_CALLS = {"bad_request", "too_large", "ApiError", "PolicyError"}  # and every *Error / *Exception class
# Modules whose sentences never reach a card: the load-time validators (their sentences are PolicyError messages).
# The pack loader and check-policy's example runner speak to the analyst, never to a card.
NOT_ON_THE_CARD_PATH = {"pipeline/schema.py", "pipeline/policy.py", "pipeline/examples.py"}
# Literals that are sentences but no card text, each with why.
ALLOWED = {
    ("pipeline/crd.py", "of this form"): "part of a 400 error message (the requested CRD version, unquoted)",
    ("pipeline/limits.py", " has more than "): "describe(): a 4xx error message naming a cap",
    ("pipeline/limits.py", " JSON values; at most "): "describe(): a 4xx error message naming a cap",
    ("pipeline/limits.py", " entries; at most "): "describe(): a 4xx error message naming a cap",
    ("pipeline/limits.py", " holds a text of "): "describe(): a 4xx error message naming a cap",
    ("pipeline/limits.py", " characters; at most "): "describe(): a 4xx error message naming a cap",
    ("web/policy_page.py", "default-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"):
        "an HTTP header (Content-Security-Policy)",
    ("web/viewer.py", "default-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"):
        "an HTTP header (Content-Security-Policy)",
}


def _is_error_call(node: ast.AST) -> bool:
    if not isinstance(node, ast.Call):
        return False
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
    if isinstance(func, ast.Attribute) and name in LOG_METHODS:
        return True
    return name in ERROR_CALLS or name.endswith(("Error", "Exception"))


def sentences(source: str) -> list[tuple[int, str]]:
    """String literals of three or more words (f-string pieces included) that are not a docstring, a log
    message or an error message."""
    tree = ast.parse(source)
    exempt: set[int] = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body \
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            exempt.add(id(body[0].value))
        if isinstance(node, ast.Raise) or _is_error_call(node):
            exempt |= {id(sub) for sub in ast.walk(node)}
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in exempt
            and len([w for w in node.value.split() if re.search(r"[A-Za-z]", w)]) >= 3]


def test_the_english_detector_finds_a_sentence_bound_for_a_card() -> None:
    code = '''
def build(order):
    """A docstring of many words is fine."""
    log.warning("a log message of many words is fine")
    if not order:
        raise ValueError("an error message of many words is fine")
    return {"summary": "Sacroplasty is not covered", "detail": f"{order} is not covered here"}
'''
    assert [text for _, text in sentences(code)] == ["Sacroplasty is not covered", " is not covered here"]


def test_no_english_card_text_in_python() -> None:
    """Every word a card, a suggestion, an action or a CRD update shows comes from cards/ (issue 14 item 3)."""
    found = []
    for folder in ("pipeline", "web"):
        for path in sorted((ROOT / "cds_service" / folder).glob("*.py")):
            module = f"{folder}/{path.name}"
            if module in NOT_ON_THE_CARD_PATH:
                continue
            found += [f"{module}:{line}: {text!r}" for line, text in sentences(path.read_text(encoding="utf-8"))
                      if (module, text) not in ALLOWED]
    assert not found, "English in Python (move it to the pack's data):\n" + "\n".join(found)


def test_no_sacroplasty_word_in_the_generic_card_builder() -> None:
    tree = ast.parse((ROOT / "cds_service" / "pipeline" / "cards.py").read_text(encoding="utf-8"))
    words = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
             and re.fullmatch(r"[a-z]+", n.value) and "plasty" in n.value]
    assert words == []
