"""The fast paths of issue 7 give the same answers as the slow ones they replaced."""

from __future__ import annotations

import json
from typing import Any

from conftest import load_fixture
from fhir.resources.R4B.servicerequest import ServiceRequest
from hypothesis import given, settings
from hypothesis import strategies as st

from cds_service.web.api import _too_deep

SELECT = "/cds-services/sacroplasty-order-select"


def depth(value: Any) -> int:
    """Reference: how many containers deep a parsed JSON value goes ([] is 1, [[1]] is 2)."""
    if isinstance(value, dict):
        return 1 + max((depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((depth(v) for v in value), default=0)
    return 0


tricky_text = st.text(alphabet='[]{}"\\/ab\n\u00e9\u20ac', max_size=8)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | tricky_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(tricky_text, inner, max_size=3),
    max_leaves=40,
)


@settings(max_examples=500)
@given(value=json_values, limit=st.integers(min_value=1, max_value=12), indent=st.sampled_from([None, 1]),
       ascii_only=st.booleans())
def test_depth_check_on_raw_text_agrees_with_the_parsed_value(value: Any, limit: int, indent: int | None,
                                                             ascii_only: bool) -> None:
    raw = json.dumps(value, indent=indent, ensure_ascii=ascii_only).encode("utf-8")
    assert _too_deep(raw, limit) == (depth(value) > limit)


def test_brackets_and_escapes_inside_strings_are_not_nesting(client) -> None:
    body = load_fixture("bench-order-select-5-orders-no-sacroplasty.json")
    body["context"]["note"] = "[" * 300 + '\\"{{' * 50 + "\\\\"
    assert client.post(SELECT, json=body).status_code == 200


def test_depth_limit_is_exact(client, settings) -> None:
    body = load_fixture("bench-order-select-5-orders-no-sacroplasty.json")
    room = settings.max_json_depth - 2  # the body and its context are two levels
    body["context"]["deep"] = json.loads("[" * room + "]" * room)
    assert client.post(SELECT, json=body).status_code == 200
    body["context"]["deep"] = json.loads("[" * (room + 1) + "]" * (room + 1))
    assert client.post(SELECT, json=body).status_code == 400


def test_invalid_draft_order_still_gets_valid_replacements_and_no_coverage_update(client) -> None:
    """An order that is not valid FHIR R4 takes the slow path: validated pieces, no systemAction."""
    body = load_fixture("order-select-sacroplasty-cpt.json")
    order = body["context"]["draftOrders"]["entry"][0]["resource"]
    order["authoredOn"] = "last tuesday"  # not a FHIR dateTime
    answer = client.post(SELECT, json=body).get_json()
    assert len(answer["cards"]) == 1
    created = [a["resource"] for s in answer["cards"][0]["suggestions"] for a in s["actions"]
               if a["type"] == "create"]
    assert created
    for resource in created:
        ServiceRequest.model_validate(resource)
        assert resource.get("authoredOn") != "last tuesday"
    assert not answer.get("systemActions")


def test_valid_draft_order_carries_its_elements_into_valid_replacements(client) -> None:
    body = load_fixture("order-select-sacroplasty-cpt.json")
    order = body["context"]["draftOrders"]["entry"][0]["resource"]
    answer = client.post(SELECT, json=body).get_json()
    created = [a["resource"] for s in answer["cards"][0]["suggestions"] for a in s["actions"]
               if a["type"] == "create"]
    for resource in created:
        ServiceRequest.model_validate(resource)
        assert resource["authoredOn"] == order["authoredOn"]
        assert resource.get("reasonCode", []) in ([], order["reasonCode"])  # copied only where it fits
    (update,) = answer["systemActions"]
    ServiceRequest.model_validate(update["resource"])
