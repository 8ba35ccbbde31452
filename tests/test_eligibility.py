"""Plan membership and the chiropractic rule: unit level on PatientContext, and through the HTTP API with the
patient-* fixtures (their dates are relative to the order date 2026-11-25; the API tests move them to today)."""

from __future__ import annotations

import copy
from datetime import date, datetime, timedelta, timezone
from typing import Any

import pytest
from conftest import load_fixture
from test_api import post

from cds_service.config import Settings
from cds_service.pipeline.decide import Finding, decide
from cds_service.pipeline.eligibility import (
    PayerMatcher,
    ValueSet,
    date_range,
    is_active,
    onset_window,
    patient_chiropractic,
    patient_contraindications,
    plan_status,
)
from cds_service.pipeline.hooks import parse_hook_request
from cds_service.pipeline.patient import PatientContext, gather
from cds_service.pipeline.policy import load_policies
from cds_service.web.policy_page import page_markdown

POLICY = load_policies(Settings().cards_dir)[0]


def chiropractic_status(ctx: PatientContext, policy, today: date, order: dict[str, Any] | None = None):
    """The chiropractic rule's answer for one order, composed as decide() does (patient part, then the order's)."""
    recorded = patient_contraindications(ctx, policy)
    kinds = recorded.for_order(order) if isinstance(order, dict) else recorded.kinds
    return patient_chiropractic(ctx, policy, today).for_order(order, policy, kinds)
MESSAGES = POLICY.messages
FIXTURE_DAY = date(2026, 11, 25)  # authoredOn of the patient-* fixtures
TODAY = date(2031, 3, 15)  # unit tests pass their own "today"
PAYER_ID = POLICY.payer["identifiers"][0]
CHIRO = POLICY.alternative("chiropractic-manipulation")
KINDS = {k: v for k, v in POLICY.conditions["contraindications"].items() if not k.startswith("_")}
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


def chiro(conditions: list[dict[str, Any]] | None, unavailable: frozenset[str] = frozenset(),
          order: dict[str, Any] | None = None):
    return chiropractic_status(PatientContext(conditions=conditions, unavailable=unavailable), POLICY, TODAY, order)


def window(conditions: list[dict[str, Any]]) -> str | None:
    """The note the four-week window alone gives (before contraindications and radiculopathy are applied)."""
    return patient_chiropractic(PatientContext(conditions=conditions), POLICY, TODAY).status.note


def sacroplasty(*reasons: tuple[str, str], **extra: Any) -> dict[str, Any]:
    """A sacroplasty draft order with these (system, code) reasons."""
    return {"resourceType": "ServiceRequest", "id": "sr-1", "status": "draft", "intent": "order",
            "code": {"coding": [{"system": "http://www.ama-assn.org/go/cpt", "code": "0200T"}]},
            "subject": {"reference": "Patient/p"},
            "reasonCode": [{"coding": [{"system": system, "code": code}]} for system, code in reasons], **extra}


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


def test_a_recent_episode_of_low_back_pain_wins_over_an_old_one() -> None:
    problems = [lbp(onsetDateTime=days_ago(400)), condition(SCT, "279039007", onsetDateTime=days_ago(6))]
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


def value_sets() -> dict[str, list[dict[str, Any]]]:
    sets = {name: POLICY.conditions[name] for name in ("radiculopathy", "low_back_pain")}
    sets.update({kind: value["codes"] for kind, value in KINDS.items()})
    return sets


def test_value_sets_name_their_evidence() -> None:
    sources = POLICY.conditions["_sources"]
    for name, entries in value_sets().items():
        assert entries, name
        for entry in entries:
            assert entry["system"] in (ICD, SCT) and entry["code"] and entry["display"] and entry["_source"]
            assert entry["code"].rstrip("*").replace(".", "").isalnum(), entry  # no free text in place of a code
            assert entry["system"] == ICD or entry["code"].isdigit(), entry  # an SCTID, never a guess in words
            assert any(key in entry["_source"] for key in sources), entry  # names a source the file describes
    assert POLICY.conditions["onset_window_days"] == 28


