"""The policy pack schema: typed models of every file of a pack (and of cards/services.json), checked once at load.

A pack is data a payer's analyst maintains, so a mistake in it must stop the service at start, not surface as a
500 on the first call that needs the key. `validate_pack` and `validate_services` raise PolicyError naming the
FILE, the FIELD (a dotted path) and what is wrong. Keys starting with "_" are comments, allowed anywhere; any
other key the code does not read is an error, so a typo is caught. Beyond the shapes it checks what ties the
files to the code: every placeholder of a text template is one the code fills, every message key the code can
ask for exists, every code system is an absolute URI, every rule name is in the registry, every regular
expression compiles, every value set an alternative names exists, and every source quote is in the policy text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from string import Template
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    model_validator,
)
from pydantic_core import ErrorDetails


class PolicyError(Exception):
    """The cards/ data is missing or malformed: the service must not start with it. The message is one line
    naming the file, the field and what is wrong; `problems` holds every problem found (one line each)."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or [message]

    @classmethod
    def of(cls, problems: list[str]) -> PolicyError:
        more = f" (and {len(problems) - 1} more problem(s); run `cds-service check-policy`)" \
            if len(problems) > 1 else ""
        return cls(problems[0] + more, problems)


# --- what the code fills and asks for ---------------------------------------------------------------------------

# Placeholders each text template may use: the keyword arguments its caller passes (pipeline/cards.py,
# web/policy_page.py, pipeline/evaluate.py). A template using another one fails at the call (KeyError).
DETAIL_PLACEHOLDERS = frozenset({"order", "number", "revision_date", "alternatives", "also_covered", "notes",
                                 "policy_page_link", "policy_page"})
PAGE_PLACEHOLDERS = frozenset({"number", "revision_date", "url", "alternatives", "override_reasons", "history"})
CARD_TEMPLATES = {  # policy.json card.<key> → its placeholders
    "alternatives_listed": frozenset({"list"}),
    "also_covered": frozenset({"list"}),
    "delete_description": frozenset({"order", "number"}),
    "create_description": frozenset({"text"}),
}
SERVICE_PLACEHOLDERS = frozenset({"packs"})
# Message keys asked for on every call (eligibility.plan_status) ...
PLAN_MESSAGES = frozenset({"plan_unknown", "plan_member", "coverage_fetch_failed", "plan_unidentified"})
# ... and by each conditional rule a pack names (pipeline/rules.py); "{kind}" stands for every contraindication
# kind of conditions.json. A rule missing here fails tests/test_schema.py.
RULE_MESSAGES: dict[str, frozenset[str]] = {
    "chiropractic-first-four-weeks": frozenset({
        "chiro_offered", "chiro_radiculopathy", "chiro_too_late", "chiro_unknown", "chiro_label_unknown",
        "chiro_no_problem", "chiro_onset_unknown", "chiro_label_onset_unknown", "chiro_contraindicated_{kind}"}),
}
HOOKS = ("order-select", "order-sign")

_PLACEHOLDER = re.compile(r"\$(?:([_a-z][_a-z0-9]*)|\{([_a-z][_a-z0-9]*)\})", re.IGNORECASE)
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:\S+")
_OID = re.compile(r"urn:oid:[0-2](?:\.(?:0|[1-9][0-9]*))+")
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9.\-]{0,63}")


def _drop_comments(value: Any) -> Any:
    """Keys starting with "_" are comments: left out before a mapping is validated."""
    return {k: v for k, v in value.items() if not (isinstance(k, str) and k.startswith("_"))} \
        if isinstance(value, dict) else value


def _code_system(value: str) -> str:
    """An absolute URI (http(s) with a host, a URN, ...) or urn:oid:<dotted digits>; never a bare name or OID."""
    if not _URI.fullmatch(value):
        raise ValueError(f"{value!r} is not an absolute URI (e.g. http://snomed.info/sct or urn:oid:2.16.840.1...)")
    lower = value.lower()
    if lower.startswith("urn:oid:") and not _OID.fullmatch(value):
        raise ValueError(f"{value!r} is not a valid urn:oid (digits separated by dots)")
    if lower.startswith(("http:", "https:")) and not re.match(r"https?://[^/\s]+", lower):
        raise ValueError(f"{value!r}: an http(s) URI needs a host")
    return value


def _pattern(value: str) -> str:
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"regular expression {value!r} does not compile: {exc}") from None
    return value


