"""Plan membership and the chiropractic rule: unit level on PatientContext, and through the HTTP API with the
patient-* fixtures (their dates are relative to the order date 2026-11-25; the API tests move them to today)."""

from __future__ import annotations

import copy
from datetime import date, datetime, timedelta, timezone
from typing import Any

import pytest

from cds_service.config import Settings
from cds_service.eligibility import (PayerMatcher, ValueSet, chiropractic_status, date_range, is_active,
                                     onset_window, plan_status)
from cds_service.patient import PatientContext, from_prefetch
from cds_service.hooks import parse_hook_request
from cds_service.policy import load_policies
from conftest import load_fixture
from test_api import post

POLICY = load_policies(Settings().cards_dir)[0]
MESSAGES = POLICY.messages
FIXTURE_DAY = date(2026, 11, 25)  # authoredOn of the patient-* fixtures
TODAY = date(2031, 3, 15)  # unit tests pass their own "today"
PAYER_ID = POLICY.payer["identifiers"][0]
CHIRO = POLICY.alternative("chiropractic-manipulation")
ICD = "http://hl7.org/fhir/sid/icd-10-cm"
SCT = "http://snomed.info/sct"


# -- helpers shared with test_fhir.py --------------------------------------------------------------------------

def shifted(body: dict[str, Any], today: date) -> dict[str, Any]:
    """The fixture with every Condition date moved so that FIXTURE_DAY becomes `today`."""
    body = copy.deepcopy(body)
    delta = today - FIXTURE_DAY
    conditions = (body.get("prefetch") or {}).get("conditions") or {}
    for entry in conditions.get("entry", []):
        resource = entry["resource"]
        for key in ("onsetDateTime", "recordedDate"):
            if key in resource:
                resource[key] = (date.fromisoformat(resource[key][:10]) + delta).isoformat()
    return body


def notes_in(card: dict[str, Any]) -> set[str]:
    """The policy messages (by key) that the card detail carries."""
    return {key for key, text in MESSAGES.items() if not key.startswith("chiro_label") and text in card["detail"]}


def chiro_label(card: dict[str, Any]) -> str | None:
    code = CHIRO.codings[0]["code"]
    for suggestion in card.get("suggestions", []):
        created = next(a["resource"] for a in suggestion["actions"] if a["type"] == "create")
        if any(c["code"] == code for c in created["code"]["coding"]):
            return suggestion["label"]
    return None


# -- builders --------------------------------------------------------------------------------------------------

def coverage(payor: list[dict[str, Any]], status: str = "active", cid: str = "cov-1", **extra: Any) -> dict:
    return {"resourceType": "Coverage", "id": cid, "status": status, "beneficiary": {"reference": "Patient/p"},
            "payor": payor, **extra}


def condition(system: str, code: str, clinical: str = "active", verification: str | None = "confirmed",
              **dates: Any) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Condition",
        "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                                       "code": clinical}]},
        "code": {"coding": [{"system": system, "code": code}]},
        "subject": {"reference": "Patient/p"},
        **dates,
    }
    if verification:
        resource["verificationStatus"] = {"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/condition-ver-status", "code": verification}]}
    return resource


def days_ago(n: int) -> str:
    return (TODAY - timedelta(days=n)).isoformat()


def lbp(**dates: Any) -> dict[str, Any]:
    return condition(ICD, "M54.50", **dates)


def chiro(conditions: list[dict[str, Any]] | None, unavailable: frozenset[str] = frozenset()):
    return chiropractic_status(PatientContext(conditions=conditions, unavailable=unavailable), POLICY, TODAY)


def plan(coverages: list[dict[str, Any]] | None, organizations: dict | None = None,
         unavailable: frozenset[str] = frozenset()):
    return plan_status(PatientContext(coverages=coverages, organizations=organizations or {},
                                      unavailable=unavailable), POLICY)


# -- plan membership -------------------------------------------------------------------------------------------

def test_same_plan_by_identifier() -> None:
    cov = coverage([{"reference": "Organization/x", "identifier": dict(PAYER_ID)}])
    status = plan([cov])
    assert (status.applies, status.coverage, status.note) == (True, cov, "plan_member")


def test_identifier_in_the_payer_system_with_another_value_is_another_payer_whatever_the_name() -> None:
    cov = coverage([{"identifier": {"system": PAYER_ID["system"], "value": "SOMEONE-ELSE"},
                     "display": POLICY.payer["name"]}])
    assert plan([cov]).applies is False


