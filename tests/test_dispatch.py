"""order-dispatch (Da Vinci CRD primary hook): the dispatched orders read from prefetch or fhirServer, judged
alone; a coverage-information update on each sacroplasty order and a card for the performer without
delete/create suggestions. Also: the standard prefetch of discovery, and the CRD options max-cards / what-if."""

from __future__ import annotations

import copy
from datetime import datetime, timezone
from typing import Any

import pytest
from conftest import load_fixture
from test_fhir import (  # noqa: F401 (ehr, elsewhere, servers: fixtures)
    BASE_PATH,
    PATIENT,
    TOKEN,
    app_client,
    coverage_query,
    ehr,
    elsewhere,
    member_data,
    origin,
    serve_member,
    servers,
)

from cds_service.config import Settings
from cds_service.pipeline.crd import COVERAGE_INFORMATION
from cds_service.pipeline.policy import load_policies

DISPATCH = "coverage-order-dispatch"
POLICY = load_policies(Settings().cards_dir)[0]
FIXTURE = "order-dispatch-sacroplasty.json"
# Da Vinci CRD CRDServices.json (input/resources/CRDServices.json), order-dispatch entry, text-equal.
GUIDE_PREFETCH = {
    "patient": "Patient/{{context.patientId}}",
    "coverage": "Coverage?patient={{context.patientId}}&status=active",
    "servicerequest": "ServiceRequest?_id={{context.dispatchedOrders.ServiceRequest.id}}"
                      "&_include=ServiceRequest:performer&_include=ServiceRequest:requester"
                      "&_include:iterate=PractitionerRole:organization&_include:iterate=PractitionerRole:practitioner",
}


def dispatch(client, body: dict[str, Any]):
    return client.post(f"/cds-services/{DISPATCH}", json=body)


def ruled(response) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    assert response.status_code == 200, response.get_data(as_text=True)
    result = response.get_json()
    return result["cards"], result.get("systemActions", [])


def assert_performer_answer(cards: list[dict[str, Any]], actions: list[dict[str, Any]]) -> None:
    """One card with no suggestions (the performer does not change the order), one update of the active order."""
    assert len(cards) == 1 and "suggestions" not in cards[0] and "selectionBehavior" not in cards[0]
    assert "not covered" in cards[0]["detail"]
    assert POLICY.card["not_the_orderer"] in cards[0]["detail"]  # the performer does not change the order
    assert cards[0]["extension"]["davinci-crd.associated-resource"] == [{"reference": "ServiceRequest/sr-sacro-1"}]
    assert [(a["type"], a["resource"]["id"], a["resource"]["status"]) for a in actions] == \
        [("update", "sr-sacro-1", "active")]
    info = [e for e in actions[0]["resource"]["extension"] if e["url"] == COVERAGE_INFORMATION]
    assert {"url": "covered", "valueCode": "not-covered"} in info[0]["extension"]


def test_dispatched_sacroplasty_from_prefetch(client) -> None:
    assert_performer_answer(*ruled(dispatch(client, load_fixture(FIXTURE))))


def test_both_key_spellings_are_accepted(client) -> None:
    body = load_fixture(FIXTURE)
    body["context"]["dispatched-orders"] = body["context"].pop("dispatchedOrders")
    assert_performer_answer(*ruled(dispatch(client, body)))


def test_only_dispatched_orders_are_judged(client) -> None:
    body = load_fixture(FIXTURE)
    body["context"]["dispatchedOrders"] = ["ServiceRequest/sr-other"]  # the sacroplasty is in prefetch only
    assert ruled(dispatch(client, body)) == ([], [])


def test_non_sacroplasty_orders_get_nothing(client) -> None:
    assert ruled(dispatch(client, load_fixture("order-dispatch-not-sacroplasty.json"))) == ([], [])


@pytest.mark.parametrize("context, field", [
    ({"patientId": PATIENT}, "context.dispatchedOrders"),
    ({"patientId": PATIENT, "dispatchedOrders": []}, "context.dispatchedOrders"),
    ({"patientId": PATIENT, "dispatchedOrders": ["not a reference"]}, "context.dispatchedOrders"),
    ({"patientId": PATIENT, "dispatched-orders": [1]}, "context.dispatched-orders"),
    ({"dispatchedOrders": ["ServiceRequest/a"]}, "context.patientId"),
])
def test_bad_context_is_a_400_naming_the_field(client, context: dict[str, Any], field: str) -> None:
    body = load_fixture(FIXTURE)
    body["context"] = context
    response = dispatch(client, body)
    assert response.status_code == 400 and response.get_json()["field"] == field


