"""What the decision knows about the patient: prefetch first, then (issue #4) the EHR's FHIR server."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .hooks import HookRequest

# CDS Hooks prefetch templates declared in discovery; the keys are the names used everywhere below.
PREFETCH_TEMPLATES: dict[str, str] = {
    "patient": "Patient/{{context.patientId}}",
    "coverage": "Coverage?patient={{context.patientId}}&status=active",
    "conditions": "Condition?patient={{context.patientId}}&clinical-status=active",
}


@dataclass(frozen=True)
class PatientContext:
    """None means unknown (not sent, not fetched); an empty list means known to be none."""

    patient: dict[str, Any] | None = None
    coverages: list[dict[str, Any]] | None = None
    conditions: list[dict[str, Any]] | None = None
    unavailable: frozenset[str] = field(default_factory=frozenset)  # keys whose fetch failed


def _resources(value: Any, resource_type: str) -> list[dict[str, Any]]:
    """Resources of one type from a prefetched Bundle, or a lone resource."""
    if not isinstance(value, dict):
        return []
    if value.get("resourceType") == resource_type:
        return [value]
    entries = value.get("entry") if value.get("resourceType") == "Bundle" else None
    return [
        e["resource"] for e in entries or [] if isinstance(e, dict) and isinstance(e.get("resource"), dict)
        and e["resource"].get("resourceType") == resource_type
    ]


def from_prefetch(hook_request: HookRequest) -> PatientContext:
    """Read the prefetch keys the client sent. A key sent as null means the client has no such data."""
    prefetch = hook_request.prefetch or {}
    patient = prefetch.get("patient")
    return PatientContext(
        patient=patient if isinstance(patient, dict) and patient.get("resourceType") == "Patient" else None,
        coverages=_resources(prefetch["coverage"], "Coverage") if "coverage" in prefetch else None,
        conditions=_resources(prefetch["conditions"], "Condition") if "conditions" in prefetch else None,
    )


def gather(hook_request: HookRequest) -> PatientContext:
    """The patient context for one hook call."""
    return from_prefetch(hook_request)
