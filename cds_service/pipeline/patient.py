"""What the decision knows about the patient: the client's prefetch first, then the EHR's FHIR server.

CDS Hooks 2.0 prefetch semantics, key by key:
- key present with data → used as is (a searchset Bundle, or a lone resource);
- key present with null → the client has no such data: known to be none, never re-fetched;
- key present with an OperationOutcome (or a Bundle carrying an error-level one) → the client could not get
  it: unavailable, not re-fetched (the spec's reason for sending OperationOutcomes);
- key absent, or present with something that is not FHIR of the expected type → fetched from `fhirServer`
  when the operator allows that origin (see fhir.py); otherwise unknown (or unavailable, if the client sent
  garbage).
Whatever its source, a key's data beyond a cap of the cost model (limits.py: entries, values, payors,
contained resources, codings, text length) is treated as unavailable, as an error from the client would be:
a part of the list could hide the very Coverage or Condition that decides, so none of it is used.
The service never answers 412: nothing here is *required* — the card is right without patient data, and
says what it could not check.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import quote

import orjson

from cds_service.pipeline import limits
from cds_service.pipeline.fhirjson import bundle_entries, entry_resources, resource_entries
from cds_service.pipeline.hooks import HookRequest

log = logging.getLogger(__name__)

# CDS Hooks prefetch templates declared in discovery; the keys are the names used everywhere below.
# clinical-status: recurrence and relapse are active too (HL7 condition-clinical), so all three are asked for.
PREFETCH_TEMPLATES: dict[str, str] = {
    "patient": "Patient/{{context.patientId}}",
    "coverage": "Coverage?patient={{context.patientId}}&status=active",
    "conditions": "Condition?patient={{context.patientId}}&clinical-status=active,recurrence,relapse",
}
# Keys the decision reads, so the only ones worth a call to the FHIR server (the Patient is not needed).
FETCHED_KEYS = ("coverage", "conditions")
FETCH_PAGE_SIZE = 100  # `_count` added to searches the service runs itself, to stay within few pages
RESOURCE_TYPES = {"patient": "Patient", "coverage": "Coverage", "conditions": "Condition"}
FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")


@dataclass(frozen=True)
class PatientContext:
    """None means unknown (not sent, not fetched); an empty list means known to be none."""

    patient: dict[str, Any] | None = None
    coverages: list[dict[str, Any]] | None = None
    conditions: list[dict[str, Any]] | None = None
    unavailable: frozenset[str] = field(default_factory=frozenset)  # keys that could not be had
    # Organizations that came with the coverage data (search includes), by "Organization/id" and fullUrl.
    organizations: dict[str, dict[str, Any]] = field(default_factory=dict)
    # What the decision derives from this context more than once in a call (eligibility._condition_findings).
    # Not an __init__ argument: dataclasses.replace() makes a context with an empty one of its own.
    memo: dict[Any, Any] = field(default_factory=dict, init=False, compare=False, repr=False)


def _resources(value: Any, resource_type: str) -> list[dict[str, Any]]:
    """Resources of one type from a Bundle, or a lone resource."""
    if not isinstance(value, dict):
        return []
    if value.get("resourceType") == resource_type:
        return [value]
    return entry_resources(bundle_entries(value) or [], resource_type)


def _organizations(value: Any) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for entry, resource in resource_entries(bundle_entries(value) or [], "Organization"):
        if isinstance(resource.get("id"), str):
            found[f"Organization/{resource['id']}"] = resource
        if isinstance(entry.get("fullUrl"), str):
            found[entry["fullUrl"]] = resource
    return found


def _has_error(value: dict[str, Any]) -> bool:
    """An OperationOutcome in place of the data, or an error-level one inside the Bundle."""
    kind = value.get("resourceType")
    if kind == "OperationOutcome":
        return True
    if kind != "Bundle":
        return False
    for outcome in _resources(value, "OperationOutcome"):
        issues = outcome.get("issue")
        if any(isinstance(i, dict) and i.get("severity") in ("error", "fatal")
               for i in (issues if isinstance(issues, list) else [])):
            return True
    return False


def _prefetch_state(key: str, value: Any) -> str:
    """'ok' (data or null), 'error' (client reported it could not get it) or 'invalid'."""
    if value is None:
        return "ok"
    if not isinstance(value, dict):
        return "invalid"
    if _has_error(value):
        return "error"
    kind = value.get("resourceType")
    if kind == RESOURCE_TYPES[key] or (kind == "Bundle" and key != "patient"):
        return "ok"
    return "invalid"


def _over_cap(key: str, value: Any, hook: str, source: str) -> bool:
    """Does this key's data go beyond the cost model? Logged with the cap and sizes only, never content."""
    if not isinstance(value, (dict, list)):
        return False
    try:
        if limits.surely_within(orjson.dumps(value), limits.MAX_PREFETCH_ELEMENTS, limits.PREFETCH_ARRAYS):
            return False
    except TypeError:  # an integer beyond 64 bits (not from orjson.loads): measured below
        pass
    _, excess = limits.measure(value, limits.MAX_PREFETCH_ELEMENTS, limits.PREFETCH_ARRAYS)
    if excess is None:
        return False
    # The array's name only when it is one of the capped ones: other keys are the client's and could be anything.
    where = f" ({excess.path[-1]})" if excess.what == "items" else ""
    log.warning("hookInstance=%s: %s %s goes beyond the cap on %s%s (%d > %d); treated as unavailable",
                hook, source, key, excess.what, where, excess.size, excess.limit)
    return True


