"""The folded helpers: Bundle entries (pipeline/fhirjson.py) and order validation (pipeline/validation.py)."""

from __future__ import annotations

from typing import Any

import pytest

from cds_service.pipeline.fhirjson import bundle_entries, entry_resources, resource_entries
from cds_service.pipeline.validation import order_errors

ORDER = {"resourceType": "ServiceRequest", "status": "draft", "intent": "order",
         "subject": {"reference": "Patient/p1"}, "code": {"text": "sacroplasty"}}


@pytest.mark.parametrize("value", [None, [], "Bundle", {"resourceType": "Patient"},
                                   {"resourceType": "Bundle", "entry": {"resource": {}}},
                                   {"resourceType": "Bundle", "entry": None}])
def test_not_a_bundle_or_entry_not_a_list_gives_none(value: Any) -> None:
    assert bundle_entries(value) is None


def test_bundle_entries_as_sent() -> None:
    assert bundle_entries({"resourceType": "Bundle"}) == []
    assert bundle_entries({"resourceType": "Bundle", "entry": [1, {"a": 1}]}) == [1, {"a": 1}]


def test_entry_resources_skip_malformed_entries_and_filter_by_type() -> None:
    org = {"resourceType": "Organization", "id": "o1"}
    cov = {"resourceType": "Coverage", "id": "c1"}
    entries = [None, 3, {"resource": "x"}, {"fullUrl": "urn:uuid:1", "resource": org}, {"resource": cov}]
    assert entry_resources(entries) == [org, cov]
    assert entry_resources(entries, "Coverage") == [cov]
    assert resource_entries(entries, "Organization") == [({"fullUrl": "urn:uuid:1", "resource": org}, org)]


def test_a_valid_order_has_no_errors() -> None:
    assert order_errors(ORDER) == 0


@pytest.mark.parametrize("order", [
    {**ORDER, "status": 7},                                                      # pydantic: ValueError
    {**ORDER, "contained": [{"resourceType": "NoSuchResource", "id": "x"}]},     # fhir.resources: KeyError
    {**ORDER, "intent": None, "status": None},
])
def test_invalid_orders_are_counted_not_raised(order: dict[str, Any]) -> None:
    assert order_errors(order) >= 1