def test_identifier_in_an_unknown_system_falls_back_to_the_name() -> None:
    cov = coverage([{"identifier": {"system": "http://hl7.org/fhir/sid/us-npi", "value": "1234567893"},
                     "display": POLICY.payer["name"].upper()}])
    assert plan([cov]).note == "plan_member"


@pytest.mark.parametrize("display, member", [
    ("Sandhills Center", True),
    ("SANDHILLS CENTER", True),
    ("  sandhills   center ", True),
    ("Sandhills Center Tailored Plan", True),
    ("Sandhills Center LME/MCO", True),
    ("Sandhills Centerville Health", False),
    ("Blue Cross and Blue Shield of North Carolina", False),
])
def test_name_match_is_case_insensitive_and_whole_words(display: str, member: bool) -> None:
    status = plan([coverage([{"display": display}])])
    assert status.applies is member
    assert status.note == ("plan_member" if member else None)


def test_alias_matches() -> None:
    alias = POLICY.payer["aliases"][-1]
    assert plan([coverage([{"display": alias.lower()}])]).note == "plan_member"


def test_name_of_a_contained_organization() -> None:
    cov = coverage([{"reference": "#payer"}], contained=[
        {"resourceType": "Organization", "id": "payer", "name": POLICY.payer["name"]}])
    assert plan([cov]).note == "plan_member"


def test_identifier_of_an_organization_included_in_the_bundle() -> None:
    organization = {"resourceType": "Organization", "id": "o1", "identifier": [dict(PAYER_ID)], "name": "SC"}
    for reference in ("Organization/o1", "https://ehr.example.org/fhir/R4/Organization/o1",
                      "https://ehr.example.org/fhir/R4/Organization/o1/_history/3"):
        status = plan([coverage([{"reference": reference}])], {"Organization/o1": organization})
        assert status.note == "plan_member", reference


def test_other_plan_means_the_policy_does_not_apply() -> None:
    status = plan([coverage([{"display": "Aetna Better Health of North Carolina"}])])
    assert (status.applies, status.coverage, status.note) == (False, None, None)


def test_only_active_coverage_counts() -> None:
    ours = coverage([{"display": POLICY.payer["name"]}], status="cancelled", cid="old")
    theirs = coverage([{"display": "WellCare of North Carolina"}], cid="new")
    assert plan([ours, theirs]).applies is False
    assert plan([ours]).note == "plan_unknown"


def test_member_wins_over_other_coverage() -> None:
    ours = coverage([{"display": POLICY.payer["name"]}], cid="ours")
    theirs = coverage([{"display": "Medicare"}], cid="theirs")
    status = plan([theirs, ours])
    assert status.applies and status.coverage["id"] == "ours"


def test_unidentifiable_payor_keeps_the_card() -> None:
    cov = coverage([{"reference": "Organization/not-included"}])
    status = plan([cov, coverage([{"display": "Medicare"}], cid="m")])
    assert (status.applies, status.coverage, status.note) == (True, None, "plan_unidentified")


@pytest.mark.parametrize("coverages", [None, []])
def test_no_coverage_information(coverages) -> None:
    assert plan(coverages).note == "plan_unknown" and plan(coverages).applies


def test_coverage_that_could_not_be_had() -> None:
    status = plan(None, unavailable=frozenset({"coverage"}))
    assert (status.applies, status.note) == (True, "coverage_fetch_failed")


def test_payer_matcher_reads_its_data() -> None:
    matcher = PayerMatcher({"name": "Acme Health", "identifiers": [{"system": "urn:x", "value": "A1"}]})
    assert matcher.coverage(coverage([{"display": "ACME health plan"}]), {}) is True
    assert matcher.coverage(coverage([{"display": POLICY.payer["name"]}]), {}) is False
    assert matcher.coverage(coverage([{"identifier": {"system": "urn:x", "value": "A1"}}]), {}) is True
    assert matcher.coverage(coverage([{"reference": "Organization/q"}]), {}) is None


# -- chiropractic rule -----------------------------------------------------------------------------------------

def test_within_four_weeks_without_radiculopathy_is_offered() -> None:
    status = chiro([lbp(onsetDateTime=days_ago(10))])
    assert (status.offer, status.note, status.label_suffix) == (True, "chiro_offered", "")


@pytest.mark.parametrize("system, code", [(ICD, "M54.16"), (ICD, "M5417"), (ICD, "m51.16"), (ICD, "M47.26"),
                                          (ICD, "M54.42"), (SCT, "128196005"), (SCT, "23056005")])
