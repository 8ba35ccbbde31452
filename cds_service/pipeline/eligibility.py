"""Does the policy apply to this patient, and may chiropractic manipulation be offered?

Plan membership: an active Coverage whose payor is the policy's payer (policy.json "payer"). A payor is
recognised by an identifier in one of the payer's identifier systems (decisive either way when present), else
by name — the reference's display, or the name/alias of the Organization it points to (contained `#id`, or
included in the coverage Bundle) — case-insensitively, as whole words ("Sandhills Center Tailored Plan" is
Sandhills Center). The policy does not apply only when the patient has active Coverage and every payor of it
is known to be someone else. Cost: linear in payors + contained resources (contained is indexed once).

Chiropractic (policy: "in the first four weeks if there is no radiculopathy", value sets in conditions.json).
The line comes from acute low back pain guidance, so the four weeks run from the onset of low back pain — never
from a fracture. Per sacroplasty order, in this order:
1. not offered when a contraindication to spinal manipulation is recorded — on an active Condition, or as the
   order's own reason (reasonCode, or a Condition its reasonReference points to: contained in the order or in
   the prefetched conditions). A sacroplasty ordered for a sacral fracture carries it on its face;
2. not offered with a recorded radiculopathy (active Condition or the order's reason);
3. offered when active low back pain started within the window; not offered when it started before.
Onset is Condition.onsetDateTime, else onsetPeriod.start, else recordedDate (which can only prove "too late":
a problem is recorded on or after it starts). When it cannot be told — conditions unknown, no low back pain
recorded, or no precise enough date — the suggestion is still offered, its label asks to confirm (including the
contraindication check), and the card detail says what is missing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, timedelta
from functools import lru_cache
from typing import Any

from cds_service.pipeline.patient import PatientContext
from cds_service.pipeline.policy import Policy

ACTIVE_CLINICAL = {"active", "recurrence", "relapse"}
NOT_CONFIRMED = {"entered-in-error", "refuted"}
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
DATE = re.compile(r"(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?(?:T.*)?")


@dataclass(frozen=True)
class PlanStatus:
    applies: bool  # False: the patient has active coverage, none with the policy's payer
    coverage: dict[str, Any] | None  # the patient's Coverage with the payer, when known
    note: str | None  # message key in policy.messages for the card detail


@dataclass(frozen=True)
class ChiroStatus:
    offer: bool
    note: str | None  # message key in policy.messages for the card detail
    label_suffix: str = ""
    contraindications: frozenset[str] = frozenset()  # kinds recorded: they withhold alternatives (alternatives.json)


# -- plan membership ---------------------------------------------------------------------------------------

_NOT_WORD = re.compile(r"[^\w]+")


def _words(text: Any) -> str:
    return " ".join(_NOT_WORD.sub(" ", text.casefold()).split()) if isinstance(text, str) else ""


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


class PayerMatcher:
    """Recognises the policy's payer on a Coverage.payor reference."""

    def __init__(self, payer: dict[str, Any]) -> None:
        names = [payer.get("name"), *_as_list(payer.get("aliases"))]
        self.names = [n for n in (_words(name) for name in names) if n]
        self.identifiers = {
            (i["system"], i["value"].strip()) for i in _as_list(payer.get("identifiers"))
            if isinstance(i, dict) and isinstance(i.get("system"), str) and isinstance(i.get("value"), str)
        }
        self.systems = {system for system, _ in self.identifiers}

    def _named(self, name: Any) -> bool:
        padded = f" {_words(name)} "
        return any(f" {n} " in padded for n in self.names)

    def payor(self, reference: dict[str, Any], coverage: dict[str, Any],
              organizations: dict[str, dict[str, Any]],
              contained: dict[str, dict[str, Any]] | None = None) -> bool | None:
        """True: the payer; False: someone else; None: cannot tell (no identifier we know, no name).
        `contained`: the coverage's contained Organizations by id (`contained_organizations`), when the caller
        has indexed them already."""
        if contained is None:
            contained = contained_organizations(coverage)
        organization = _resolve(reference.get("reference"), contained, organizations)
        identifiers = [reference.get("identifier"), *_as_list(organization.get("identifier"))]
        known = [i for i in identifiers if isinstance(i, dict) and isinstance(i.get("system"), str)
                 and isinstance(i.get("value"), str) and i["system"] in self.systems]
        if known:
            return any((i["system"], i["value"].strip()) in self.identifiers for i in known)
        names = [reference.get("display"), organization.get("name"), *_as_list(organization.get("alias"))]
        names = [n for n in names if isinstance(n, str) and n.strip()]
        if not names:
            return None
        return any(self._named(n) for n in names)

    def coverage(self, coverage: dict[str, Any], organizations: dict[str, dict[str, Any]]) -> bool | None:
        contained = contained_organizations(coverage)  # once per Coverage: payors × contained stays linear
        verdicts = [self.payor(p, coverage, organizations, contained) for p in _as_list(coverage.get("payor"))
                    if isinstance(p, dict)]
        if any(v is True for v in verdicts):
            return True
        return False if verdicts and all(v is False for v in verdicts) else None