# -- chiropractic: the window is four weeks of low back pain, never of a fracture -------------------------------

def test_recent_sacral_fracture_does_not_start_the_window() -> None:
    fracture = condition(ICD, "S32.10XA", onsetDateTime=days_ago(6))
    assert window([fracture]) == "chiro_no_problem"  # not "within four weeks"
    assert window([lbp(onsetDateTime=days_ago(60)), fracture]) == "chiro_too_late"
    status = chiro([fracture])
    assert (status.offer, status.note) == (False, "chiro_contraindicated_fracture")  # and ruled out anyway


@pytest.mark.parametrize("system, code", [(ICD, "S32.10XA"), (ICD, "M84.48XA"), (ICD, "M80.08XA"), (ICD, "M84.38XA"),
                                          (ICD, "M84.68XA")])
def test_no_fracture_code_starts_the_window(system: str, code: str) -> None:
    assert not ValueSet(POLICY.conditions["low_back_pain"]).matches({"coding": [{"system": system, "code": code}]})


def test_recent_low_back_pain_without_radiculopathy_or_contraindication_is_offered() -> None:
    status = chiro([lbp(onsetDateTime=days_ago(5)), condition(SCT, "38341003", onsetDateTime=days_ago(2))],
                   order=sacroplasty((SCT, "279039007")))
    assert (status.offer, status.note, status.label_suffix) == (True, "chiro_offered", "")


# -- chiropractic: contraindications ------------------------------------------------------------------------------

CONTRAINDICATED = [
    ("fracture", ICD, "S32.10XA"), ("fracture", ICD, "S32.111A"), ("fracture", ICD, "S32.000A"),
    ("fracture", ICD, "S32.810A"), ("fracture", ICD, "S22.060A"), ("fracture", ICD, "S12.100A"),
    ("fracture", ICD, "M48.56XA"), ("fracture", ICD, "M48.48XA"), ("fracture", ICD, "M84.48XA"),
    ("fracture", ICD, "M84.454A"), ("fracture", ICD, "M84.350A"), ("fracture", ICD, "M84.58XA"),
    ("fracture", SCT, "15724005"), ("fracture", SCT, "42942008"),
    ("malignancy", ICD, "C41.2"), ("malignancy", ICD, "C41.4"), ("malignancy", ICD, "C79.51"),
    ("malignancy", ICD, "C79.52"), ("malignancy", ICD, "C90.00"), ("malignancy", ICD, "C90.01"),
    ("malignancy", SCT, "94222008"), ("malignancy", SCT, "109989006"),
    ("osteoporotic_fracture", ICD, "M80.08XA"), ("osteoporotic_fracture", ICD, "M80.88XA"),
    ("osteoporotic_fracture", ICD, "M80.051A"), ("osteoporotic_fracture", SCT, "443165006"),
    ("cauda_equina", ICD, "G83.4"), ("cauda_equina", ICD, "S34.3XXA"),
    ("spinal_infection", ICD, "M46.26"), ("spinal_infection", ICD, "M46.37"), ("spinal_infection", ICD, "M46.48"),
    ("spinal_infection", ICD, "M46.56"), ("spinal_infection", ICD, "G06.1"), ("spinal_infection", ICD, "A18.01"),
    ("spinal_infection", SCT, "202752002"),
]


def test_every_kind_is_tested_and_has_its_message() -> None:
    assert {kind for kind, _, _ in CONTRAINDICATED} == set(KINDS)
    assert {kind for kind, system, _ in CONTRAINDICATED if system == SCT} == \
        {kind for kind, value in KINDS.items() if any(e["system"] == SCT for e in value["codes"])}
    for kind, value in KINDS.items():
        message = MESSAGES[f"chiro_contraindicated_{kind}"]
        withholds_all = all(kind in a.withheld_when for a in POLICY.alternatives)
        opening = ("No alternative is offered as one click" if withholds_all
                   else "Chiropractic manipulation is not offered")
        assert value["name"] in message and message.startswith(opening), kind
    assert {k for k in MESSAGES if k.startswith("chiro_contraindicated_")} == \
        {f"chiro_contraindicated_{kind}" for kind in KINDS}