def _phrase(value: str) -> str:
    """A detection word or phrase: words, each optionally ending in * (prefix) or ~ (misspelling-tolerant)."""
    if not value.strip() or any(not w.rstrip("*~") for w in value.split()):
        raise ValueError(f"{value!r} is not a word or phrase (a bare * or ~ matches nothing)")
    return value


Text = Annotated[str, Field(min_length=1)]
CodeSystem = Annotated[str, AfterValidator(_code_system)]
Regex = Annotated[str, Field(min_length=1), AfterValidator(_pattern)]
Phrases = list[Annotated[str, AfterValidator(_phrase)]]


class Strict(BaseModel):
    """Unknown keys are errors, except comments ("_...")."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _comments(cls, data: Any) -> Any:
        return _drop_comments(data)


class Coding(Strict):
    system: CodeSystem
    code: Text
    display: str | None = None


class Identifier(Strict):
    system: CodeSystem
    value: Text


# --- policy.json ------------------------------------------------------------------------------------------------

class Payer(Strict):
    name: Text
    aliases: list[Text] = []
    identifiers: list[Identifier] = []
    adopted_from: str | None = None


class Source(Strict):
    label: Text
    url: Annotated[str, Field(pattern=r"^https?://[^\s/]+\S*$")]
    topic: Coding


class Card(Strict):
    summary: Annotated[str, Field(min_length=1, max_length=140)]  # CDS Hooks: summary under 140 characters
    indicator: Literal["info", "warning", "critical"]
    selection_behavior: Literal["at-most-one", "any"]
    note_on_created_order: Text
    policy_page_link: Text
    alternatives_offered: Text
    alternatives_listed: Text
    also_covered: Text
    delete_description: Text
    create_description: Text
    unnamed_order: Text  # what the card calls an order that has neither text nor code
    # order-dispatch / appointment-book: the card goes to the performer or scheduler, who cannot change the
    # order; this line says who decides on the alternatives. Optional: without it, no such line.
    not_the_orderer: Text | None = None


class Crd(Strict):
    coverage_reason: Text
    coverage_action_description: Text


class PolicyFile(Strict):
    id: Annotated[str, Field(pattern=_ID.pattern)]
    number: Text
    title: Text
    version: Text
    revision_date: Text
    effective_date: Text
    ruling: Text
    payer: Payer
    source: Source
    card: Card
    messages: dict[str, str]
    override_reasons: list[Coding]
    crd: Crd
    history: list[Text]


# --- detection.json ---------------------------------------------------------------------------------------------

class DetectCode(Strict):
    systems: Annotated[list[Text], Field(min_length=1)]  # labels of code_systems
    code: Text
    display: str | None = None
    laterality: Literal["unilateral", "bilateral"] | None = None


class NamingNoProcedureCode(Strict):
    systems: Annotated[list[Text], Field(min_length=1)]
    code: Text
    kind: Text
    display: str | None = None


class CodesNamingNoProcedure(Strict):
    codes: list[NamingNoProcedureCode] = []


class CodesWithoutSystem(Strict):
    format: Regex


class VertebralAugmentation(Strict):
    codes: list[DetectCode] = []
    sacral_site_codes: list[Coding] = []


class SacralSite(Strict):
    words: Phrases = []
    not_a_bone_after: Phrases = []
    not_a_bone_before: Phrases = []
    landmark_before: Phrases = []
    diagnosis_after: Phrases = []
    history_before: Phrases = []
    history_next: Phrases = []
    history_window: Annotated[StrictInt, Field(ge=1, le=19)] = 4


class NotAnOrder(Strict):
    history: Phrases = []
    temporal: Phrases = []
    modifiers: Phrases = []
    modifiers_after_head: Phrases = []
    order_kinds: Phrases = []
    accompanying: Phrases = []
    imaging: Phrases = []
    imaging_unless_within: Annotated[StrictInt, Field(ge=0, le=9)] = 3
    guidance: Phrases = []


class TextRule(Strict):
    id: Text
    rule: Literal["text", "vertebral-augmentation-site"] = "text"
    words: Annotated[Phrases, Field(min_length=1)]
    sacral_within: Annotated[StrictInt, Field(ge=0, le=50)] | None = None
    hardware_within: Annotated[StrictInt, Field(ge=0, le=50)] | None = None
    other_bone: StrictBool = False


class TextRules(Strict):
    max_chars: Annotated[StrictInt, Field(ge=20, le=5000)] = 300
    max_texts: Annotated[StrictInt, Field(ge=1, le=100)] = 12
    fuzzy_edits: Annotated[StrictInt, Field(ge=0, le=3)] = 2
    rules: list[TextRule] = []
    bilateral: Phrases = []
    hardware: Phrases = []
    other_bones: Phrases = []


class DetectionFile(Strict):
    code_systems: Annotated[dict[str, Annotated[list[CodeSystem], Field(min_length=1)]],
                            BeforeValidator(_drop_comments)]
    code_formats: Annotated[dict[str, Regex], BeforeValidator(_drop_comments)] = {}
    codes: Annotated[list[DetectCode], Field(min_length=1)]
    codes_naming_no_procedure: CodesNamingNoProcedure = CodesNamingNoProcedure()
    codes_without_system: CodesWithoutSystem | None = None
    bilateral_modifiers: list[Text] = []
    vertebral_augmentation: VertebralAugmentation = VertebralAugmentation()
    sacral_site: SacralSite = SacralSite()
    not_an_order: NotAnOrder = NotAnOrder()
    text: TextRules = TextRules()
    screen: list[Text] = []


# --- alternatives.json, conditions.json -------------------------------------------------------------------------

class Orderable(Strict):
    id: Text
    label: Text
    policy_text: Text
    card_text: Text
    text: Text
    codings: Annotated[list[Coding], Field(min_length=1)]
    rule: str | None = None
    reasons_that_fit: list[Text]
    withheld_when: list[Text]


class AlsoCovered(Strict):
    id: Text
    policy_text: Text
    card_text: Text


class AlternativesFile(Strict):
    orderable: list[Orderable]
    also_covered: list[AlsoCovered] = []


class Contraindication(Strict):
    name: str | None = None
    codes: list[Coding]
    words: list[Text] = []


class ConditionsFile(BaseModel):
    """Fixed keys, plus any number of further value sets (lists of codes) an alternative can name."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)
    __pydantic_extra__: dict[str, list[Coding]]

    onset_window_days: Annotated[StrictInt, Field(ge=1, le=3650)]
    radiculopathy: list[Coding]
    low_back_pain: list[Coding]
    contraindications: Annotated[dict[str, Contraindication], BeforeValidator(_drop_comments)]
    system_aliases: Annotated[dict[CodeSystem, CodeSystem], BeforeValidator(_drop_comments)] = {}

    @model_validator(mode="before")
    @classmethod
    def _comments(cls, data: Any) -> Any:
        return _drop_comments(data)

    def value_sets(self) -> set[str]:
        return {"radiculopathy", "low_back_pain", *(self.model_extra or {})}