def fallback_query(key: str, patient_id: str) -> str:
    """The prefetch template of `key` for this patient, as the service runs it against fhirServer."""
    query = PREFETCH_TEMPLATES[key].replace("{{context.patientId}}", quote(patient_id, safe=""))
    return f"{query}&_count={FETCH_PAGE_SIZE}" if "?" in query else query


class FhirFetcher(Protocol):
    """Reads what prefetch lacks from the client's FHIR server (cds_service/fhir.py): the pipeline itself
    never opens a connection."""

    def fetch(self, fhir_server: str, fhir_authorization: dict[str, Any] | None, queries: dict[str, str],
              hook_instance: str) -> Any: ...


def gather(hook_request: HookRequest, fhir: FhirFetcher | None = None) -> PatientContext:
    """The patient context for one hook call: prefetch, then fhirServer for what is missing (see module doc)."""
    prefetch = hook_request.prefetch or {}
    hook = repr(hook_request.hook_instance[:80])
    values: dict[str, Any] = {}
    unavailable: set[str] = set()
    invalid: set[str] = set()
    for key in PREFETCH_TEMPLATES:
        if key not in prefetch:
            continue
        state = _prefetch_state(key, prefetch[key])
        if state == "ok" and _over_cap(key, prefetch[key], hook, "prefetch"):
            unavailable.add(key)
        elif state == "ok":
            values[key] = prefetch[key]
        elif state == "error":
            unavailable.add(key)
            log.warning("hookInstance=%s: the client reported an error for prefetch %s; deciding without it",
                        hook, key)
        else:
            invalid.add(key)
            log.warning("hookInstance=%s: prefetch %s is not FHIR %s data; treated as not sent",
                        hook, key, RESOURCE_TYPES[key])
    missing = [k for k in FETCHED_KEYS if k not in values and k not in unavailable]
    if missing and fhir is not None and hook_request.fhir_server:
        if FHIR_ID.fullmatch(hook_request.patient_id):
            queries = {k: fallback_query(k, hook_request.patient_id) for k in missing}
            outcome = fhir.fetch(hook_request.fhir_server, hook_request.fhir_authorization, queries,
                                 hook_request.hook_instance)
            for key, value in outcome.values.items():
                if _over_cap(key, value, hook, "fetched"):
                    unavailable.add(key)
                else:
                    values[key] = value
            unavailable |= outcome.failed
        else:
            log.warning("hookInstance=%s: context.patientId is not a FHIR id; nothing fetched", hook)
            unavailable |= set(missing)
    unavailable |= {k for k in invalid if k not in values}
    return _context(values, frozenset(unavailable))