def test_radiculopathy_is_not_offered(system: str, code: str) -> None:
    status = chiro([lbp(onsetDateTime=days_ago(3)), condition(system, code, onsetDateTime=days_ago(3))])
    assert (status.offer, status.note) == (False, "chiro_radiculopathy")


@pytest.mark.parametrize("clinical, verification", [("resolved", "confirmed"), ("inactive", None),
                                                    ("active", "entered-in-error"), ("active", "refuted")])
def test_radiculopathy_that_is_not_active_is_ignored(clinical: str, verification: str | None) -> None:
    old = condition(ICD, "M54.16", clinical=clinical, verification=verification)
    assert chiro([lbp(onsetDateTime=days_ago(3)), old]).offer is True


@pytest.mark.parametrize("clinical", ["recurrence", "relapse"])
def test_recurrence_and_relapse_are_active(clinical: str) -> None:
    assert chiro([lbp(onsetDateTime=days_ago(3)), condition(ICD, "M54.16", clinical=clinical)]).offer is False


def test_onset_six_weeks_ago_is_not_offered() -> None:
    status = chiro([lbp(onsetDateTime=days_ago(42), recordedDate=days_ago(41))])
    assert (status.offer, status.note) == (False, "chiro_too_late")


@pytest.mark.parametrize("days, note", [(0, "chiro_offered"), (28, "chiro_offered"), (29, "chiro_too_late")])
def test_four_weeks_boundary(days: int, note: str) -> None:
    assert chiro([lbp(onsetDateTime=days_ago(days))]).note == note


def test_onset_period_start_is_used() -> None:
    assert chiro([lbp(onsetPeriod={"start": days_ago(40)})]).note == "chiro_too_late"
    assert chiro([lbp(onsetPeriod={"start": days_ago(5) + "T08:00:00-05:00"})]).note == "chiro_offered"


def test_unknown_onset_is_offered_with_a_confirmation_label() -> None:
    status = chiro([lbp()])
    assert (status.offer, status.note, status.label_suffix) == \
        (True, "chiro_onset_unknown", MESSAGES["chiro_label_onset_unknown"])


def test_recorded_date_alone_can_only_prove_too_late() -> None:
    assert chiro([lbp(recordedDate=days_ago(60))]).note == "chiro_too_late"
    recent = chiro([lbp(recordedDate=days_ago(3))])
    assert (recent.offer, recent.note) == (True, "chiro_onset_unknown")


def test_a_recent_problem_wins_over_an_old_one() -> None:
    problems = [lbp(onsetDateTime=days_ago(400)), condition(ICD, "S32.10XA", onsetDateTime=days_ago(6))]
    assert chiro(problems).note == "chiro_offered"


def test_no_back_problem_recorded_is_said() -> None:
    status = chiro([condition(SCT, "38341003", onsetDateTime=days_ago(2))])  # hypertension
    assert (status.offer, status.note, status.label_suffix) == \
        (True, "chiro_no_problem", MESSAGES["chiro_label_onset_unknown"])


def test_conditions_unknown_or_unavailable() -> None:
    for status in (chiro(None), chiro(None, frozenset({"conditions"}))):
        assert (status.offer, status.note, status.label_suffix) == \
            (True, "chiro_unknown", MESSAGES["chiro_label_unknown"])


@pytest.mark.parametrize("value, expected", [
    ("2026-11-10", (date(2026, 11, 10), date(2026, 11, 10))),
    ("2026-11-10T23:30:00+09:00", (date(2026, 11, 10), date(2026, 11, 10))),
    ("2026-02", (date(2026, 2, 1), date(2026, 2, 28))),
    ("2024-02", (date(2024, 2, 1), date(2024, 2, 29))),
    ("2026", (date(2026, 1, 1), date(2026, 12, 31))),
    ("2026-13-01", None), ("2026-02-30", None), ("0000", None), ("9999-12", None), ("yesterday", None),
    (None, None), (20261110, None),
])
def test_date_range(value, expected) -> None:
    assert date_range(value) == expected


def test_partial_onset_date_decides_only_when_the_whole_period_is_on_one_side() -> None:
    cutoff = date(2026, 10, 15)
    assert onset_window(lbp(onsetDateTime="2026-11"), cutoff) == "within"
    assert onset_window(lbp(onsetDateTime="2026-09"), cutoff) == "before"
    assert onset_window(lbp(onsetDateTime="2026-10"), cutoff) == "unknown"


