"""Does the policy apply to this patient, and may chiropractic manipulation be offered?

Plan membership: an active Coverage whose payor is the policy's payer (policy.json "payer"). A payor is
recognised by an identifier in one of the payer's identifier systems (decisive either way when present), else
by name — the reference's display, or the name/alias of the Organization it points to (contained `#id`, or
included in the coverage Bundle) — case-insensitively, as whole words ("Sandhills Center Tailored Plan" is
Sandhills Center). The policy does not apply only when the patient has active Coverage and every payor of it
is known to be someone else.

Chiropractic (policy: "in the first four weeks if there is no radiculopathy", value sets in conditions.json):
offered when no active radiculopathy is recorded and an active back-pain / sacral-fracture problem started
within the window. Onset is Condition.onsetDateTime, else onsetPeriod.start, else recordedDate (which can
only prove "too late": a problem is recorded on or after it starts). When it cannot be told — conditions
unknown, no such problem recorded, or no precise enough date — the suggestion is still offered, its label
asks to confirm, and the card detail says what is missing.
"""

from __future__ import annotations

from functools import lru_cache

import re
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any, Iterable

from .patient import PatientContext
from .policy import Policy

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


# -- plan membership ---------------------------------------------------------------------------------------

def _words(text: Any) -> str:
    return " ".join(re.sub(r"[^\w]+", " ", text.casefold()).split()) if isinstance(text, str) else ""


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
              organizations: dict[str, dict[str, Any]]) -> bool | None:
        """True: the payer; False: someone else; None: cannot tell (no identifier we know, no name)."""
        organization = _resolve(reference.get("reference"), coverage, organizations)
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
        verdicts = [self.payor(p, coverage, organizations) for p in _as_list(coverage.get("payor"))
                    if isinstance(p, dict)]
        if any(v is True for v in verdicts):
            return True
        return False if verdicts and all(v is False for v in verdicts) else None


def _resolve(reference: Any, coverage: dict[str, Any], organizations: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The Organization a payor reference points to, when it came with the data; else {}."""
    if not isinstance(reference, str) or not reference:
        return {}
    if reference.startswith("#"):
        return next((r for r in _as_list(coverage.get("contained")) if isinstance(r, dict)
                     and r.get("resourceType") == "Organization" and r.get("id") == reference[1:]), {})
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


class ValueSet:
    """Codes from conditions.json; a code ending in '*' matches every code it starts (ICD-10-CM dots ignored)."""

    def __init__(self, entries: Iterable[dict[str, Any]]) -> None:
        self.exact: set[tuple[str, str]] = set()
        self.prefixes: list[tuple[str, str]] = []
        for entry in entries:
            system, code = entry["system"], entry["code"]
            if code.endswith("*"):
                self.prefixes.append((system, _code_key(system, code[:-1])))
            else:
                self.exact.add((system, _code_key(system, code)))

    def matches(self, concept: Any) -> bool:
        for coding in _as_list(concept.get("coding")) if isinstance(concept, dict) else []:
            if not isinstance(coding, dict) or not isinstance(coding.get("system"), str) \
                    or not isinstance(coding.get("code"), str):
                continue
            system, code = coding["system"], _code_key(coding["system"], coding["code"])
            if (system, code) in self.exact or any(s == system and code.startswith(p) for s, p in self.prefixes):
                return True
        return False


def _codes(concept: Any) -> set[str]:
    return {c["code"] for c in _as_list(concept.get("coding")) if isinstance(c, dict) and isinstance(c.get("code"), str)} \
        if isinstance(concept, dict) else set()


def is_active(condition: dict[str, Any]) -> bool:
    """clinicalStatus active / recurrence / relapse, and not entered-in-error or refuted."""
    return bool(_codes(condition.get("clinicalStatus")) & ACTIVE_CLINICAL) \
        and not _codes(condition.get("verificationStatus")) & NOT_CONFIRMED


def date_range(value: Any) -> tuple[date, date] | None:
    """The first and last day a FHIR date/dateTime can mean (YYYY, YYYY-MM, YYYY-MM-DD[Thh:mm...])."""
    match = DATE.fullmatch(value.strip()) if isinstance(value, str) else None
    if not match:
        return None
    year, month, day = (int(g) if g else None for g in match.groups())
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


@lru_cache(maxsize=8)
def _value_sets(policy: Policy) -> tuple[ValueSet, ValueSet]:
    """The radiculopathy and back-problem value sets, compiled once per policy."""
    return ValueSet(policy.conditions["radiculopathy"]), ValueSet(policy.conditions["back_problem"])


def chiropractic_status(ctx: PatientContext, policy: Policy, today: date) -> ChiroStatus:
    messages = policy.messages
    if ctx.conditions is None or "conditions" in ctx.unavailable:
        return ChiroStatus(True, "chiro_unknown", messages["chiro_label_unknown"])
    rules = policy.conditions
    active = [c for c in ctx.conditions if is_active(c)]
    radiculopathy, back_problem = _value_sets(policy)
    if any(radiculopathy.matches(c.get("code")) for c in active):
        return ChiroStatus(False, "chiro_radiculopathy")
    problems = [c for c in active if back_problem.matches(c.get("code"))]
    if not problems:
        return ChiroStatus(True, "chiro_no_problem", messages["chiro_label_onset_unknown"])
    cutoff = today - timedelta(days=int(rules["onset_window_days"]))
    windows = {onset_window(c, cutoff) for c in problems}
    if "within" in windows:
        return ChiroStatus(True, "chiro_offered")
    if "unknown" in windows:
        return ChiroStatus(True, "chiro_onset_unknown", messages["chiro_label_onset_unknown"])
    return ChiroStatus(False, "chiro_too_late")