def _context(values: dict[str, Any], unavailable: frozenset[str]) -> PatientContext:
    patient = values.get("patient")
    return PatientContext(
        patient=patient if isinstance(patient, dict) and patient.get("resourceType") == "Patient" else None,
        coverages=_resources(values["coverage"], "Coverage") if "coverage" in values else None,
        conditions=_resources(values["conditions"], "Condition") if "conditions" in values else None,
        unavailable=unavailable,
        organizations=_organizations(values.get("coverage")),
    )


# The Da Vinci CRD guide's standard prefetch templates (CRDServices.json), text-equal, for the keys the decision
# uses. A CRD client that fills only standard templates fills these; `conditions` is ours (not standard): read
# when sent, else fetched from fhirServer once a sacroplasty is found.
STANDARD_PATIENT = "Patient/{{context.patientId}}"
STANDARD_COVERAGE = "Coverage?patient={{context.patientId}}&status=active"
STANDARD_DISPATCHED_SERVICE_REQUESTS = (
    "ServiceRequest?_id={{context.dispatchedOrders.ServiceRequest.id}}&_include=ServiceRequest:performer"
    "&_include=ServiceRequest:requester&_include:iterate=PractitionerRole:organization"
    "&_include:iterate=PractitionerRole:practitioner")
HOOK_PREFETCH: dict[str, dict[str, str]] = {
    "order-dispatch": {"patient": STANDARD_PATIENT, "coverage": STANDARD_COVERAGE,
                       "servicerequest": STANDARD_DISPATCHED_SERVICE_REQUESTS},
    "appointment-book": {"patient": STANDARD_PATIENT, "coverage": STANDARD_COVERAGE},
}
# Prefetch keys that may carry the ServiceRequests of order-dispatch / appointment-book: the guide's, and ours.
SERVICE_REQUEST_KEYS = ("servicerequest", "serviceRequests")


def prefetch_templates(hook: str) -> dict[str, str]:
    """The prefetch templates a service of `hook` declares in discovery."""
    return dict(HOOK_PREFETCH.get(hook, PREFETCH_TEMPLATES))


def _within_order_cap(resource: dict[str, Any]) -> bool:
    return limits.measure(resource, limits.MAX_ORDER_ELEMENTS, {})[1] is None


def service_requests(hook_request: HookRequest, references: list[str],
                     fhir: FhirFetcher | None = None) -> dict[str, dict[str, Any]]:
    """The ServiceRequests named by `references` ("ServiceRequest/id"), by reference: from the prefetch first
    (the guide's `servicerequest` key, or `serviceRequests`), else one search on fhirServer (its allow-list,
    token and time budget apply: fhir.py). One beyond the order cap of limits.py is left out, as is one that
    cannot be had: an order the service cannot read is not judged."""
    wanted = {r.split("/", 1)[1] for r in references if r.startswith("ServiceRequest/")}
    found: dict[str, dict[str, Any]] = {}
    hook = repr(hook_request.hook_instance[:80])

    def take(value: Any) -> None:
        for resource in _resources(value, "ServiceRequest"):
            rid = resource.get("id")
            if isinstance(rid, str) and rid in wanted and _within_order_cap(resource):
                found.setdefault(f"ServiceRequest/{rid}", resource)

    prefetch = hook_request.prefetch or {}
    for key in SERVICE_REQUEST_KEYS:
        value = prefetch.get(key)
        if isinstance(value, dict) and not _has_error(value) and not _over_cap(key, value, hook, "prefetch"):
            take(value)
    missing = sorted(rid for rid in wanted if f"ServiceRequest/{rid}" not in found)
    if missing and fhir is not None and hook_request.fhir_server:
        ids = ",".join(quote(rid, safe="") for rid in missing if FHIR_ID.fullmatch(rid))
        if ids:
            outcome = fhir.fetch(hook_request.fhir_server, hook_request.fhir_authorization,
                                 {"servicerequest": f"ServiceRequest?_id={ids}&_count={FETCH_PAGE_SIZE}"},
                                 hook_request.hook_instance)
            value = outcome.values.get("servicerequest")
            if isinstance(value, dict) and not _over_cap("servicerequest", value, hook, "fetched"):
                take(value)
    return found