# --- sources.json, examples.json, services.json -----------------------------------------------------------------

class SourceEntry(Strict):
    where: Text
    quotes: list[Text] = []
    note: str | None = None
    code_book: str | None = None


class SourcesFile(Strict):
    document: Text
    entries: list[SourceEntry]


class Expected(Strict):
    card: StrictBool
    rule: str | None = None  # how the order was recognised: "code", "text", "vertebral-augmentation-site"
    offered: list[Text] | None = None
    not_offered: list[Text] = []


class Example(Strict):
    name: Text
    why: Text
    hook: Literal["order-select", "order-sign"] = "order-sign"
    today: Annotated[str, Field(pattern=r"^\d{4}-\d{2}-\d{2}$")] | None = None  # default: the table's
    orders: Annotated[list[dict[str, Any]], Field(min_length=1)]
    prefetch: dict[str, Any] | None = None
    expected: Expected


class ExamplesFile(Strict):
    today: Annotated[str, Field(pattern=r"^\d{4}-\d{2}-\d{2}$")]
    cases: Annotated[list[Example], Field(min_length=1)]


class Service(Strict):
    hook: Literal["order-select", "order-sign", "order-dispatch", "appointment-book"]
    id: Annotated[str, Field(pattern=_ID.pattern)]
    title: Text
    description: Text


class CrdOption(Strict):
    code: Text
    type: Literal["boolean", "integer", "string"]
    name: Text
    description: Text
    default: bool | int | str
    response: Literal["coverage-info", "alternatives", "max-cards"]


class CrdConfig(Strict):
    versions: Annotated[list[Text], Field(min_length=1)]
    options: list[CrdOption]


class ServicesFile(Strict):
    services: Annotated[list[Service], Field(min_length=1)]
    crd: CrdConfig


