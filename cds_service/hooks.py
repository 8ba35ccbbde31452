"""Hook request (parsed JSON) → validated context, per CDS Hooks 2.0 and the order-select / order-sign hooks.

Unknown fields are ignored, as the spec allows. Imperfect FHIR inside draftOrders is tolerated: orders that
cannot be read are skipped, never a reason for an error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import ApiError, bad_request

JUDGED_STATUSES = {"draft", "active"}


@dataclass(frozen=True)
class HookRequest:
    hook: str
    hook_instance: str
    user_id: str
    patient_id: str
    encounter_id: str | None
    draft_orders: tuple[dict[str, Any], ...]  # every resource in context.draftOrders
    orders: tuple[dict[str, Any], ...]  # the ServiceRequests to judge
    fhir_server: str | None = None
    fhir_authorization: dict[str, Any] | None = None
    prefetch: dict[str, Any] | None = None
    extension: dict[str, Any] = field(default_factory=dict)


def _string(container: dict[str, Any], key: str, where: str, required: bool = True) -> str | None:
    value = container.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        raise bad_request(f"{where}{key} must be a non-empty string", f"{where}{key}")
    return value


def _reference(resource: dict[str, Any]) -> str | None:
    rtype, rid = resource.get("resourceType"), resource.get("id")
    if isinstance(rtype, str) and isinstance(rid, str):
        return f"{rtype}/{rid}"
    return None


def _judged(resource: dict[str, Any]) -> bool:
    status = resource.get("status", "draft")  # a draft order without status is still a draft
    return resource.get("resourceType") == "ServiceRequest" and isinstance(status, str) and status in JUDGED_STATUSES


def parse_hook_request(body: Any, hook: str, max_draft_orders: int) -> HookRequest:
    """Validate a request body for a service of `hook`; raise ApiError (400/413) naming the problem."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    sent_hook = _string(body, "hook", "")
    if sent_hook != hook:
        raise bad_request(f"this service answers the {hook} hook, not {sent_hook}", "hook")
    hook_instance = _string(body, "hookInstance", "")
    if len(hook_instance) > 200 or not hook_instance.isprintable():
        # It names this call in our logs and records: one printable line, as a UUID is.
        raise bad_request("hookInstance must be a UUID or another short printable identifier", "hookInstance")
    context = body.get("context")
    if not isinstance(context, dict):
        raise bad_request("context must be a JSON object", "context")
    user_id = _string(context, "userId", "context.")
    patient_id = _string(context, "patientId", "context.")
    encounter_id = context.get("encounterId") if isinstance(context.get("encounterId"), str) else None

    bundle = context.get("draftOrders")
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise bad_request("context.draftOrders must be a FHIR Bundle", "context.draftOrders")
    entries = bundle.get("entry", [])
    if not isinstance(entries, list):
        raise bad_request("context.draftOrders.entry must be a list", "context.draftOrders.entry")
    if len(entries) > max_draft_orders:
        raise ApiError(413, "too_many_orders",
                       f"context.draftOrders has {len(entries)} entries; at most {max_draft_orders} are accepted",
                       "context.draftOrders.entry")
    resources = tuple(
        e["resource"] for e in entries if isinstance(e, dict) and isinstance(e.get("resource"), dict)
    )

    if hook == "order-select":
        selections = context.get("selections")
        if not isinstance(selections, list) or not selections or not all(isinstance(s, str) for s in selections):
            raise bad_request("context.selections must be a non-empty list of references", "context.selections")
        by_reference = {_reference(r): r for r in resources}
        unknown = [s for s in selections if s not in by_reference]
        if unknown:
            raise bad_request(
                f"context.selections names {len(unknown)} order(s) not in context.draftOrders", "context.selections"
            )
        chosen = [by_reference[s] for s in dict.fromkeys(selections)]
    else:
        chosen = list(resources)

    fhir_server = body.get("fhirServer") if isinstance(body.get("fhirServer"), str) else None
    fhir_authorization = body.get("fhirAuthorization") if isinstance(body.get("fhirAuthorization"), dict) else None
    prefetch = body.get("prefetch") if isinstance(body.get("prefetch"), dict) else None
    extension = body.get("extension") if isinstance(body.get("extension"), dict) else {}
    return HookRequest(
        hook=hook,
        hook_instance=hook_instance,
        user_id=user_id,
        patient_id=patient_id,
        encounter_id=encounter_id,
        draft_orders=resources,
        orders=tuple(r for r in chosen if _judged(r)),
        fhir_server=fhir_server,
        fhir_authorization=fhir_authorization,
        prefetch=prefetch,
        extension=extension,
    )
