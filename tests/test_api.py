"""The HTTP API end to end (Flask test client): discovery, every fixture, bad input."""

from __future__ import annotations

import copy
import json

import pytest
from conftest import load_fixture
from hypothesis import given, settings
from hypothesis import strategies as st

from cds_service.web.api import _too_deep

# fixture → the draft orders that must get a card (in order); every other fixture order gets none
EXPECTED = {
    "sandbox-pama-order-select-sacroplasty.json": ["ServiceRequest/example-request-id"],
    "sandbox-pama-order-select-ct.json": [],
    "sandbox-pama-order-select-empty-code.json": [],
    "order-select-sacroplasty-cpt.json": ["ServiceRequest/sr-sacro-1"],
    "order-select-sacroplasty-text.json": ["ServiceRequest/sr-sacro-text"],
    "order-select-sacroplasty-bilateral.json": ["ServiceRequest/sr-sacro-bi"],
    "order-select-vertebroplasty-lumbar.json": [],
    "order-select-vertebroplasty-sacral.json": ["ServiceRequest/sr-vp-s1"],
    "order-select-kyphoplasty-sacrum-text.json": ["ServiceRequest/sr-kp-sac"],
    "order-sign-mixed.json": ["ServiceRequest/sr-sacro-2"],
    "order-select-mixed-selects-ct.json": [],
    "order-select-mixed-selects-sacroplasty.json": ["ServiceRequest/sr-sacro-2"],
    "bench-order-select-5-orders-no-sacroplasty.json": [],
    "bench-order-sign-25-orders-one-sacroplasty.json": ["ServiceRequest/sr-25-sacro"],
}
SERVICE = {"order-select": "sacroplasty-order-select", "order-sign": "sacroplasty-order-sign"}
SCHEDULING_SERVICE = {"order-dispatch": "coverage-order-dispatch", "appointment-book": "coverage-appointment-book"}


def post(client, body, service_id=None, **kwargs):
    service_id = service_id or SERVICE[body["hook"]]
    return client.post(f"/cds-services/{service_id}", json=body, **kwargs)


def flagged_orders(response_json) -> list[str]:
    """The draft order each card is about, read from its suggestions' delete actions."""
    refs = []
    for card in response_json["cards"]:
        deletes = {a["resourceId"] for s in card["suggestions"] for a in s["actions"] if a["type"] == "delete"}
        assert len(deletes) == 1
        refs.append(deletes.pop())
    return refs


def test_discovery_lists_both_hooks(client) -> None:
    response = client.get("/cds-services")
    assert response.status_code == 200
    services = {s["hook"]: s for s in response.get_json()["services"]}
    assert set(services) == {"order-select", "order-sign", "order-dispatch", "appointment-book"}
    for hook, service in services.items():
        assert service["id"] == {**SERVICE, **SCHEDULING_SERVICE}[hook]
        assert service["title"] and service["description"]
        if hook in SCHEDULING_SERVICE:  # the guide's standard templates: tests/test_dispatch.py
            continue
        assert set(service["prefetch"]) == {"patient", "coverage", "conditions"}
        assert all("{{context.patientId}}" in t for t in service["prefetch"].values())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fixture_end_to_end(client, name: str) -> None:
    response = post(client, load_fixture(name))
    assert response.status_code == 200, response.get_data(as_text=True)
    body = response.get_json()
    assert flagged_orders(body) == EXPECTED[name]
    if not EXPECTED[name]:
        assert body == {"cards": []}


def test_every_fixture_has_an_expectation() -> None:
    from conftest import FIXTURES

    assert {p.name for p in FIXTURES.glob("*.json") if not p.name.startswith("patient-")} <= \
        set(EXPECTED) | set(SCHEDULING_EXPECTED)


# order-dispatch / appointment-book fixtures: the resource each card is about (no suggestions on these cards).
SCHEDULING_EXPECTED = {
    "order-dispatch-sacroplasty.json": ["ServiceRequest/sr-sacro-1"],
    "order-dispatch-not-sacroplasty.json": [],
    "appointment-book-sacroplasty-order.json": ["ServiceRequest/sr-sacro-1"],
    "appointment-book-sacroplasty-coded.json": ["Appointment/appt-sacro-2"],
    "appointment-book-unrelated.json": [],
}


@pytest.mark.parametrize("name", sorted(SCHEDULING_EXPECTED))
def test_scheduling_fixture_end_to_end(client, name: str) -> None:
    body = load_fixture(name)
    response = post(client, body, SCHEDULING_SERVICE[body["hook"]])
    assert response.status_code == 200, response.get_data(as_text=True)
    result = response.get_json()
    about = [r["reference"] for c in result["cards"] for r in c["extension"]["davinci-crd.associated-resource"]]
    assert about == SCHEDULING_EXPECTED[name]
    assert all("suggestions" not in c for c in result["cards"])
    assert [a["resource"]["resourceType"] + "/" + a["resource"]["id"] for a in result.get("systemActions", [])] \
        == SCHEDULING_EXPECTED[name]


