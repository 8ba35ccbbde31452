"""The cost model of one call (cds_service/limits.py), through the Flask test client: a test per cap, the
findings it fixes (issue 13: 1, draft-order validation without a cost bound; 7, amplification of an order's
text), and a property-based test that growing any array of a hook request or of its prefetch grows the
answer and the work at most linearly. No timed assertion: sizes are exact, work is counted in traced lines."""

from __future__ import annotations

import copy
import logging
import sys
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from conftest import load_fixture
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cds_service.config import Settings
from cds_service.pipeline import cards, limits
from cds_service.pipeline.policy import load_policies

POLICY = load_policies(Settings().cards_dir)[0]
SERVICE = {"order-select": "sacroplasty-order-select", "order-sign": "sacroplasty-order-sign"}
WHERE = "context.draftOrders.entry[0].resource"
EXTENSION = {"url": "http://example.org/fhir/StructureDefinition/note", "valueString": "x"}  # 3 JSON values
CONFIRM = POLICY.messages["chiro_label_unknown"]
NOT_CHECKED = POLICY.messages["coverage_fetch_failed"]


def member(hook: str = "order-select") -> dict[str, Any]:
    """A sacroplasty order for a plan member, with prefetch: the call that builds a card and a CRD update."""
    body = load_fixture("patient-member.json")
    if hook == "order-sign":
        body["hook"] = "order-sign"
        del body["context"]["selections"]
    return body


def order(body: dict[str, Any], index: int = 0) -> dict[str, Any]:
    return body["context"]["draftOrders"]["entry"][index]["resource"]


def coverage(body: dict[str, Any]) -> dict[str, Any]:
    return body["prefetch"]["coverage"]["entry"][0]["resource"]


def post(client, body: dict[str, Any]):
    return client.post(f"/cds-services/{SERVICE[body['hook']]}", json=body)


def values(value: Any) -> int:
    return limits.measure(value, 10**9, {}, 10**9)[0]


def refused(response, status: int, error: str, field: str) -> None:
    assert response.status_code == status, response.get_data(as_text=True)[:300]
    body = response.get_json()
    assert (body["error"], body["field"]) == (error, field), body
    assert len(response.data) < 1_000  # a short error, never an echo of the input


# ---------------------------------------------------------------- finding 1: elements per draft order

def test_finding_1_an_order_padded_with_extensions_is_refused(client) -> None:
    """Was: extension [{}] x 100,000 for a plan member took 3.8 s (the CRD update validated it all)."""
    body = member()
    order(body)["extension"] = [{}] * limits.MAX_ORDER_ELEMENTS
    refused(post(client, body), 413, "too_many_elements", WHERE)