# --- validation -------------------------------------------------------------------------------------------------

def _dotted(loc: Iterable[Any]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _describe(error: ErrorDetails) -> str:
    kind = error.get("type")
    if kind == "extra_forbidden":
        return "unknown key (a typo? comments start with '_')"
    if kind == "missing":
        return "missing"
    return str(error.get("msg", "invalid")).removeprefix("Value error, ")


def _problems(path: Path, exc: ValidationError) -> list[str]:
    # a union's alternatives repeat one loc per member type: the first error per field is enough
    seen: dict[str, str] = {}
    for error in exc.errors(include_url=False):
        loc = [p for p in error["loc"]
               if not (isinstance(p, str) and (p == "[key]" or p.startswith(("function-", "constrained-"))))]
        seen.setdefault(_dotted(loc), _describe(error))
    return [f"{path}: {field}: {what}" for field, what in seen.items()]


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise PolicyError(f"{path}: not valid JSON: {exc}") from None


def parse(model: type[Any], path: Path, data: Any | None = None) -> Any:
    """`model` validated from the JSON file at `path`; PolicyError naming file and field otherwise."""
    data = read_json(path) if data is None else data
    if not isinstance(data, dict):
        raise PolicyError(f"{path}: (top level): expected a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise PolicyError.of(_problems(path, exc)) from None


def template_problems(path: Path, field: str, text: str, allowed: frozenset[str]) -> list[str]:
    """Placeholders of a string.Template text that the code does not fill, or a stray "$"."""
    identifiers = _placeholders(text)
    if identifiers is None:
        return [f"{path}: {field}: a '$' that starts no placeholder (write $$ for a dollar sign)"]
    unknown = sorted(identifiers - allowed)
    return [f"{path}: {field}: unknown placeholder ${name} (this text can use "
            f"{', '.join('$' + a for a in sorted(allowed)) or 'none'})" for name in unknown]


def _placeholders(text: str) -> set[str] | None:
    """The $name / ${name} placeholders of a string.Template text; None when a "$" starts none. What
    Template.is_valid and get_identifiers tell, which Python 3.10 (still supported) does not have."""
    names: set[str] = set()
    for match in Template.pattern.finditer(text):
        if match.group("invalid") is not None:
            return None
        name = match.group("named") or match.group("braced")
        if name is not None:
            names.add(name)
    return names


def _verbatim_problems(path: Path, field: str, text: str) -> list[str]:
    """A text shown as written: a $name in it would reach the card unfilled."""
    found = _PLACEHOLDER.search(text)
    return [f"{path}: {field}: ${found.group(1) or found.group(2)} is shown as written here "
            "(this text takes no placeholders)"] if found else []


def _normal(text: str) -> str:
    """Quotes compare whitespace-insensitively (the policy text is a PDF extraction with hard line breaks)."""
    return " ".join(text.replace("\u2019", "'").split())


def check_pack(folder: Path, policy: PolicyFile, detection: DetectionFile, alternatives: AlternativesFile,
               conditions: ConditionsFile, detail: str, page: str) -> list[str]:
    """What ties the files of one pack to each other and to the code; each problem names file and field."""
    from cds_service.pipeline.rules import RULES  # the registry imports policy.py, which imports this module

    problems: list[str] = []
    p_json, a_json, d_json = folder / "policy.json", folder / "alternatives.json", folder / "detection.json"
    problems += template_problems(folder / "detail.md", "(template)", detail, DETAIL_PLACEHOLDERS)
    problems += template_problems(folder / "page.md", "(template)", page, PAGE_PLACEHOLDERS)
    card = policy.card.model_dump()
    for key, text in card.items():
        if key in CARD_TEMPLATES:
            problems += template_problems(p_json, f"card.{key}", text, CARD_TEMPLATES[key])
        elif isinstance(text, str):
            problems += _verbatim_problems(p_json, f"card.{key}", text)
    for key, text in policy.messages.items():
        problems += _verbatim_problems(p_json, f"messages.{key}", text)
    for key, text in policy.crd.model_dump().items():
        problems += _verbatim_problems(p_json, f"crd.{key}", text)

    # rules and the messages they ask for
    kinds = list(conditions.contraindications)
    wanted = set(PLAN_MESSAGES)
    ids: set[str] = set()
    for i, alternative in enumerate(alternatives.orderable):
        where = f"orderable[{i}]"
        if alternative.id in ids:
            problems.append(f"{a_json}: {where}.id: {alternative.id!r} is used twice")
        ids.add(alternative.id)
        if alternative.rule is not None:
            if alternative.rule not in RULES:
                problems.append(f"{a_json}: {where}.rule: unknown rule {alternative.rule!r} "
                                f"(known: {', '.join(sorted(RULES))})")
            else:
                wanted |= {k.format(kind=kind) for k in RULE_MESSAGES.get(alternative.rule, ()) for kind in kinds}
        for j, name in enumerate(alternative.reasons_that_fit):
            if name not in conditions.value_sets():
                problems.append(f"{a_json}: {where}.reasons_that_fit[{j}]: {name!r} is no value set of "
                                f"conditions.json (there: {', '.join(sorted(conditions.value_sets()))})")
        for j, kind in enumerate(alternative.withheld_when):
            if kind not in conditions.contraindications:
                problems.append(f"{a_json}: {where}.withheld_when[{j}]: {kind!r} is no contraindication kind of "
                                f"conditions.json (there: {', '.join(kinds)})")
    problems += [f"{p_json}: messages.{key}: missing (the code asks for it)" for key in sorted(wanted - set(
        policy.messages))]
    if not any(a.rule is not None and a.rule not in RULES for a in alternatives.orderable):  # else: noise
        problems += [f"{p_json}: messages.{key}: unknown message (nothing asks for it; a typo?)"
                     for key in sorted(set(policy.messages) - wanted)]

    # detection: code system labels
    labels = set(detection.code_systems)
    from cds_service.pipeline.detect import _system_key  # one normalisation of system URIs, the detector's
    known_uris = {_system_key(u) for uris in detection.code_systems.values() for u in uris}
    entries: list[tuple[str, Sequence[DetectCode | NamingNoProcedureCode]]] = [
        ("codes", detection.codes), ("vertebral_augmentation.codes", detection.vertebral_augmentation.codes),
        ("codes_naming_no_procedure.codes", detection.codes_naming_no_procedure.codes)]
    for field, codes in entries:
        for i, entry in enumerate(codes):
            for j, label in enumerate(entry.systems):
                if label not in labels:
                    problems.append(f"{d_json}: {field}[{i}].systems[{j}]: {label!r} is not a key of code_systems "
                                    f"({', '.join(sorted(labels))})")
    for label in detection.code_formats:
        if label not in labels:
            problems.append(f"{d_json}: code_formats.{label}: not a key of code_systems")
    for i, coding in enumerate(detection.vertebral_augmentation.sacral_site_codes):
        if _system_key(coding.system) not in known_uris:
            problems.append(f"{d_json}: vertebral_augmentation.sacral_site_codes[{i}].system: {coding.system!r} "
                            "is none of code_systems' URIs (the code would never match)")
    return problems


def check_sources(folder: Path) -> list[str]:
    """sources.json (when the pack has one): its shape, and every quote in its document (policy-text.txt)."""
    path = folder / "sources.json"
    if not path.is_file():
        return []
    sources: SourcesFile = parse(SourcesFile, path)
    document = folder / sources.document
    if not document.is_file():
        return [f"{path}: document: {sources.document!r} is not a file of the pack"]
    text = _normal(document.read_text(encoding="utf-8"))
    return [f"{path}: entries[{i}].quotes[{j}]: not in {sources.document}: {quote[:80]!r}"
            for i, entry in enumerate(sources.entries) for j, quote in enumerate(entry.quotes)
            if _normal(quote) not in text]


def validate_services(path: Path) -> ServicesFile:
    """cards/services.json: its shape, unique ids, one service per hook, placeholders of the descriptions."""
    services: ServicesFile = parse(ServicesFile, path)
    problems: list[str] = []
    seen_ids: set[str] = set()
    seen_hooks: set[str] = set()
    for i, service in enumerate(services.services):
        if service.id in seen_ids:
            problems.append(f"{path}: services[{i}].id: {service.id!r} is used twice")
        if service.hook in seen_hooks:
            problems.append(f"{path}: services[{i}].hook: a second service for {service.hook}")
        seen_ids.add(service.id)
        seen_hooks.add(service.hook)
        problems += template_problems(path, f"services[{i}].description", service.description,
                                      SERVICE_PLACEHOLDERS)
        problems += _verbatim_problems(path, f"services[{i}].title", service.title)
    if problems:
        raise PolicyError.of(problems)
    return services