def test_order_select_judges_only_selected_orders(client) -> None:
    body = load_fixture("order-select-mixed-selects-ct.json")
    assert post(client, body).get_json() == {"cards": []}
    body["context"]["selections"].append("ServiceRequest/sr-sacro-2")
    assert flagged_orders(post(client, body).get_json()) == ["ServiceRequest/sr-sacro-2"]


@pytest.mark.parametrize("status,judged", [("draft", True), ("active", True), ("revoked", False),
                                           ("completed", False), ("on-hold", False), ("entered-in-error", False)])
def test_order_status(client, status: str, judged: bool) -> None:
    body = load_fixture("order-select-sacroplasty-cpt.json")
    body["context"]["draftOrders"]["entry"][0]["resource"]["status"] = status
    assert len(post(client, body).get_json()["cards"]) == (1 if judged else 0)


def test_non_servicerequest_orders_ignored(client) -> None:
    body = load_fixture("order-select-sacroplasty-cpt.json")
    resource = body["context"]["draftOrders"]["entry"][0]["resource"]
    resource["resourceType"] = "MedicationRequest"
    body["context"]["selections"] = ["MedicationRequest/sr-sacro-1"]
    assert post(client, body).get_json() == {"cards": []}


def test_imperfect_sandbox_fhir_is_read(client) -> None:
    """No Bundle.type, intent plan, reasonCode as one object, no requester/authoredOn: still a card."""
    body = load_fixture("sandbox-pama-order-select-sacroplasty.json")
    resource = body["context"]["draftOrders"]["entry"][0]["resource"]
    resource["reasonCode"] = resource["reasonCode"][0]
    card = post(client, body).get_json()["cards"][0]
    created = [a["resource"] for s in card["suggestions"] for a in s["actions"] if a["type"] == "create"]
    # The low back pain reason, sent as one object, is read and copied where it fits (exercise, chiropractic)
    copied = [r for r in created if "reasonCode" in r]
    assert copied and all(r["reasonCode"] == [resource["reasonCode"]] for r in copied)
    assert all(r["requester"] == {"reference": "Practitioner/COREPRACTITIONER1"} for r in created)
    assert all(r["intent"] == "plan" for r in created)


def test_unknown_fields_are_ignored(client) -> None:
    body = load_fixture("order-select-sacroplasty-cpt.json")
    plain = post(client, copy.deepcopy(body)).get_json()
    body["somethingNew"] = {"x": 1}
    body["context"]["futureField"] = [1, 2]
    body["prefetch"]["unknownKey"] = {"resourceType": "Basic"}
    body["extension"] = {"org.example.flag": True}
    body["fhirAuthorization"]["extra"] = "x"
    extended = post(client, body).get_json()
    assert len(extended["cards"]) == len(plain["cards"]) == 1
    assert extended["cards"][0]["summary"] == plain["cards"][0]["summary"]


def _without(body: dict, path: str) -> dict:
    body = copy.deepcopy(body)
    *parents, last = path.split(".")
    target = body
    for key in parents:
        target = target[key]
    del target[last]
    return body


BASE = "order-select-sacroplasty-cpt.json"


def _bad_cases():
    body = load_fixture(BASE)
    yield "missing-hook", _without(body, "hook"), "hook"
    yield "missing-hookInstance", _without(body, "hookInstance"), "hookInstance"
    yield "missing-context", _without(body, "context"), "context"
    yield "missing-userId", _without(body, "context.userId"), "context.userId"
    yield "missing-patientId", _without(body, "context.patientId"), "context.patientId"
    yield "missing-draftOrders", _without(body, "context.draftOrders"), "context.draftOrders"
    yield "missing-selections", _without(body, "context.selections"), "context.selections"
    wrong_hook = copy.deepcopy(body)
    wrong_hook["hook"] = "order-sign"
    yield "wrong-hook", wrong_hook, "hook"
    not_bundle = copy.deepcopy(body)
    not_bundle["context"]["draftOrders"] = {"resourceType": "ServiceRequest", "id": "x"}
    yield "draftOrders-not-bundle", not_bundle, "context.draftOrders"
    list_orders = copy.deepcopy(body)
    list_orders["context"]["draftOrders"] = [list_orders["context"]["draftOrders"]]
    yield "draftOrders-list", list_orders, "context.draftOrders"
    dangling = copy.deepcopy(body)
    dangling["context"]["selections"] = ["ServiceRequest/does-not-exist"]
    yield "selections-point-at-nothing", dangling, "context.selections"
    selections_string = copy.deepcopy(body)
    selections_string["context"]["selections"] = "ServiceRequest/sr-sacro-1"
    yield "selections-not-a-list", selections_string, "context.selections"
    user_number = copy.deepcopy(body)
    user_number["context"]["userId"] = 42
    yield "userId-not-string", user_number, "context.userId"
    entry_not_list = copy.deepcopy(body)
    entry_not_list["context"]["draftOrders"]["entry"] = {"resource": {}}
    yield "entry-not-a-list", entry_not_list, "context.draftOrders.entry"