@pytest.mark.parametrize("kind, system, code", CONTRAINDICATED)
def test_recorded_contraindication_means_no_button(kind: str, system: str, code: str) -> None:
    expected = (False, f"chiro_contraindicated_{kind}", "")
    recent_pain = lbp(onsetDateTime=days_ago(3))  # would be offered without the contraindication
    as_condition = chiro([recent_pain, condition(system, code, onsetDateTime=days_ago(400))])
    as_reason = chiro([recent_pain], order=sacroplasty((ICD, "M54.50"), (system, code)))
    as_reason_unknown_conditions = chiro(None, frozenset({"conditions"}), order=sacroplasty((system, code)))
    for status in (as_condition, as_reason, as_reason_unknown_conditions):
        assert (status.offer, status.note, status.label_suffix) == expected


@pytest.mark.parametrize("kind, entry", [(kind, entry) for kind, value in KINDS.items() for entry in value["codes"]],
                         ids=lambda value: value["code"] if isinstance(value, dict) else value)
def test_every_listed_code_is_recognised(kind: str, entry: dict[str, Any]) -> None:
    code = entry["code"].rstrip("*").rstrip(".")
    status = chiro([lbp(onsetDateTime=days_ago(3)), condition(entry["system"], code)])
    assert status.note in {f"chiro_contraindicated_{k}" for k in KINDS} and status.offer is False
    assert list(KINDS).index(status.note.removeprefix("chiro_contraindicated_")) <= list(KINDS).index(kind)


@pytest.mark.parametrize("system, code", [(ICD, "S12.8XXA"), (ICD, "S72.001A"), (ICD, "M81.0"), (ICD, "C50.911"),
                                          (ICD, "M54.50"), (ICD, "M46.1"), (SCT, "1734007"), (ICD, "G83.40")])
def test_other_codes_are_not_contraindications(system: str, code: str) -> None:
    # G83.40 does not exist: G83.4 is matched exactly, not as a prefix
    assert chiro([lbp(onsetDateTime=days_ago(3)), condition(system, code)]).note == "chiro_offered"


@pytest.mark.parametrize("clinical, verification", [("resolved", "confirmed"), ("active", "entered-in-error"),
                                                    ("active", "refuted")])
def test_contraindication_that_is_not_active_is_ignored(clinical: str, verification: str) -> None:
    old = condition(ICD, "S32.10XA", clinical=clinical, verification=verification)
    assert chiro([lbp(onsetDateTime=days_ago(3)), old]).note == "chiro_offered"


def test_first_kind_listed_is_named() -> None:
    status = chiro([condition(ICD, "A18.01"), condition(ICD, "C41.4")], order=sacroplasty((ICD, "M80.08XA")))
    assert status.note == "chiro_contraindicated_malignancy"  # fracture < malignancy < osteoporosis < ...
    assert chiro([condition(ICD, "A18.01")], order=sacroplasty((ICD, "S32.10XA"))).note == \
        "chiro_contraindicated_fracture"


def test_contraindication_wins_over_radiculopathy_and_over_missing_data() -> None:
    radiculopathy = condition(ICD, "M54.16")
    assert chiro([radiculopathy, condition(ICD, "G83.4")]).note == "chiro_contraindicated_cauda_equina"
    assert chiro(None, order=sacroplasty((ICD, "S32.10XA"))).note == "chiro_contraindicated_fracture"


def test_radiculopathy_as_the_orders_reason() -> None:
    status = chiro([lbp(onsetDateTime=days_ago(3))], order=sacroplasty((ICD, "M54.17")))
    assert (status.offer, status.note) == (False, "chiro_radiculopathy")


