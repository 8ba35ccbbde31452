"""Reading the prefetch per CDS Hooks 2.0: present, null (known none), absent (unknown), client errors, garbage.
(The FHIR server fallback for absent keys is tested against real servers in test_fhir.py.)"""

from __future__ import annotations

import copy
import logging
from datetime import date
from typing import Any

import pytest
from conftest import load_fixture
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from test_eligibility import chiropractic_status

from cds_service.config import Settings
from cds_service.fhir import FetchOutcome, FhirReader
from cds_service.pipeline import limits
from cds_service.pipeline.eligibility import plan_status
from cds_service.pipeline.hooks import parse_hook_request
from cds_service.pipeline.patient import PREFETCH_TEMPLATES, fallback_query, gather
from cds_service.pipeline.policy import load_policies

POLICY = load_policies(Settings().cards_dir)[0]


def request_with(prefetch: dict[str, Any] | None, name: str = "patient-member.json", **changes: Any):
    body = load_fixture(name)
    if prefetch is None:
        body.pop("prefetch", None)
    else:
        body["prefetch"] = prefetch
    body.update(changes)
    return parse_hook_request(body, body["hook"], 200)


def member_prefetch() -> dict[str, Any]:
    return copy.deepcopy(load_fixture("patient-member.json")["prefetch"])


def test_present_keys_are_used() -> None:
    ctx = gather(request_with(member_prefetch()))
    assert ctx.patient["id"] == "pt-sh-1001"
    assert [c["id"] for c in ctx.coverages] == ["cov-sh-1001"]
    assert [c["code"]["coding"][0]["code"] for c in ctx.conditions] == ["M54.50"]
    assert ctx.unavailable == frozenset()
    assert ctx.organizations["Organization/org-sandhills"]["name"] == "Sandhills Center"
    assert ctx.organizations["https://ehr.example.org/fhir/R4/Organization/org-sandhills"]["name"]


def test_null_means_known_to_be_none() -> None:
    ctx = gather(request_with({"patient": None, "coverage": None, "conditions": None}))
    assert (ctx.patient, ctx.coverages, ctx.conditions, ctx.unavailable) == (None, [], [], frozenset())


def test_empty_searchset_means_known_to_be_none() -> None:
    empty = {"resourceType": "Bundle", "type": "searchset", "total": 0}
    ctx = gather(request_with({"coverage": empty, "conditions": dict(empty, entry=[])}))
    assert (ctx.coverages, ctx.conditions) == ([], [])


def test_absent_means_unknown() -> None:
    ctx = gather(request_with(None))
    assert (ctx.patient, ctx.coverages, ctx.conditions, ctx.unavailable) == (None, None, None, frozenset())


def test_a_lone_resource_is_accepted_for_a_search() -> None:
    coverage = member_prefetch()["coverage"]["entry"][0]["resource"]
    ctx = gather(request_with({"coverage": coverage}))
    assert ctx.coverages == [coverage] and ctx.conditions is None