@pytest.mark.parametrize("name,body,field", list(_bad_cases()), ids=[c[0] for c in _bad_cases()])
def test_invalid_request_is_400_naming_the_problem(client, name: str, body: dict, field: str) -> None:
    response = post(client, body, service_id="sacroplasty-order-select")
    assert response.status_code == 400
    error = response.get_json()
    assert error["error"] == "invalid_request"
    assert error["field"] == field
    assert error["message"]


@pytest.mark.parametrize("data", [b"{not json", b"", b"\xff\xfe", b"[]", b"[1, 2]", b"\"text\"", b"null", b"42"])
def test_body_that_is_not_a_json_object(client, data: bytes) -> None:
    response = client.post("/cds-services/sacroplasty-order-select", data=data, content_type="application/json")
    assert response.status_code == 400
    assert response.is_json and response.get_json()["message"]


def test_unknown_service_is_404_json(client) -> None:
    response = post(client, load_fixture(BASE), service_id="no-such-service")
    assert response.status_code == 404
    assert response.get_json()["error"] == "unknown_service"
    assert client.post("/cds-services/no-such-service/feedback", json={"feedback": []}).status_code == 404


def test_unknown_path_and_method_are_json(client) -> None:
    assert client.get("/nowhere").get_json()["error"] == "not_found"
    response = client.delete("/cds-services")
    assert response.status_code == 405 and response.is_json


def test_wrong_content_type_is_415(client) -> None:
    response = client.post("/cds-services/sacroplasty-order-select", data=json.dumps(load_fixture(BASE)),
                           content_type="text/plain")
    assert response.status_code == 415 and response.is_json


def test_body_over_cap_is_413(tmp_path) -> None:
    from cds_service import create_app
    from cds_service.config import Settings

    app = create_app(Settings(dev=True, database_url=f"sqlite:///{tmp_path / 'db.sqlite3'}", max_body_bytes=1000))
    response = app.test_client().post("/cds-services/sacroplasty-order-select", json=load_fixture(BASE))
    assert response.status_code == 413 and response.is_json


def test_too_many_draft_orders_is_413(tmp_path) -> None:
    from cds_service import create_app
    from cds_service.config import Settings

    app = create_app(Settings(dev=True, database_url=f"sqlite:///{tmp_path / 'db.sqlite3'}", max_draft_orders=3))
    response = app.test_client().post("/cds-services/sacroplasty-order-sign",
                                      json=load_fixture("order-sign-mixed.json"))
    assert response.status_code == 413
    assert response.get_json()["field"] == "context.draftOrders.entry"


def test_deeply_nested_json_is_400(client) -> None:
    body = load_fixture(BASE)
    body["context"]["deep"] = json.loads("[" * 200 + "]" * 200)
    assert post(client, body).status_code == 400
    response = client.post("/cds-services/sacroplasty-order-select", data=b"[" * 100000,
                           content_type="application/json")
    assert response.status_code == 400


def _depth(value) -> int:
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
    return 0 if children is None else 1 + max(map(_depth, children), default=0)


_TRICKY = st.text(alphabet='[]{}"\\ab,:é', max_size=8)  # strings full of what the byte-level check must skip
_JSON = st.recursive(st.none() | st.booleans() | st.integers() | _TRICKY,
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TRICKY, inner, max_size=3),
                     max_leaves=25)


@given(value=_JSON, limit=st.integers(0, 8), ascii_only=st.booleans(), indent=st.sampled_from([None, 2]))
@settings(max_examples=500, deadline=None)
def test_depth_check_agrees_with_the_parsed_value(value, limit: int, ascii_only: bool, indent) -> None:
    raw = json.dumps(value, ensure_ascii=ascii_only, indent=indent).encode()
    assert _too_deep(raw, limit) == (_depth(value) > limit)


@pytest.mark.parametrize("value", ["line\nforged log line", "x" * 201, "tab\there"])
def test_hook_instance_must_be_one_short_printable_line(client, value: str) -> None:
    body = load_fixture(BASE)
    body["hookInstance"] = value
    response = post(client, body)
    assert response.status_code == 400
    assert response.get_json()["field"] == "hookInstance"