def test_reason_reference_to_a_contained_condition() -> None:
    fracture = {**condition(ICD, "M84.48XA"), "id": "fx"}
    order = sacroplasty(reasonReference=[{"reference": "#fx"}], contained=[fracture])
    assert chiro([lbp(onsetDateTime=days_ago(3))], order=order).note == "chiro_contraindicated_fracture"
    refuted = {**condition(ICD, "M84.48XA", verification="refuted"), "id": "fx"}
    order = sacroplasty(reasonReference=[{"reference": "#fx"}], contained=[refuted])
    assert chiro([lbp(onsetDateTime=days_ago(3))], order=order).note == "chiro_offered"


@pytest.mark.parametrize("reference", ["Condition/c9", "https://ehr.example.org/fhir/R4/Condition/c9",
                                       "Condition/c9/_history/2"])
def test_reason_reference_to_a_prefetched_condition(reference: str) -> None:
    # a Condition the order names as its reason counts even when its clinical status is not given
    fracture = {**condition(ICD, "S32.10XA", clinical="unknown"), "id": "c9"}
    order = sacroplasty(reasonReference=[{"reference": reference}])
    assert chiro([lbp(onsetDateTime=days_ago(3)), fracture], order=order).note == "chiro_contraindicated_fracture"
    assert chiro([lbp(onsetDateTime=days_ago(3)), fracture]).note == "chiro_offered"  # not active, not the reason


def test_reason_as_one_object_is_read() -> None:
    order = sacroplasty()
    order["reasonCode"] = {"coding": [{"system": ICD, "code": "S32.10XA"}]}
    assert chiro([lbp(onsetDateTime=days_ago(3))], order=order).note == "chiro_contraindicated_fracture"


def test_each_order_gets_its_own_status() -> None:
    ctx = PatientContext(conditions=[lbp(onsetDateTime=days_ago(3))])
    orders = [sacroplasty((ICD, "S32.10XA")), sacroplasty((ICD, "M54.50")), sacroplasty((ICD, "C79.51"))]
    decisions = decide([Finding(order, object()) for order in orders], ctx, POLICY, TODAY)
    assert [d.rules["chiropractic-first-four-weeks"].note for d in decisions] == \
        ["chiro_contraindicated_fracture", "chiro_offered", "chiro_contraindicated_malignancy"]


def test_confirm_labels_name_the_contraindication_check_and_stay_short() -> None:
    for key in ("chiro_label_unknown", "chiro_label_onset_unknown"):
        label = CHIRO.label + MESSAGES[key]
        assert "confirm" in label and "fracture" in label and "4 wks" in label and len(label) <= 85, label
    assert "radiculopathy" in MESSAGES["chiro_label_unknown"]


def test_chiropractic_notes_are_short_and_name_what_to_confirm() -> None:
    for key, text in MESSAGES.items():
        if key.startswith("chiro_") and not key.startswith("chiro_label"):
            assert len(text.split()) <= 35, key
    for key in ("chiro_unknown", "chiro_no_problem", "chiro_onset_unknown"):
        assert "four weeks" in MESSAGES[key] and "fracture" in MESSAGES[key] and "confirm" in MESSAGES[key]


def test_a_padded_reason_is_read_in_one_pass_per_coding() -> None:
    """Cost bound: each coding costs one probe per distinct prefix length, not one per listed code."""
    from cds_service.pipeline.eligibility import chiro_rules
    index = chiro_rules(POLICY).index
    assert len(index.lengths) <= 8 < len(index.prefixes)
    order = sacroplasty(*[(ICD, f"Z{i:05d}") for i in range(20_000)], (ICD, "S32.10XA"))
    assert chiro(None, order=order).note == "chiro_contraindicated_fracture"


# -- plan membership: cost ---------------------------------------------------------------------------------------

class CountingList(list):
    """A list that counts how many times it is iterated over."""

    def __init__(self, items: list[Any]) -> None:
        super().__init__(items)
        self.passes = 0

    def __iter__(self):
        self.passes += 1
        return super().__iter__()