def contained_organizations(coverage: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The Coverage's contained Organizations by id, read in one pass (the first of a repeated id wins)."""
    found: dict[str, dict[str, Any]] = {}
    for resource in _as_list(coverage.get("contained")):
        if isinstance(resource, dict) and resource.get("resourceType") == "Organization" \
                and isinstance(resource.get("id"), str):
            found.setdefault(resource["id"], resource)
    return found


def _resolve(reference: Any, contained: dict[str, dict[str, Any]],
             organizations: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The Organization a payor reference points to, when it came with the data; else {}."""
    if not isinstance(reference, str) or not reference:
        return {}
    if reference.startswith("#"):
        return contained.get(reference[1:], {})
    if reference in organizations:
        return organizations[reference]
    parts = reference.split("/_history/")[0].rstrip("/").split("/")
    return organizations.get("/".join(parts[-2:]), {}) if len(parts) >= 2 else {}


@lru_cache(maxsize=8)
def _payer_matcher(policy: Policy) -> PayerMatcher:
    return PayerMatcher(policy.payer)


def plan_status(ctx: PatientContext, policy: Policy) -> PlanStatus:
    if "coverage" in ctx.unavailable:
        return PlanStatus(True, None, "coverage_fetch_failed")
    active = [c for c in ctx.coverages or [] if c.get("status") == "active"]
    if not active:
        return PlanStatus(True, None, "plan_unknown")
    matcher = _payer_matcher(policy)
    verdicts = [(c, matcher.coverage(c, ctx.organizations)) for c in active]
    member = next((c for c, verdict in verdicts if verdict is True), None)
    if member is not None:
        return PlanStatus(True, member, "plan_member")
    if any(verdict is None for _, verdict in verdicts):
        return PlanStatus(True, None, "plan_unidentified")
    return PlanStatus(False, None, None)


# -- chiropractic rule --------------------------------------------------------------------------------------

def _code_key(system: str, code: str) -> str:
    code = code.strip().upper()
    return code.replace(".", "") if system == ICD10CM else code


MEMO_SIZE = 4096  # codings whose labels a CodeIndex remembers (then it starts over)


class CodeIndex:
    """Codes from conditions.json, each with a label; a code ending in '*' matches every code it starts
    (ICD-10-CM dots ignored). Looking a coding up costs one probe per distinct prefix length, whatever the
    number of codes listed."""

    def __init__(self, labelled: Iterable[tuple[Any, Iterable[dict[str, Any]]]],
                 aliases: dict[str, str] | None = None) -> None:
        self.aliases = {k: v for k, v in (aliases or {}).items() if not k.startswith("_")}
        self.exact: dict[tuple[str, str], Any] = {}
        self.prefixes: dict[tuple[str, str], Any] = {}
        lengths: set[int] = set()
        for label, entries in labelled:
            for entry in entries:
                system, code = entry["system"], entry["code"]
                if code.endswith("*"):
                    key = _code_key(system, code[:-1])
                    self.prefixes.setdefault((system, key), label)
                    lengths.add(len(key))
                else:
                    self.exact.setdefault((system, _code_key(system, code)), label)
        self.lengths = sorted(lengths)
        self._memo: dict[tuple[str, str], frozenset[Any]] = {}  # see coding_labels

    def labels(self, concept: Any) -> set[Any]:
        """The labels of every coding of a CodeableConcept that is in the index."""
        found: set[Any] = set()
        for coding in _as_list(concept.get("coding")) if isinstance(concept, dict) else []:
            if not isinstance(coding, dict) or not isinstance(coding.get("system"), str) \
                    or not isinstance(coding.get("code"), str):
                continue
            found |= self.coding_labels(coding["system"], coding["code"])
        return found

    def coding_labels(self, sent: str, code: str) -> frozenset[Any]:
        """The labels of one coding (its system as sent). Remembered per (system, code), for codes of a
        plausible length and at most MEMO_SIZE of them: the same diagnosis codes recur in call after call
        (each conditions.json index is read several times per sacroplasty), and the answer depends on the
        code alone."""
        key = (sent, code)
        found = self._memo.get(key)
        if found is None:
            found = self._look_up(sent, code)
            if len(code) <= 64 and len(sent) <= 256:
                if len(self._memo) >= MEMO_SIZE:
                    self._memo.clear()
                self._memo[key] = found
        return found

    def _look_up(self, sent: str, code: str) -> frozenset[Any]:
        found: set[Any] = set()
        system = self.aliases.get(sent, sent)
        code = _code_key(system, code)
        if (system, code) in self.exact:
            found.add(self.exact[(system, code)])
        for length in self.lengths:
            if length > len(code):
                break
            label = self.prefixes.get((system, code[:length]))
            if label is not None:
                found.add(label)
        return frozenset(found)


class ValueSet(CodeIndex):
    """One value set of conditions.json."""

    def __init__(self, entries: Iterable[dict[str, Any]], aliases: dict[str, str] | None = None) -> None:
        super().__init__([(True, entries)], aliases)

    def matches(self, concept: Any) -> bool:
        return bool(self.labels(concept))


def _codes(concept: Any) -> set[str]:
    return {c["code"] for c in _as_list(concept.get("coding"))
            if isinstance(c, dict) and isinstance(c.get("code"), str)} \
        if isinstance(concept, dict) else set()


def is_active(condition: dict[str, Any]) -> bool:
    """clinicalStatus active / recurrence / relapse, and not entered-in-error or refuted."""
    return bool(_codes(condition.get("clinicalStatus")) & ACTIVE_CLINICAL) and not is_refuted(condition)


def may_be_present(condition: dict[str, Any]) -> bool:
    """Active, or with no clinical status at all, and not refuted: enough to withhold an unsafe order (a
    missing status is no evidence that a fracture or an infection has resolved)."""
    status = _codes(condition.get("clinicalStatus"))
    return (not status or bool(status & ACTIVE_CLINICAL)) and not is_refuted(condition)


def is_refuted(condition: dict[str, Any]) -> bool:
    """verificationStatus entered-in-error or refuted: the record does not say the patient has it."""
    return bool(_codes(condition.get("verificationStatus")) & NOT_CONFIRMED)


def date_range(value: Any) -> tuple[date, date] | None:
    """The first and last day a FHIR date/dateTime can mean (YYYY, YYYY-MM, YYYY-MM-DD[Thh:mm...])."""
    match = DATE.fullmatch(value.strip()) if isinstance(value, str) else None
    if not match:
        return None
    year = int(match.group(1))  # always there: the pattern requires it
    month, day = (int(g) if g else None for g in match.groups()[1:])
    try:
        if month is None:
            return date(year, 1, 1), date(year, 12, 31)
        if day is None:
            first = date(year, month, 1)
            return first, (first.replace(day=28) + timedelta(days=4)).replace(day=1) - timedelta(days=1)
        return date(year, month, day), date(year, month, day)
    except (ValueError, OverflowError):  # no such day; or December 9999
        return None


def onset_window(condition: dict[str, Any], cutoff: date) -> str:
    """'within' (started on/after cutoff), 'before' (started before it) or 'unknown'."""
    period = condition.get("onsetPeriod")
    onset = date_range(condition.get("onsetDateTime")) \
        or date_range(period.get("start") if isinstance(period, dict) else None)
    if onset:
        first, last = onset
        return "within" if first >= cutoff else "before" if last < cutoff else "unknown"
    recorded = date_range(condition.get("recordedDate"))
    if recorded and recorded[1] < cutoff:
        return "before"  # recorded before the window, so it started before it too
    return "unknown"


RADICULOPATHY = "radiculopathy"


TEXT_READ = 300  # characters of each text read for contraindication words (a bounded cost per text)


def concept_texts(concept: Any) -> list[str]:
    """The text and coding displays of a CodeableConcept, each cut to TEXT_READ characters."""
    if not isinstance(concept, dict):
        return []
    texts = [concept.get("text")] + [c.get("display") for c in _as_list(concept.get("coding")) if isinstance(c, dict)]
    return [t[:TEXT_READ] for t in texts if isinstance(t, str) and t]


_WORD_BEFORE = frozenset("abcdefghijklmnopqrstuvwxyz0123456789")  # what may not touch a word on its left
_WORD_AFTER = frozenset("abcdefghijklmnopqrstuvwxyz")  # ... on its right (a digit may: "L5" after "fx")


def names_word(text: str, words: tuple[str, ...]) -> bool:
    """Does `text` hold one of `words` as a whole word: what the pattern (?<![a-z0-9])(?:w1|w2|...)(?![a-z])
    finds (tests/test_hotpath_golden.py checks they agree), through str.find instead of a regular expression."""
    for word in words:
        start = text.find(word)
        while start != -1:
            end = start + len(word)
            if (start == 0 or text[start - 1] not in _WORD_BEFORE) and \
                    (end == len(text) or text[end] not in _WORD_AFTER):
                return True
            start = text.find(word, start + 1)
    return False


@dataclass(frozen=True)
class ChiroRules:
    """conditions.json compiled once per policy: one index labels each code with its contraindication kind
    (rank = position in the file, the first kind found is the one named) or RADICULOPATHY; `words` holds, per
    kind, the casefolded words that name it in free text, found as whole words by `names_word` (C-speed
    substring search: a regular expression per kind tried every word at every position, a third of a
    sacroplasty call's decision)."""
    index: CodeIndex
    kinds: tuple[str, ...]
    words: tuple[tuple[str, tuple[str, ...]], ...]
    low_back_pain: ValueSet
    window_days: int

    def findings(self, concepts: Iterable[Any]) -> tuple[frozenset[str], bool]:
        """(the contraindication kinds, any radiculopathy) among CodeableConcepts, by code or by word."""
        labels: set[Any] = set()
        texts: list[str] = []
        for concept in concepts:
            labels |= self.index.labels(concept)
            texts += concept_texts(concept)
        if texts:
            text = "\n".join(texts).casefold()
            labels |= {kind for kind, words in self.words if names_word(text, words)}
        return frozenset(k for k in self.kinds if k in labels), RADICULOPATHY in labels

    def radiculopathy(self, concepts: Iterable[Any]) -> bool:
        """`findings(concepts)[1]`, without reading texts when no word list can name radiculopathy (words name
        contraindication kinds): the chiropractic rule asks this of every sacroplasty order's reasons, and the
        word search is most of what `findings` costs."""
        if any(kind == RADICULOPATHY for kind, _ in self.words):
            return self.findings(concepts)[1]
        return any(RADICULOPATHY in self.index.labels(concept) for concept in concepts)

    def first(self, kinds: Iterable[str]) -> str | None:
        """The kind named on the card: the first, in the file's order, of those recorded."""
        recorded = set(kinds)
        return next((k for k in self.kinds if k in recorded), None)


@lru_cache(maxsize=8)
def chiro_rules(policy: Policy) -> ChiroRules:
    conditions = policy.conditions
    aliases = conditions.get("system_aliases", {})
    contraindications = {k: v for k, v in conditions["contraindications"].items() if not k.startswith("_")}
    index = CodeIndex([*((kind, value["codes"]) for kind, value in contraindications.items()),
                       (RADICULOPATHY, conditions["radiculopathy"])], aliases)
    words = tuple((kind, tuple(w.casefold() for w in value["words"]))
                  for kind, value in contraindications.items() if value.get("words"))
    return ChiroRules(index, tuple(contraindications), words, ValueSet(conditions["low_back_pain"], aliases),
                      int(conditions["onset_window_days"]))


@dataclass(frozen=True)
class PatientContraindications:
    """The contraindication kinds of conditions.json recorded for the patient (computed once per call);
    `for_order` adds those the order's own code text and reasons name."""
    kinds: frozenset[str]
    rules: ChiroRules
    conditions_by_reference: dict[str, dict[str, Any]]  # "Condition/<id>" → Condition, for reasonReference

    def for_order(self, order: dict[str, Any]) -> frozenset[str]:
        concepts = [order.get("code"), *order_reasons(order, self.conditions_by_reference)]
        kinds, _ = self.rules.findings(concepts)
        return kinds | self.kinds


def patient_contraindications(ctx: PatientContext, policy: Policy) -> PatientContraindications:
    """Contraindications on the patient's Conditions that may be present (active, or with no status)."""
    rules = chiro_rules(policy)
    conditions = [c for c in ctx.conditions or [] if isinstance(c, dict)]
    by_reference = {f"Condition/{c['id']}": c for c in conditions if isinstance(c.get("id"), str)}
    kinds, _ = _condition_findings(ctx, policy)
    return PatientContraindications(kinds, rules, by_reference)


def _condition_findings(ctx: PatientContext, policy: Policy) -> tuple[frozenset[str], bool]:
    """`findings` over the codes of the patient's Conditions that may be present. Both the contraindications
    and the chiropractic rule need it: read once per call and pack (kept on the call's PatientContext)."""
    key = ("condition_findings", policy)
    found = ctx.memo.get(key)
    if found is None:
        present = (c.get("code") for c in ctx.conditions or [] if isinstance(c, dict) and may_be_present(c))
        found = ctx.memo[key] = chiro_rules(policy).findings(present)
    return found


@dataclass(frozen=True)
class PatientChiro:
    """The patient-level part of the chiropractic rule, computed once per call; `for_order` adds each
    sacroplasty order's own reasons and the contraindications recorded for it."""
    radiculopathy: bool
    status: ChiroStatus  # the answer when no contraindication or radiculopathy is recorded
    conditions_by_reference: dict[str, dict[str, Any]]  # "Condition/<id>" → Condition, for reasonReference

    def for_order(self, order: dict[str, Any] | None, policy: Policy,
                  contraindications: frozenset[str] = frozenset()) -> ChiroStatus:
        rules = chiro_rules(policy)
        radiculopathy = rules.radiculopathy(order_reasons(order, self.conditions_by_reference)) \
            if isinstance(order, dict) else False
        first = rules.first(contraindications)
        if first:
            return ChiroStatus(False, f"chiro_contraindicated_{first}", contraindications=contraindications)
        if radiculopathy or self.radiculopathy:
            return ChiroStatus(False, "chiro_radiculopathy")
        return self.status


def order_reasons(order: dict[str, Any], conditions_by_reference: dict[str, dict[str, Any]]) -> list[Any]:
    """The order's reasonCode concepts, and the codes of the Conditions its reasonReference points to that
    came with the call (contained in the order, or in the prefetched conditions); refuted ones are ignored."""
    concepts = _one_or_many(order.get("reasonCode"))  # a lone object is read too, as the hook parser allows
    sent = [r.get("reference") for r in _one_or_many(order.get("reasonReference")) if isinstance(r, dict)]
    references = [r for r in sent if isinstance(r, str) and r]
    if not references:
        return concepts
    contained = {r["id"]: r for r in _as_list(order.get("contained")) if isinstance(r, dict)
                 and r.get("resourceType") == "Condition" and isinstance(r.get("id"), str)}
    for reference in references:
        condition = contained.get(reference[1:]) if reference.startswith("#") \
            else conditions_by_reference.get(_local_reference(reference))
        if condition is not None and not is_refuted(condition):
            concepts.append(condition.get("code"))
    return concepts


def _one_or_many(value: Any) -> list[Any]:
    return [value] if isinstance(value, dict) else list(_as_list(value))


def _local_reference(reference: str) -> str:
    """'Condition/<id>' from a relative or absolute reference (a version suffix dropped)."""
    parts = reference.split("/_history/")[0].rstrip("/").split("/")
    return "/".join(parts[-2:]) if len(parts) >= 2 else reference


def patient_chiropractic(ctx: PatientContext, policy: Policy, today: date) -> PatientChiro:
    """What the patient's conditions say about chiropractic, before any order's reasons are read."""
    messages = policy.messages
    if ctx.conditions is None or "conditions" in ctx.unavailable:
        return PatientChiro(False, ChiroStatus(True, "chiro_unknown", messages["chiro_label_unknown"]), {})
    rules = chiro_rules(policy)
    by_reference = {f"Condition/{c['id']}": c for c in ctx.conditions
                    if isinstance(c, dict) and isinstance(c.get("id"), str)}
    present = [c for c in ctx.conditions if isinstance(c, dict) and may_be_present(c)]
    _, radiculopathy = _condition_findings(ctx, policy)
    back_pain = [c for c in present if is_active(c) and rules.low_back_pain.matches(c.get("code"))]
    if not back_pain:
        status = ChiroStatus(True, "chiro_no_problem", messages["chiro_label_onset_unknown"])
    else:
        cutoff = today - timedelta(days=rules.window_days)
        windows = {onset_window(c, cutoff) for c in back_pain}
        if "within" in windows:
            status = ChiroStatus(True, "chiro_offered")
        elif "unknown" in windows:
            status = ChiroStatus(True, "chiro_onset_unknown", messages["chiro_label_onset_unknown"])
        else:
            status = ChiroStatus(False, "chiro_too_late")
    return PatientChiro(radiculopathy, status, by_reference)