def test_too_many_dispatched_orders_is_a_413(client, settings) -> None:
    body = load_fixture(FIXTURE)
    body["context"]["dispatchedOrders"] = [f"ServiceRequest/sr-{i}" for i in range(settings.max_draft_orders + 1)]
    assert dispatch(client, body).status_code == 413


def _search_bundle(resource: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": resource}]}


def test_fhir_server_fallback_with_the_bearer_token(settings, ehr) -> None:
    today = datetime.now(timezone.utc).date()
    body = load_fixture(FIXTURE)
    order = body["prefetch"]["servicerequest"]["entry"][0]["resource"]
    body["prefetch"] = {"patient": body["prefetch"]["patient"]}
    body["fhirServer"] = ehr.url_for(BASE_PATH)
    serve_member(ehr, today, Authorization=f"Bearer {TOKEN}")
    ehr.expect_request(f"{BASE_PATH}/ServiceRequest", method="GET", headers={"Authorization": f"Bearer {TOKEN}"},
                       query_string={"_id": "sr-sacro-1", "_count": "100"}).respond_with_json(_search_bundle(order))
    cards, actions = ruled(dispatch(app_client(settings, origin(ehr)), body))
    assert_performer_answer(cards, actions)
    assert sorted(r.path for r, _ in ehr.log) == [f"{BASE_PATH}/Condition", f"{BASE_PATH}/Coverage",
                                                 f"{BASE_PATH}/ServiceRequest"]


def test_fhir_server_fallback_with_a_wrong_token_judges_nothing(settings, ehr) -> None:
    body = load_fixture(FIXTURE)
    del body["prefetch"]["servicerequest"]
    body["fhirServer"] = ehr.url_for(BASE_PATH)
    ehr.expect_request(f"{BASE_PATH}/ServiceRequest", headers={"Authorization": "Bearer another-token"}) \
        .respond_with_json(_search_bundle({}))
    assert ruled(dispatch(app_client(settings, origin(ehr)), body)) == ([], [])
    assert len(ehr.log) == 1  # asked once, with the request's token, which the server refused


def test_an_unlisted_fhir_server_is_never_contacted(settings, ehr, elsewhere) -> None:
    body = load_fixture(FIXTURE)
    order = body["prefetch"]["servicerequest"]["entry"][0]["resource"]
    body["prefetch"] = {}
    body["fhirServer"] = elsewhere.url_for(BASE_PATH)
    elsewhere.expect_request(f"{BASE_PATH}/ServiceRequest").respond_with_json(_search_bundle(order))
    assert ruled(dispatch(app_client(settings, origin(ehr)), body)) == ([], [])
    assert elsewhere.log == []


# -- discovery: the guide's standard prefetch --------------------------------------------------------------------

def test_discovery_declares_the_guides_standard_templates(client) -> None:
    services = {s["id"]: s for s in client.get("/cds-services").get_json()["services"]}
    assert services[DISPATCH]["prefetch"] == GUIDE_PREFETCH
    booking = services["coverage-appointment-book"]["prefetch"]
    assert booking == {k: GUIDE_PREFETCH[k] for k in ("patient", "coverage")}
    for hook in ("sacroplasty-order-select", "sacroplasty-order-sign"):  # unchanged; coverage is the guide's
        assert services[hook]["prefetch"]["coverage"] == GUIDE_PREFETCH["coverage"]
        assert services[hook]["prefetch"]["patient"] == GUIDE_PREFETCH["patient"]


def test_our_service_requests_key_gives_the_same_decision(client) -> None:
    body = load_fixture(FIXTURE)
    standard = ruled(dispatch(client, copy.deepcopy(body)))
    body["prefetch"]["serviceRequests"] = body["prefetch"].pop("servicerequest")
    ours = ruled(dispatch(client, body))
    assert [c["detail"] for c in ours[0]] == [c["detail"] for c in standard[0]]
    assert [a["resource"]["id"] for a in ours[1]] == [a["resource"]["id"] for a in standard[1]]


def test_a_client_sending_only_standard_keys_gets_the_same_decision(settings, ehr) -> None:
    """Conditions are no standard key: without them the service fetches them once a sacroplasty is found."""
    today = datetime.now(timezone.utc).date()
    body = load_fixture("order-sign-mixed.json")
    coverage, conditions = member_data(today)
    body["prefetch"] = {"patient": body["prefetch"]["patient"], "coverage": coverage, "conditions": conditions}
    client = app_client(settings, origin(ehr))
    full = client.post("/cds-services/sacroplasty-order-sign", json=copy.deepcopy(body)).get_json()
    del body["prefetch"]["conditions"]
    body["fhirServer"] = ehr.url_for(BASE_PATH)
    ehr.expect_request(f"{BASE_PATH}/Condition", headers={"Authorization": f"Bearer {TOKEN}"}) \
        .respond_with_json(conditions)
    standard = client.post("/cds-services/sacroplasty-order-sign", json=body).get_json()
    assert [c["detail"] for c in standard["cards"]] == [c["detail"] for c in full["cards"]]
    assert len(standard["systemActions"]) == len(full["systemActions"]) == 1
    assert [r.path for r, _ in ehr.log] == [f"{BASE_PATH}/Condition"]
    assert coverage_query()  # the Coverage query of the fallback is the guide's (test_fhir.coverage_query)


# -- CRD options -------------------------------------------------------------------------------------------------

def _with_config(config: dict[str, Any]) -> dict[str, Any]:
    body = load_fixture("order-sign-mixed.json")
    body["extension"] = {"davinci-crd.configuration": config}
    return body


@pytest.mark.parametrize("value, cards", [(0, 0), (1, 1), (10**12, 1), (-3, 0), ("0", 1), (True, 1), (0.0, 1),
                                          (None, 1)])
def test_max_cards_is_honoured_clamped_and_ignored_when_ill_typed(client, value: Any, cards: int) -> None:
    response = client.post("/cds-services/sacroplasty-order-sign", json=_with_config({"max-cards": value}))
    assert response.status_code == 200
    result = response.get_json()
    assert len(result["cards"]) == cards
    assert len(result["systemActions"]) == 1  # coverage information is recorded whatever the card limit


def test_a_what_if_call_is_accepted_and_answered_as_any_other(client) -> None:
    plain = client.post("/cds-services/sacroplasty-order-sign", json=_with_config({})).get_json()
    what_if = client.post("/cds-services/sacroplasty-order-sign",
                          json=_with_config({"unsolicited-determ": True, "unknown-option": "x"}))
    assert what_if.status_code == 200
    result = what_if.get_json()
    assert [c["detail"] for c in result["cards"]] == [c["detail"] for c in plain["cards"]]
    assert len(result["systemActions"]) == len(plain["systemActions"]) == 1


# -- Coverage: missing, several, another payer's (docs/crd.md) -----------------------------------------------------

def _other_payer(coverage: dict[str, Any]) -> dict[str, Any]:
    other = copy.deepcopy(coverage)
    other["id"] = "cov-other-1"
    other["payor"] = [{"display": "Blue Ridge Mutual Insurance"}]
    other["class"] = [{"type": other["class"][0]["type"], "value": "BR-PPO", "name": "Blue Ridge PPO"}]
    return other


def _with_coverages(coverages: list[dict[str, Any]]) -> dict[str, Any]:
    body = load_fixture(FIXTURE)
    body["prefetch"]["coverage"] = {"resourceType": "Bundle", "type": "searchset",
                                    "entry": [{"resource": c} for c in coverages]}
    return body


@pytest.mark.parametrize("case", ["missing", "several", "another payer's", "ours only"])
def test_coverage_edge_cases_as_documented(client, case: str) -> None:
    ours = load_fixture(FIXTURE)["prefetch"]["coverage"]["entry"][0]["resource"]
    coverages = {"missing": [], "several": [_other_payer(ours), ours], "another payer's": [_other_payer(ours)],
                 "ours only": [ours]}[case]
    cards, actions = ruled(dispatch(client, _with_coverages(coverages)))
    references = [s["valueReference"]["reference"] for a in actions for e in a["resource"]["extension"]
                  if e["url"] == COVERAGE_INFORMATION for s in e["extension"] if s["url"] == "coverage"]
    expected = {"missing": (1, []), "several": (1, ["Coverage/cov-sh-1001"]), "another payer's": (0, []),
                "ours only": (1, ["Coverage/cov-sh-1001"])}[case]
    assert (len(cards), references) == expected


def test_more_dispatched_sacroplasties_than_the_cap_is_a_413_naming_the_field(client) -> None:
    from cds_service.pipeline import limits

    body = load_fixture(FIXTURE)
    order = body["prefetch"]["servicerequest"]["entry"][0]["resource"]
    count = limits.MAX_SACROPLASTY_ORDERS + 1
    body["prefetch"]["servicerequest"]["entry"] = [{"resource": {**order, "id": f"sr-{i}"}} for i in range(count)]
    body["context"]["dispatchedOrders"] = [f"ServiceRequest/sr-{i}" for i in range(count)]
    response = dispatch(client, body)
    assert response.status_code == 413 and response.get_json()["field"] == "context.dispatchedOrders"
