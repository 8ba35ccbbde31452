"""appointment-book (Da Vinci CRD primary hook): an Appointment is for a sacroplasty when a ServiceRequest it is
based on is one (coverage information on that ServiceRequest) or when its own serviceType / reasonCode is one
(coverage information on the Appointment); a card for the scheduler without suggestions; nothing otherwise."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import pytest
from conftest import load_fixture
from test_dispatch import ruled as answer  # the cards and systemActions of a 200 answer
from test_fhir import BASE_PATH, TOKEN, app_client, ehr, origin, serve_member, servers  # noqa: F401 (ehr, servers: fixtures)

from cds_service.config import Settings
from cds_service.pipeline.crd import COVERAGE_INFORMATION
from cds_service.pipeline.policy import load_policies

BOOKING = "coverage-appointment-book"
POLICY = load_policies(Settings().cards_dir)[0]


def book(client, body: dict[str, Any]):
    return client.post(f"/cds-services/{BOOKING}", json=body)


def assert_scheduler_card(cards: list[dict[str, Any]], associated: str) -> None:
    assert len(cards) == 1 and "suggestions" not in cards[0]
    assert "not covered" in cards[0]["detail"] and cards[0]["source"]["url"]
    assert POLICY.card["not_the_orderer"] in cards[0]["detail"]  # the scheduler does not change the order
    assert cards[0]["extension"]["davinci-crd.associated-resource"] == [{"reference": associated}]


def test_based_on_a_sacroplasty_order_updates_the_order(client) -> None:
    cards, actions = answer(book(client, load_fixture("appointment-book-sacroplasty-order.json")))
    assert_scheduler_card(cards, "ServiceRequest/sr-sacro-1")
    assert [(a["type"], a["resource"]["resourceType"], a["resource"]["id"]) for a in actions] == \
        [("update", "ServiceRequest", "sr-sacro-1")]


def test_an_appointment_coded_itself_is_updated_itself(client) -> None:
    cards, actions = answer(book(client, load_fixture("appointment-book-sacroplasty-coded.json")))
    assert_scheduler_card(cards, "Appointment/appt-sacro-2")
    assert [(a["type"], a["resource"]["resourceType"], a["resource"]["id"]) for a in actions] == \
        [("update", "Appointment", "appt-sacro-2")]
    info = [e for e in actions[0]["resource"]["extension"] if e["url"] == COVERAGE_INFORMATION]
    assert {"url": "covered", "valueCode": "not-covered"} in info[0]["extension"]


def test_an_appointment_coded_by_its_reason_counts_too(client) -> None:
    body = load_fixture("appointment-book-sacroplasty-coded.json")
    appointment = body["context"]["appointments"]["entry"][0]["resource"]
    appointment["reasonCode"] = appointment.pop("serviceType")
    cards, actions = answer(book(client, body))
    assert len(cards) == 1 and actions[0]["resource"]["id"] == "appt-sacro-2"


def test_an_unrelated_appointment_gets_nothing(client) -> None:
    assert answer(book(client, load_fixture("appointment-book-unrelated.json"))) == ([], [])


def test_based_on_an_order_the_service_cannot_read_is_judged_on_the_appointment(client) -> None:
    body = load_fixture("appointment-book-sacroplasty-order.json")
    del body["prefetch"]["serviceRequests"]
    del body["fhirServer"]
    assert answer(book(client, body)) == ([], [])  # its serviceType names no procedure


def test_based_on_order_read_from_the_fhir_server(settings, ehr) -> None:
    body = load_fixture("appointment-book-sacroplasty-order.json")
    order = body["prefetch"].pop("serviceRequests")
    body["prefetch"] = {"patient": body["prefetch"]["patient"]}
    body["fhirServer"] = ehr.url_for(BASE_PATH)
    serve_member(ehr, datetime.now(timezone.utc).date(), Authorization=f"Bearer {TOKEN}")
    ehr.expect_request(f"{BASE_PATH}/ServiceRequest", headers={"Authorization": f"Bearer {TOKEN}"},
                       query_string={"_id": "sr-sacro-1", "_count": "100"}).respond_with_json(order)
    cards, actions = answer(book(app_client(settings, origin(ehr)), body))
    assert_scheduler_card(cards, "ServiceRequest/sr-sacro-1")
    assert actions[0]["resource"]["id"] == "sr-sacro-1"


@pytest.mark.parametrize("context, field", [
    ({"userId": "PractitionerRole/x", "patientId": "p"}, "context.appointments"),
    ({"userId": "PractitionerRole/x", "patientId": "p", "appointments": {"resourceType": "Bundle", "entry": 3}},
     "context.appointments.entry"),
    ({"patientId": "p", "appointments": {"resourceType": "Bundle", "entry": []}}, "context.userId"),
])
def test_bad_context_is_a_400_naming_the_field(client, context: dict[str, Any], field: str) -> None:
    body = load_fixture("appointment-book-unrelated.json")
    body["context"] = context
    response = book(client, body)
    assert response.status_code == 400 and response.get_json()["field"] == field


def test_too_many_appointments_is_a_413(client, settings) -> None:
    body = load_fixture("appointment-book-unrelated.json")
    entry = body["context"]["appointments"]["entry"][0]
    body["context"]["appointments"]["entry"] = [entry] * (settings.max_draft_orders + 1)
    assert book(client, body).status_code == 413