def test_an_order_at_the_element_cap_is_answered_with_its_crd_update(client) -> None:
    body = member()
    free = limits.MAX_ORDER_ELEMENTS - values(order(body)) - 1  # the extension array is a value too
    order(body)["extension"] = [dict(EXTENSION, valueString=str(i)) for i in range(free // 3)]
    assert limits.MAX_ORDER_ELEMENTS - 3 < values(order(body)) <= limits.MAX_ORDER_ELEMENTS
    response = post(client, body)
    assert response.status_code == 200
    answer = response.get_json()
    assert len(answer["cards"]) == 1
    assert len(answer["systemActions"][0]["resource"]["extension"]) == free // 3 + 1  # + coverage-information


def test_finding_1_reason_codings_padded_are_refused_without_prefetch(client) -> None:
    """Was: reasonCode padded to 131,000 codings took 3.0 s and gave a 16.7 MB answer (copied into every
    created order)."""
    body = member()
    del body["prefetch"]
    reason = order(body)["reasonCode"][0]
    reason["coding"] = reason["coding"] * (limits.MAX_CODINGS + 1)
    refused(post(client, body), 413, "too_many_items", f"{WHERE}.reasonCode[0].coding")


@pytest.mark.parametrize("key, cap, item", [
    ("reasonCode", limits.MAX_REASONS, {"text": "sacral insufficiency fracture"}),
    ("reasonReference", limits.MAX_REASONS, {"reference": "Condition/c1"}),
    ("contained", limits.MAX_CONTAINED, {"resourceType": "Organization", "id": "o1", "name": "x"}),
])
def test_arrays_of_an_order_beyond_their_cap_are_refused(client, key: str, cap: int, item: dict) -> None:
    body = member()
    order(body)[key] = [copy.deepcopy(item) for _ in range(cap)]
    assert post(client, body).status_code == 200  # at the cap
    order(body)[key].append(item)
    refused(post(client, body), 413, "too_many_items", f"{WHERE}.{key}")


def test_codings_of_the_order_code_beyond_the_cap_are_refused(client) -> None:
    body = member()
    code = order(body)["code"]
    code["coding"] += [{"system": "http://example.org/local", "code": str(i)} for i in range(limits.MAX_CODINGS)]
    refused(post(client, body), 413, "too_many_items", f"{WHERE}.code.coding")


def test_values_over_all_orders_of_a_call_beyond_the_cap_are_refused(client) -> None:
    body = member("order-sign")
    entries = body["context"]["draftOrders"]["entry"]
    template = copy.deepcopy(entries[0]["resource"])
    template["code"] = {"text": "MRI lumbar spine"}  # not a sacroplasty: only the cost is at stake
    template["extension"] = [EXTENSION] * ((limits.MAX_ORDER_ELEMENTS - 100) // 3)
    per_order = values(template)
    for i in range(limits.MAX_DRAFT_ELEMENTS // per_order + 1):
        entries.append({"resource": dict(template, id=f"other-{i}")})
    refused(post(client, body), 413, "too_many_elements", "context.draftOrders")


def test_the_bound_on_values_never_refuses_a_call_within_the_caps(client) -> None:
    """Commas and brackets inside strings raise the fast bound, not the count: the exact count decides."""
    body = member("order-sign")
    entries = body["context"]["draftOrders"]["entry"]
    template = copy.deepcopy(entries[0]["resource"])
    template["code"] = {"text": "MRI lumbar spine"}
    template["note"] = [{"text": ""}]
    room = 2 * limits.MAX_ORDER_ELEMENTS - 1 - len(orjson.dumps(template)) - 10
    template["note"][0]["text"] = ",[{" * (room // 3)
    size = len(orjson.dumps(template))
    assert size <= 2 * limits.MAX_ORDER_ELEMENTS - 1 and values(template) < 100  # the premise
    count = limits.MAX_DRAFT_ELEMENTS // ((size + 1) // 2) + 1  # the bounds add up beyond the cap
    entries += [{"resource": dict(template, id=f"other-{i}")} for i in range(count)]
    response = post(client, body)
    assert response.status_code == 200
    assert len(response.get_json()["cards"]) == 1


# ---------------------------------------------------------------- finding 7: echoed text

def test_finding_7_a_long_order_text_is_refused(client) -> None:
    """Was: a 2 MB order text gave a 20.8 MB answer (echoed into the card and every created order)."""
    body = member()
    order(body)["code"]["text"] = "Sacroplasty " + "x" * limits.MAX_STRING_LENGTH
    refused(post(client, body), 413, "text_too_long", f"{WHERE}.code.text")


def test_a_long_text_anywhere_in_an_order_is_refused(client) -> None:
    body = member()
    order(body)["note"] = [{"text": "ok"}, {"text": "x" * (limits.MAX_STRING_LENGTH + 1)}]
    refused(post(client, body), 413, "text_too_long", f"{WHERE}.note[1].text")


def test_what_every_created_order_copies_is_capped(client) -> None:
    body = member()
    order(body)["reasonCode"][0]["text"] = "x" * (limits.MAX_COPIED_BYTES - 1_000)  # fine alone
    assert post(client, body).status_code == 200
    order(body)["requester"]["display"] = "y" * 2_000  # the two together are too much to copy 8 times
    response = post(client, body)
    refused(response, 413, "text_too_long", f"{WHERE}.reasonCode")
    assert "requester" in response.get_json()["message"]


def test_the_copied_elements_are_those_cards_copies() -> None:
    assert set(cards.CARRIED_OVER) | {"reasonCode", "intent"} == set(limits.COPIED_ELEMENTS)


def test_answer_size_is_bounded_by_the_caps(client) -> None:
    """An order at the text caps: the answer is its CRD update (the order once) plus what the card copies."""
    body = member()
    order(body)["note"] = [{"text": "n" * limits.MAX_STRING_LENGTH}]  # not copied, only in the CRD update
    order(body)["reasonCode"][0]["text"] = "r" * (limits.MAX_COPIED_BYTES - 1_000)
    plain = post(client, member())
    response = post(client, body)
    assert response.status_code == 200
    copies = len(response.get_json()["cards"][0]["suggestions"])
    growth = len(response.data) - len(plain.data)
    assert growth <= limits.MAX_STRING_LENGTH + (copies + 1) * limits.MAX_COPIED_BYTES


def test_the_order_name_echoed_into_the_card_is_cut(client) -> None:
    body = member()
    name = "Sacroplasty " + "x" * (limits.MAX_STRING_LENGTH - 20)
    order(body)["code"]["text"] = name
    response = post(client, body)
    assert response.status_code == 200
    card = response.get_json()["cards"][0]
    texts = [card["detail"]] + [a["description"] for s in card["suggestions"] for a in s["actions"]]
    assert all("x" * (limits.MAX_ECHOED_TEXT + 1) not in t for t in texts)


def test_sacroplasty_orders_per_call_beyond_the_cap_are_refused(client) -> None:
    body = member("order-sign")
    entries = body["context"]["draftOrders"]["entry"]
    first = entries[0]["resource"]
    entries += [{"resource": dict(first, id=f"sr-{i}")} for i in range(limits.MAX_SACROPLASTY_ORDERS)]
    refused(post(client, body), 413, "too_many_items", "context.draftOrders")


# ---------------------------------------------------------------- context ids and selections

@pytest.mark.parametrize("key", ["userId", "patientId", "encounterId"])
def test_context_ids_longer_than_an_id_are_malformed(client, key: str) -> None:
    body = member()
    body["context"][key] = "Practitioner/" + "9" * limits.MAX_ID_LENGTH
    refused(post(client, body), 400, "invalid_request", f"context.{key}")
    body["context"][key] = body["context"][key][:limits.MAX_ID_LENGTH]
    assert post(client, body).status_code == 200


def test_selections_beyond_the_order_cap_are_refused(client) -> None:
    body = member()
    body["context"]["selections"] *= Settings().max_draft_orders + 1
    refused(post(client, body), 413, "too_many_items", "context.selections")


# ---------------------------------------------------------------- prefetch: beyond a cap, unavailable

def _payors(body: dict[str, Any]) -> None:
    coverage(body)["payor"] *= limits.MAX_PAYORS + 1


def _contained(body: dict[str, Any]) -> None:
    coverage(body)["contained"] = [{"resourceType": "Organization", "id": f"o{i}", "name": "Other plan"}
                                   for i in range(limits.MAX_CONTAINED + 1)]


def _entries(body: dict[str, Any]) -> None:
    bundle = body["prefetch"]["coverage"]
    bundle["entry"] *= limits.MAX_BUNDLE_ENTRIES + 1


def _elements(body: dict[str, Any]) -> None:
    coverage(body)["extension"] = [{}] * limits.MAX_PREFETCH_ELEMENTS


def _text(body: dict[str, Any]) -> None:
    coverage(body)["class"][0]["name"] = "x" * (limits.MAX_STRING_LENGTH + 1)


def _codings(body: dict[str, Any]) -> None:
    coverage(body)["class"][0]["type"]["coding"] *= limits.MAX_CODINGS + 1


@pytest.mark.parametrize("grow", [_payors, _contained, _entries, _elements, _text, _codings])
def test_coverage_beyond_a_cap_is_unavailable(client, caplog, grow: Callable[[dict], None]) -> None:
    plain = post(client, member()).get_json()
    assert plain["systemActions"] and NOT_CHECKED not in plain["cards"][0]["detail"]
    body = member()
    grow(body)
    with caplog.at_level(logging.WARNING, logger="cds_service.pipeline.patient"):
        response = post(client, body)
    assert response.status_code == 200
    answer = response.get_json()
    assert NOT_CHECKED in answer["cards"][0]["detail"]  # the card still comes, saying what it could not check
    assert "systemActions" not in answer  # no CRD update without a known Coverage
    logged = "\n".join(r.getMessage() for r in caplog.records if "treated as unavailable" in r.getMessage())
    assert "prefetch coverage goes beyond the cap" in logged
    for patient_data in ("pt-sh-1001", "Whitfield", "SH-7733", "Sandhills", "xxxx"):
        assert patient_data not in logged


@pytest.mark.parametrize("grow", ["entries", "codings"])
def test_conditions_beyond_a_cap_are_unavailable(client, grow: str) -> None:
    def labels(answer: dict) -> list[str]:
        return [s["label"] for s in answer["cards"][0]["suggestions"]]

    body = member()
    assert not any(CONFIRM in label for label in labels(post(client, body).get_json()))
    conditions = body["prefetch"]["conditions"]
    if grow == "entries":
        conditions["entry"] *= limits.MAX_BUNDLE_ENTRIES + 1
    else:
        conditions["entry"][0]["resource"]["code"]["coding"] *= limits.MAX_CODINGS + 1
    response = post(client, body)
    assert response.status_code == 200
    assert any(CONFIRM in label for label in labels(response.get_json()))  # chiropractic: "confirm ..."


# ---------------------------------------------------------------- configuration

def test_caps_read_from_the_environment() -> None:
    assert limits._cap("MAX_CODINGS", 50, {}) == 50
    assert limits._cap("MAX_CODINGS", 50, {"CDS_MAX_CODINGS": " 80 "}) == 80
    for wrong in ("0", "-3", "many", "1.5"):
        with pytest.raises(ValueError, match="CDS_MAX_CODINGS"):
            limits._cap("MAX_CODINGS", 50, {"CDS_MAX_CODINGS": wrong})


def test_measure_stops_at_the_first_cap() -> None:
    count, excess = limits.measure({"a": [{}] * 10_000}, 100, {})
    assert excess is not None and excess.what == "elements" and count <= 100 + 10_001
    count, excess = limits.measure({"a": [{"coding": [{}] * 3}]}, 100, {"coding": 2})
    assert excess is not None and excess.field("x") == "x.a[0].coding" and (excess.size, excess.limit) == (3, 2)
    assert limits.measure({"a": [1, "b", None, {"c": []}]}, 100, {}) == (7, None)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.text(alphabet=',[{"\\ab', max_size=30),
    lambda children: st.lists(children, max_size=60) | st.dictionaries(
        st.sampled_from(["coding", "payor", "entry", "text", "a,b", "[{"]), children, max_size=6),
    max_leaves=200)


@settings(max_examples=100, deadline=None, derandomize=True)
@given(value=JSON, max_elements=st.integers(1, 300))
def test_the_shortcuts_never_accept_what_the_walk_refuses(value: Any, max_elements: int) -> None:
    raw = orjson.dumps(value)
    count, excess = limits.measure(value, 10**9, {}, 10**9)
    assert count <= (len(raw) + 1) // 2  # the bound hooks.py takes for an order's values
    arrays = {"coding": 3, "payor": 5, "entry": 40}
    if limits.surely_within(raw, max_elements, arrays):
        assert limits.measure(value, max_elements, arrays)[1] is None


# ---------------------------------------------------------------- property: growth is at most linear

def _traced_lines(call: Callable[[], Any]) -> tuple[Any, int]:
    """Run `call`, counting the Python lines it executes in this thread: work, counted deterministically."""
    lines = 0

    def tracer(frame, event, arg):  # noqa: ANN001
        nonlocal lines
        if event == "line":
            lines += 1
        return tracer

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        result = call()
    finally:
        sys.settrace(previous)
    return result, lines


def _coding(i: int) -> dict[str, str]:
    return {"system": "http://example.org/local", "code": f"c{i:04d}", "display": f"local code {i:04d}"}


def _organization(i: int) -> dict[str, Any]:
    return {"resourceType": "Organization", "id": f"org{i:04d}", "name": f"Plan {i:04d}"}


def _the_order(body: dict) -> dict:
    return order(body)


# array name → (the list to grow, the i-th element to add, the most elements the test may add)
GROWABLE: dict[str, tuple[Callable[[dict], list], Callable[[int], Any], int]] = {
    "draftOrders.entry": (lambda b: b["context"]["draftOrders"]["entry"],
                          lambda i: {"resource": {"resourceType": "ServiceRequest", "id": f"sr-x{i:04d}",
                                                  "status": "draft", "intent": "order",
                                                  "code": {"text": f"Sacroplasty {i:04d}"},
                                                  "subject": {"reference": "Patient/pt-sh-1001"}}},
                          limits.MAX_SACROPLASTY_ORDERS - 1),
    "order.code.coding": (lambda b: _the_order(b)["code"]["coding"], _coding, limits.MAX_CODINGS - 1),
    "order.category": (lambda b: _the_order(b)["category"], lambda i: {"coding": [_coding(i)]}, 200),
    "order.reasonCode": (lambda b: _the_order(b)["reasonCode"], lambda i: {"coding": [_coding(i)]},
                         limits.MAX_REASONS - 1),
    "order.reasonCode.coding": (lambda b: _the_order(b)["reasonCode"][0]["coding"], _coding,
                                limits.MAX_CODINGS - 1),
    "order.reasonReference": (lambda b: _the_order(b).setdefault("reasonReference", []),
                              lambda i: {"reference": f"Condition/c{i:04d}"}, limits.MAX_REASONS),
    "order.extension": (lambda b: _the_order(b).setdefault("extension", []),
                        lambda i: dict(EXTENSION, valueString=f"v{i:04d}"), 200),
    "order.identifier": (lambda b: _the_order(b).setdefault("identifier", []),
                         lambda i: {"system": "urn:oid:1.2.3", "value": f"id{i:04d}"}, 200),
    "order.note": (lambda b: _the_order(b).setdefault("note", []), lambda i: {"text": f"note {i:04d}"}, 200),
    "order.contained": (lambda b: _the_order(b).setdefault("contained", []), _organization, limits.MAX_CONTAINED),
    "order.bodySite": (lambda b: _the_order(b).setdefault("bodySite", []), lambda i: {"coding": [_coding(i)]}, 200),
    "order.insurance": (lambda b: _the_order(b).setdefault("insurance", []),
                        lambda i: {"reference": f"Coverage/c{i:04d}"}, 100),
    "coverage.entry": (lambda b: b["prefetch"]["coverage"]["entry"],
                       lambda i: {"resource": {"resourceType": "Coverage", "id": f"cov{i:04d}", "status": "active",
                                               "beneficiary": {"reference": "Patient/pt-sh-1001"},
                                               "payor": [{"display": f"Plan {i:04d}"}]}},
                       limits.MAX_BUNDLE_ENTRIES - 1),
    "coverage.payor": (lambda b: coverage(b)["payor"], lambda i: {"reference": f"#org{i:04d}"}, limits.MAX_PAYORS - 1),
    "coverage.contained": (lambda b: coverage(b).setdefault("contained", []), _organization, limits.MAX_CONTAINED),
    "coverage.identifier": (lambda b: coverage(b).setdefault("identifier", []),
                            lambda i: {"system": "urn:oid:1.2.3", "value": f"m{i:04d}"}, 200),
    "coverage.class": (lambda b: coverage(b)["class"],
                       lambda i: {"type": {"coding": [_coding(i)]}, "value": f"v{i:04d}"}, 200),
    "conditions.entry": (lambda b: b["prefetch"]["conditions"]["entry"],
                         lambda i: {"resource": {"resourceType": "Condition", "id": f"cond{i:04d}",
                                                 "clinicalStatus": {"coding": [{"code": "active"}]},
                                                 "code": {"coding": [_coding(i)]},
                                                 "subject": {"reference": "Patient/pt-sh-1001"}}},
                         limits.MAX_BUNDLE_ENTRIES - 1),
}


def _grown(array: str, added: int, hook: str) -> dict[str, Any]:
    body = member(hook)
    target, make, _ = GROWABLE[array]
    target(body).extend(make(i) for i in range(added))
    return body


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(array=st.sampled_from(sorted(GROWABLE)), share=st.sampled_from([4, 8]),
       hook=st.sampled_from(["order-select", "order-sign"]))
def test_answer_and_work_grow_at_most_linearly(client, monkeypatch, array: str, share: int, hook: str) -> None:
    """Adding n, 2n and 4n elements to one array (4n up to its cap): the answer's bytes and the Python lines run
    grow by at most twice as much from 2n to 4n as from n to 2n (so not faster than linearly; lines are counted
    exactly, and the same call always runs the same lines), and the answer grows by a small multiple of what was
    added."""
    monkeypatch.setattr(limits, "SHORTCUTS", False)  # the exact walk every time: the worst case, no jump
    step = max(1, GROWABLE[array][2] // share)  # the most the caps allow (4 steps), or half of it: the
    # bigger the step, the plainer any super-linear growth
    sizes, work, sent = [], [], []
    for added in (step, 2 * step, 4 * step):
        body = _grown(array, added, hook)
        post(client, body)  # warm: first calls fill caches (compiled models, lru caches) once per process
        response, lines = _traced_lines(lambda body=body: post(client, body))
        assert response.status_code == 200, (array, added, response.get_data(as_text=True)[:300])
        sizes.append(len(response.data))
        work.append(lines)
        sent.append(len(client.application.json.dumps(body)))
    assert sizes[2] - sizes[1] <= 2 * (sizes[1] - sizes[0]) + 64, (array, sizes)
    assert work[2] - work[1] <= 2.2 * (work[1] - work[0]) + 200, (array, work)
    # What was added comes back at most 12 times (the CRD update, 8 created orders, the card); and a new
    # sacroplasty order at most one more answer like the plain one (a card of its own, ~13 KB whatever its size:
    # MAX_SACROPLASTY_ORDERS bounds how many).
    cards_added = 3 * step * len(post(client, member(hook)).data) if array == "draftOrders.entry" else 0
    assert sizes[2] - sizes[0] <= 12 * (sent[2] - sent[0]) + cards_added + 64, (array, sizes, sent)


@settings(max_examples=20, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(array=st.sampled_from(sorted(GROWABLE)), times=st.integers(1, 4))
def test_beyond_the_caps_the_answer_stays_small(client, array: str, times: int) -> None:
    """Whatever an array holds, up to three times its cap: 413, or an answer no bigger than a normal one's plus
    what was sent (the CRD update returns the order) plus a constant: what suggested orders copy is capped."""
    _, _, most = GROWABLE[array]
    body = _grown(array, times * most + 2, "order-select")
    plain = len(post(client, member()).data)
    response = post(client, body)
    assert response.status_code in (200, 413)
    sent = len(client.application.json.dumps(body)) - len(client.application.json.dumps(member()))
    assert len(response.data) <= plain + 2 * sent + 10 * limits.MAX_COPIED_BYTES, (array, len(response.data))


def _payors_and_contained(count: int) -> dict[str, Any]:
    body = member()
    payors = coverage(body)["payor"]
    coverage(body)["payor"] = [{"reference": f"#org{i:04d}"} for i in range(count)] + payors
    coverage(body)["contained"] = [_organization(i) for i in range(count)]
    return body


def test_payors_and_contained_growing_together_cost_linear_work(client, monkeypatch) -> None:
    monkeypatch.setattr(limits, "SHORTCUTS", False)
    step = min(limits.MAX_PAYORS, limits.MAX_CONTAINED) // 4
    work = []
    for count in (step, 2 * step, 4 * step):
        body = _payors_and_contained(count)
        post(client, body)
        response, lines = _traced_lines(lambda body=body: post(client, body))
        assert response.status_code == 200
        work.append(lines)
    assert work[2] - work[1] <= 2.2 * (work[1] - work[0]) + 200, work
