"""Reading FHIR JSON as sent: a Bundle's entries and the resources they carry, tolerant of malformed parts.

One place for what hook requests (draftOrders), prefetch and fetched search results all do. Callers that must
refuse a malformed Bundle (a hook request, a FHIR server's answer) do so when `bundle_entries` gives None.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def bundle_entries(value: Any) -> list[Any] | None:
    """`entry` of a FHIR Bundle as sent ([] when it has none); None when `value` is not a Bundle or its
    `entry` is not a list."""
    if not isinstance(value, dict) or value.get("resourceType") != "Bundle":
        return None
    entries = value.get("entry", [])
    return entries if isinstance(entries, list) else None


def resource_entries(entries: Iterable[Any],
                     resource_type: str | None = None) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(entry, resource) for each entry that is an object carrying a resource object (of `resource_type`,
    when given), in order."""
    return [
        (e, e["resource"]) for e in entries if isinstance(e, dict) and isinstance(e.get("resource"), dict)
        and (resource_type is None or e["resource"].get("resourceType") == resource_type)
    ]


def entry_resources(entries: Iterable[Any], resource_type: str | None = None) -> list[dict[str, Any]]:
    """The resources the entries carry (of `resource_type`, when given); other entries are skipped."""
    return [resource for _, resource in resource_entries(entries, resource_type)]