def test_value_set_prefixes_and_dots() -> None:
    values = ValueSet([{"system": ICD, "code": "M54.1*"}, {"system": SCT, "code": "72274001"}])
    assert values.matches({"coding": [{"system": ICD, "code": "M54.16"}]})
    assert values.matches({"coding": [{"system": ICD, "code": "M5410"}]})
    assert not values.matches({"coding": [{"system": ICD, "code": "M54.2"}]})
    assert not values.matches({"coding": [{"system": SCT, "code": "M54.16"}]})  # system matters
    assert not values.matches({"coding": [{"system": SCT, "code": "722740011"}]})  # SNOMED codes are exact
    assert not values.matches({"text": "radiculopathy"}) and not values.matches(None)


def test_is_active() -> None:
    assert is_active(lbp()) and not is_active({"resourceType": "Condition"})


def test_value_sets_name_their_evidence() -> None:
    for name in ("radiculopathy", "back_problem"):
        assert POLICY.conditions[name]
        for entry in POLICY.conditions[name]:
            assert entry["system"] in (ICD, SCT) and entry["code"] and entry["display"] and entry["_source"]
    assert POLICY.conditions["onset_window_days"] == 28


# -- through the HTTP API with the fixtures --------------------------------------------------------------------

def today_utc() -> date:
    return datetime.now(timezone.utc).date()


def only_card(client, body: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    response = post(client, body)
    assert response.status_code == 200
    answer = response.get_json()
    assert len(answer["cards"]) == 1
    return answer["cards"][0], answer


def test_api_member_within_four_weeks(client) -> None:
    card, answer = only_card(client, shifted(load_fixture("patient-member.json"), today_utc()))
    assert notes_in(card) == {"plan_member", "chiro_offered"}
    assert chiro_label(card) == CHIRO.label
    assert answer["systemActions"][0]["resource"]["id"] == "sr-sacro-1"


def test_api_other_plan_gets_no_card_and_no_system_action(client) -> None:
    response = post(client, shifted(load_fixture("patient-other-plan.json"), today_utc()))
    assert response.status_code == 200 and response.get_json() == {"cards": []}


def test_api_no_coverage(client) -> None:
    body = shifted(load_fixture("patient-member.json"), today_utc())
    del body["prefetch"]["coverage"]
    card, answer = only_card(client, body)
    assert notes_in(card) == {"plan_unknown", "chiro_offered"}
    assert "systemActions" not in answer  # no Coverage to assert against


def test_api_coverage_known_empty(client) -> None:
    body = shifted(load_fixture("patient-member.json"), today_utc())
    body["prefetch"]["coverage"] = None
    card, _ = only_card(client, body)
    assert "plan_unknown" in notes_in(card)


def test_api_radiculopathy(client) -> None:
    card, _ = only_card(client, shifted(load_fixture("patient-radiculopathy.json"), today_utc()))
    assert notes_in(card) == {"plan_member", "chiro_radiculopathy"}
    assert chiro_label(card) is None
    assert CHIRO.policy_text in card["detail"]  # the policy's own list still names it


def test_api_onset_six_weeks(client) -> None:
    card, _ = only_card(client, shifted(load_fixture("patient-onset-six-weeks.json"), today_utc()))
    assert notes_in(card) == {"plan_member", "chiro_too_late"}
    assert chiro_label(card) is None


def test_api_unknown_onset(client) -> None:
    body = load_fixture("patient-member.json")
    for entry in body["prefetch"]["conditions"]["entry"]:
        entry["resource"].pop("onsetDateTime")
        entry["resource"].pop("recordedDate")
    card, _ = only_card(client, body)
    assert notes_in(card) == {"plan_member", "chiro_onset_unknown"}
    assert chiro_label(card) == CHIRO.label + MESSAGES["chiro_label_onset_unknown"]


def test_fixtures_decide_as_named_on_their_own_date() -> None:
    expected = {
        "patient-member.json": (True, "chiro_offered"),
        "patient-radiculopathy.json": (True, "chiro_radiculopathy"),
        "patient-onset-six-weeks.json": (True, "chiro_too_late"),
        "patient-other-plan.json": (False, "chiro_offered"),
        "patient-no-prefetch-fhir-server.json": (True, "chiro_unknown"),
    }
    for name, (applies, note) in expected.items():
        request = parse_hook_request(load_fixture(name), "order-select", 200)
        ctx = from_prefetch(request)
        assert plan_status(ctx, POLICY).applies is applies, name
        assert chiropractic_status(ctx, POLICY, FIXTURE_DAY).note == note, name