@pytest.mark.parametrize("size", [10, 10_000])
def test_payer_matching_reads_contained_once_per_coverage(size: int) -> None:
    others = [{"resourceType": "Organization", "id": f"o{i}", "name": f"Other plan {i}"} for i in range(size - 1)]
    ours = {"resourceType": "Organization", "id": f"o{size - 1}", "name": POLICY.payer["name"]}
    contained = CountingList([*others, ours])
    cov = coverage([{"reference": f"#o{i}"} for i in range(size)], contained=contained)
    status = plan([cov])
    assert (status.applies, status.note) == (True, "plan_member")
    assert contained.passes == 1  # the old code scanned contained once per payor: `size` passes


def test_contained_index_keeps_the_first_of_a_repeated_id_and_ignores_other_types() -> None:
    cov = coverage([{"reference": "#p"}], contained=[
        {"resourceType": "Patient", "id": "p", "name": [{"text": POLICY.payer["name"]}]},
        {"resourceType": "Organization", "id": "p", "name": "Medicare"},
        {"resourceType": "Organization", "id": "p", "name": POLICY.payer["name"]}])
    assert plan([cov]).applies is False


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
    assert CHIRO.policy_text in page_markdown(POLICY)  # the policy page still names it, with its condition


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
        "patient-other-plan.json": (False, "chiro_contraindicated_fracture"),
        "patient-no-prefetch-fhir-server.json": (True, "chiro_unknown"),
        "patient-sacral-fracture.json": (True, "chiro_contraindicated_fracture"),
    }
    for name, (applies, note) in expected.items():
        request = parse_hook_request(load_fixture(name), "order-select", 200)
        ctx = gather(request)
        assert plan_status(ctx, POLICY).applies is applies, name
        assert chiropractic_status(ctx, POLICY, FIXTURE_DAY, request.orders[0]).note == note, name


def with_reason(body: dict[str, Any], code: str, display: str) -> dict[str, Any]:
    body = copy.deepcopy(body)
    order = body["context"]["draftOrders"]["entry"][0]["resource"]
    order["reasonCode"] = [{"coding": [{"system": ICD, "code": code, "display": display}], "text": display}]
    return body


@pytest.mark.parametrize("code, display", [
    ("S32.10XA", "Unspecified fracture of sacrum, initial encounter for closed fracture"),
    ("M84.48XA", "Pathological fracture, other site, initial encounter for fracture"),
])
def test_api_no_chiropractic_when_the_order_is_for_a_sacral_fracture(client, code: str, display: str) -> None:
    member = shifted(load_fixture("patient-member.json"), today_utc())
    card, _ = only_card(client, member)
    assert chiro_label(card) == CHIRO.label  # recent low back pain: offered ...
    card, _ = only_card(client, with_reason(member, code, display))
    assert chiro_label(card) is None  # ... but not for an order whose reason is a sacral fracture
    assert notes_in(card) == {"plan_member", "chiro_contraindicated_fracture"}
    assert MESSAGES["chiro_offered"] not in card["detail"]


def test_api_no_chiropractic_for_a_sacral_fracture_on_the_problem_list(client) -> None:
    card, _ = only_card(client, shifted(load_fixture("patient-sacral-fracture.json"), today_utc()))
    assert chiro_label(card) is None
    assert notes_in(card) == {"plan_member", "chiro_contraindicated_fracture"}


def test_api_fracture_reason_decides_even_without_conditions(client) -> None:
    body = with_reason(load_fixture("patient-member.json"), "S32.10XA", "Fracture of sacrum")
    del body["prefetch"]["conditions"]
    body.pop("fhirServer", None)
    body.pop("fhirAuthorization", None)
    card, _ = only_card(client, body)
    assert chiro_label(card) is None and "chiro_contraindicated_fracture" in notes_in(card)


def test_api_conditions_unknown_asks_to_confirm(client) -> None:
    body = load_fixture("patient-member.json")
    del body["prefetch"]["conditions"]
    body.pop("fhirServer", None)
    body.pop("fhirAuthorization", None)
    card, _ = only_card(client, body)
    assert notes_in(card) == {"plan_member", "chiro_unknown"}
    assert chiro_label(card) == CHIRO.label + MESSAGES["chiro_label_unknown"]