def test_operation_outcome_means_unavailable(caplog) -> None:
    caplog.set_level(logging.WARNING, logger="cds_service")
    outcome = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "timeout"}]}
    ctx = gather(request_with({"coverage": outcome, "conditions": member_prefetch()["conditions"]}))
    assert ctx.coverages is None and ctx.unavailable == {"coverage"} and ctx.conditions
    assert any("reported an error for prefetch coverage" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("severity, unavailable", [("error", True), ("fatal", True), ("warning", False),
                                                   ("information", False)])
def test_operation_outcome_inside_the_bundle(severity: str, unavailable: bool) -> None:
    conditions = member_prefetch()["conditions"]
    conditions["entry"].append({"resource": {"resourceType": "OperationOutcome",
                                             "issue": [{"severity": severity, "code": "incomplete"}]},
                                "search": {"mode": "outcome"}})
    ctx = gather(request_with({"conditions": conditions}))
    assert ("conditions" in ctx.unavailable) is unavailable
    assert (ctx.conditions is None) is unavailable


@pytest.mark.parametrize("value", ["Bundle", 42, [], {"resourceType": "Observation"}, {"entry": []}])
def test_garbage_is_treated_as_not_sent_and_then_as_unavailable(value, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="cds_service")
    ctx = gather(request_with({"coverage": value, "patient": value}))
    assert ctx.coverages is None and ctx.patient is None
    assert ctx.unavailable == {"coverage", "patient"}
    assert any("prefetch coverage is not FHIR Coverage data" in r.getMessage() for r in caplog.records)


def test_a_patient_key_holding_a_bundle_is_garbage() -> None:
    ctx = gather(request_with({"patient": {"resourceType": "Bundle", "entry": []}}))
    assert ctx.patient is None and "patient" in ctx.unavailable


def test_unlisted_fhir_server_leaves_absent_keys_unknown(caplog) -> None:
    caplog.set_level(logging.WARNING, logger="cds_service")
    client = FhirReader(["https://other.example.org"], 0.8)
    ctx = gather(request_with(None, fhirServer="https://ehr.example.org/fhir/R4"), client)
    assert (ctx.coverages, ctx.conditions, ctx.unavailable) == (None, None, frozenset())
    messages = [r.getMessage() for r in caplog.records]
    assert any("'https://ehr.example.org' is not in CDS_FHIR_ALLOWED_ORIGINS" in m for m in messages)
    assert not any("pt-sh-1001" in m for m in messages)


class _ServerWithTooMuch:
    """A FhirReader stand-in whose server answers the coverage search with more payors than the cap."""

    def fetch(self, fhir_server, authorization, queries, hook_instance):  # noqa: ANN001, ANN201
        bundle = member_prefetch()["coverage"]
        bundle["entry"][0]["resource"]["payor"] *= limits.MAX_PAYORS + 1
        return FetchOutcome(values={key: bundle if key == "coverage" else member_prefetch()[key]
                                    for key in queries})


def test_fetched_data_beyond_a_cap_is_unavailable(caplog) -> None:
    caplog.set_level(logging.WARNING, logger="cds_service")
    ctx = gather(request_with(None, fhirServer="https://ehr.example.org/fhir/R4"), _ServerWithTooMuch())
    assert ctx.coverages is None and ctx.unavailable == frozenset({"coverage"})
    assert [c["id"] for c in ctx.conditions] == ["cond-lbp-1001"]  # the other key is used as it came
    messages = [r.getMessage() for r in caplog.records]
    assert any("fetched coverage goes beyond the cap on items (payor)" in m for m in messages)
    assert not any("pt-sh-1001" in m or "Sandhills" in m for m in messages)


def test_prefetch_beyond_a_cap_is_unavailable_and_the_rest_is_used() -> None:
    prefetch = member_prefetch()
    prefetch["conditions"]["entry"] *= limits.MAX_BUNDLE_ENTRIES + 1
    ctx = gather(request_with(prefetch))
    assert ctx.conditions is None and ctx.unavailable == frozenset({"conditions"})
    assert [c["id"] for c in ctx.coverages] == ["cov-sh-1001"]
    assert chiropractic_status(ctx, POLICY, date(2026, 11, 30)).note == "chiro_unknown"


def test_fallback_query_renders_the_template_safely() -> None:
    assert fallback_query("coverage", "pt-1") == "Coverage?patient=pt-1&status=active&_count=100"
    assert fallback_query("conditions", "pt-1") == \
        "Condition?patient=pt-1&clinical-status=active,recurrence,relapse&_count=100"
    assert fallback_query("patient", "pt-1") == "Patient/pt-1"
    assert fallback_query("coverage", "a&b=c/../d") == "Coverage?patient=a%26b%3Dc%2F..%2Fd&status=active&_count=100"


def test_templates_ask_for_active_data_of_the_context_patient() -> None:
    assert PREFETCH_TEMPLATES["patient"] == "Patient/{{context.patientId}}"
    assert "status=active" in PREFETCH_TEMPLATES["coverage"]
    statuses = PREFETCH_TEMPLATES["conditions"].split("clinical-status=")[1].split("&")[0].split(",")
    assert set(statuses) == {"active", "recurrence", "relapse"}
    assert all("{{context.patientId}}" in t for t in PREFETCH_TEMPLATES.values())


# -- hostile prefetch: whatever the client sends, the decision never raises -------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
    | st.sampled_from(["", "active", "Sandhills Center", "#p", "Organization/org-sandhills", "9999-12",
                       "2026-02-30", "urn:cds-sacroplasty:payer-id", "M54.16", "OperationOutcome", "Bundle"])
    | st.text(max_size=12),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    found = [prefix]
    if isinstance(value, dict):
        for key, child in value.items():
            found += _paths(child, prefix + (key,))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            found += _paths(child, prefix + (index,))
    return found


@hypothesis_settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_prefetch_never_breaks_the_decision(data) -> None:
    prefetch = member_prefetch()
    prefetch["radiculopathy"] = None
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(_paths(prefetch)[1:]))
        parent = prefetch
        for step in path[:-1]:
            parent = parent[step]
        parent[path[-1]] = data.draw(JSON)
    ctx = gather(request_with(prefetch))
    plan = plan_status(ctx, POLICY)
    chiro = chiropractic_status(ctx, POLICY, date(2026, 11, 25))
    assert isinstance(plan.applies, bool) and isinstance(chiro.offer, bool)
    assert plan.note is None or plan.note in POLICY.messages
    assert chiro.note in POLICY.messages
