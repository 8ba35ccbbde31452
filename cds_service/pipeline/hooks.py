"""Hook request (parsed JSON) → validated context, per CDS Hooks 2.0 and the order-select / order-sign hooks.

Unknown fields are ignored, as the spec allows. Imperfect FHIR inside draftOrders is tolerated: orders that
cannot be read are skipped, never a reason for an error. What is refused is size beyond the cost model of
limits.py (413 naming the field): every later step is then bounded, whatever the orders hold.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import orjson

from cds_service.errors import ApiError, bad_request, too_large
from cds_service.pipeline import limits
from cds_service.pipeline.fhirjson import bundle_entries, entry_resources

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
    # order-dispatch: the references of context.dispatchedOrders (the orders themselves come from prefetch or
    # fhirServer, see patient.resolve_orders); appointment-book: the proposed Appointments.
    order_references: tuple[str, ...] = ()
    appointments: tuple[dict[str, Any], ...] = ()
    performer: str | None = None


def _string(container: dict[str, Any], key: str, where: str) -> str:
    """A required, non-empty string field; 400 naming it otherwise."""
    value = container.get(key)
    if not isinstance(value, str) or not value.strip():
        raise bad_request(f"{where}{key} must be a non-empty string", f"{where}{key}")
    return value


def _identifier(container: dict[str, Any], key: str, where: str) -> str:
    """A context id: a non-empty string of at most MAX_ID_LENGTH characters (it is echoed into created orders)."""
    value = _string(container, key, where)
    if len(value) > limits.MAX_ID_LENGTH:
        raise bad_request(f"{where}{key} is {len(value)} characters long; an id has at most "
                          f"{limits.MAX_ID_LENGTH}", f"{where}{key}")
    return value


def _within_arrays(resource: dict[str, Any], where: str) -> None:
    """The array caps of a draft order (limits.py), on the arrays the service reads or copies into created orders:
    reasonCode, reasonReference, contained, and the codings of code and of each reason."""
    for key in ("reasonCode", "reasonReference", "contained"):
        value = resource.get(key)
        if isinstance(value, list) and len(value) > limits.ORDER_ARRAYS[key]:
            raise too_large("items", f"{where}.{key} has {len(value)} entries; at most "
                            f"{limits.ORDER_ARRAYS[key]} are accepted", f"{where}.{key}")
    concepts = [("code", resource.get("code"))]
    reasons = resource.get("reasonCode")
    if isinstance(reasons, list):
        concepts += [(f"reasonCode[{i}]", concept) for i, concept in enumerate(reasons)]
    for name, concept in concepts:
        codings = concept.get("coding") if isinstance(concept, dict) else None
        if isinstance(codings, list) and len(codings) > limits.MAX_CODINGS:
            raise too_large("items", f"{where}.{name}.coding has {len(codings)} entries; at most "
                            f"{limits.MAX_CODINGS} are accepted", f"{where}.{name}.coding")


def _dumps(value: Any) -> bytes:
    """Compact JSON; through the standard library when orjson cannot (an integer beyond 64 bits, which a body
    parsed by orjson never holds, but one built otherwise could)."""
    try:
        return orjson.dumps(value)
    except TypeError:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str).encode()


def _within_copied(resource: dict[str, Any], where: str) -> None:
    """MAX_COPIED_BYTES on what every created order copies from the draft (limits.COPIED_ELEMENTS)."""
    sizes = {key: len(_dumps(resource[key])) for key in limits.COPIED_ELEMENTS if key in resource}
    if sum(sizes.values()) > limits.MAX_COPIED_BYTES:
        largest = max(sizes, key=sizes.__getitem__)
        raise too_large("text", f"{where}.{largest} and the other elements a suggested order copies "
                        f"({', '.join(sizes)}) take {sum(sizes.values())} bytes as JSON; at most "
                        f"{limits.MAX_COPIED_BYTES} are accepted", f"{where}.{largest}")


def _check_cost(entries: list[Any]) -> None:
    """The cost model of the draft orders (limits.py): 413 naming the first field beyond a cap.

    The common order (tens of values, under a kilobyte) costs one serialization at C speed, several times
    cheaper than a walk in Python: a JSON text of n bytes holds at most (n + 1) / 2 values and no string
    longer than n, and an array of more than k entries needs k commas. Any other order is walked exactly,
    in one pass that stops at the first cap (so refusing costs no more than accepting an order at the cap).
    """
    total = 0
    fast_size = min(2 * limits.MAX_ORDER_ELEMENTS - 1, limits.MAX_STRING_LENGTH)
    smallest_array_cap = min(limits.ORDER_ARRAYS.values())
    # An order within all three shortcuts below at once (nearly every one) is counted and done in one test.
    small = min(fast_size, limits.MAX_COPIED_BYTES) if limits.SHORTCUTS else -1
    for index, entry in enumerate(entries):
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(resource, dict):
            continue
        raw = _dumps(resource)
        if len(raw) <= small and raw.count(b",") < smallest_array_cap:
            total += (len(raw) + 1) // 2
            continue
        if limits.SHORTCUTS and len(raw) <= fast_size:
            count = (len(raw) + 1) // 2
        else:
            count, excess = limits.measure(resource, limits.MAX_ORDER_ELEMENTS, {})
            if excess is not None:
                field = excess.field(f"context.draftOrders.entry[{index}].resource")
                raise too_large(excess.what, limits.describe(excess, field), field)
        if not limits.SHORTCUTS or len(raw) > limits.MAX_COPIED_BYTES:  # else what it copies is smaller still
            _within_copied(resource, f"context.draftOrders.entry[{index}].resource")
        # else no array can hold more than any array cap
        if not limits.SHORTCUTS or raw.count(b",") >= smallest_array_cap:
            _within_arrays(resource, f"context.draftOrders.entry[{index}].resource")
        total += count
    if total > limits.MAX_DRAFT_ELEMENTS:  # on bounds, maybe: count exactly before refusing
        total = sum(limits.measure(e["resource"], limits.MAX_DRAFT_ELEMENTS + 1, {})[0] for e in entries
                    if isinstance(e, dict) and isinstance(e.get("resource"), dict))
        if total > limits.MAX_DRAFT_ELEMENTS:
            raise too_large("elements", f"context.draftOrders has more than {limits.MAX_DRAFT_ELEMENTS} JSON "
                            f"values in its orders; at most {limits.MAX_DRAFT_ELEMENTS} are accepted",
                            "context.draftOrders")


def _reference(resource: dict[str, Any]) -> str | None:
    rtype, rid = resource.get("resourceType"), resource.get("id")
    if isinstance(rtype, str) and isinstance(rid, str):
        return f"{rtype}/{rid}"
    return None


def judged(resource: dict[str, Any]) -> bool:
    status = resource.get("status", "draft")  # a draft order without status is still a draft
    return resource.get("resourceType") == "ServiceRequest" and isinstance(status, str) and status in JUDGED_STATUSES


DISPATCHED_KEYS = ("dispatchedOrders", "dispatched-orders")  # CDS Hooks spelling, and the one some clients send
REFERENCE = re.compile(r"[A-Za-z]{1,64}/[A-Za-z0-9\-.]{1,64}")


def _dispatched(context: dict[str, Any], max_orders: int) -> tuple[str, ...]:
    """order-dispatch's context.dispatchedOrders: a non-empty list of relative references (Type/id)."""
    key = next((k for k in DISPATCHED_KEYS if k in context), DISPATCHED_KEYS[0])
    value = context.get(key)
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise bad_request(f"context.{key} must be a non-empty list of references", f"context.{key}")
    if len(value) > max_orders:
        raise ApiError(413, "too_many_items", f"context.{key} has {len(value)} entries; at most {max_orders} "
                       "are accepted", f"context.{key}")
    if not all(REFERENCE.fullmatch(v) for v in value):
        raise bad_request(f"context.{key} must hold relative references such as ServiceRequest/123",
                          f"context.{key}")
    return tuple(dict.fromkeys(value))


def _context_bundle(context: dict[str, Any], key: str, max_entries: int, too_many: str) -> list[Any]:
    """The entries of the context Bundle `key` (400 when it is not one; 413 `too_many` beyond max_entries)."""
    bundle = context.get(key)
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise bad_request(f"context.{key} must be a FHIR Bundle", f"context.{key}")
    entries = bundle_entries(bundle)
    if entries is None:
        raise bad_request(f"context.{key}.entry must be a list", f"context.{key}.entry")
    if len(entries) > max_entries:
        raise ApiError(413, too_many, f"context.{key} has {len(entries)} entries; at most {max_entries} are "
                       "accepted", f"context.{key}.entry")
    return entries


def _appointments(context: dict[str, Any], max_orders: int) -> tuple[dict[str, Any], ...]:
    """appointment-book's context.appointments: a Bundle of proposed Appointments, within the cost model."""
    entries = _context_bundle(context, "appointments", max_orders, "too_many_items")
    for index, entry in enumerate(entries):
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if isinstance(resource, dict):
            _, excess = limits.measure(resource, limits.MAX_ORDER_ELEMENTS, {})
            if excess is not None:
                field = excess.field(f"context.appointments.entry[{index}].resource")
                raise too_large(excess.what, limits.describe(excess, field), field)
    return tuple(entry_resources(entries, "Appointment"))


def _common(body: Any, hook: str) -> tuple[str, dict[str, Any]]:
    """What every hook request carries: the hook this service answers, a printable hookInstance, a context."""
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
    return hook_instance, context


def _client_data(body: dict[str, Any]) -> dict[str, Any]:
    """fhirServer, fhirAuthorization, prefetch and extension, each kept only when of the right JSON type."""
    return {
        "fhir_server": body.get("fhirServer") if isinstance(body.get("fhirServer"), str) else None,
        "fhir_authorization": body.get("fhirAuthorization") if isinstance(body.get("fhirAuthorization"), dict)
        else None,
        "prefetch": body.get("prefetch") if isinstance(body.get("prefetch"), dict) else None,
        "extension": body.get("extension") if isinstance(body.get("extension"), dict) else {},
    }


def _optional_id(context: dict[str, Any], key: str) -> str | None:
    return _identifier(context, key, "context.") if isinstance(context.get(key), str) else None


def _parse_scheduling(body: dict[str, Any], hook: str, max_orders: int) -> HookRequest:
    """order-dispatch and appointment-book: no draft orders; what is judged is resolved later (evaluate.py)."""
    hook_instance, context = _common(body, hook)
    patient_id = _identifier(context, "patientId", "context.")
    references: tuple[str, ...] = ()
    appointments: tuple[dict[str, Any], ...] = ()
    performer = None
    if hook == "order-dispatch":
        references = _dispatched(context, max_orders)
        performer = context.get("performer") if isinstance(context.get("performer"), str) else None
        user_id = performer or ""
    else:
        user_id = _identifier(context, "userId", "context.")
        appointments = _appointments(context, max_orders)
    return HookRequest(
        hook=hook, hook_instance=hook_instance, user_id=user_id, patient_id=patient_id,
        encounter_id=_optional_id(context, "encounterId"), draft_orders=(), orders=(),
        order_references=references, appointments=appointments, performer=performer, **_client_data(body),
    )


def parse_hook_request(body: Any, hook: str, max_draft_orders: int) -> HookRequest:
    """Validate a request body for a service of `hook`; raise ApiError (400/413) naming the problem."""
    if hook in ("order-dispatch", "appointment-book"):
        return _parse_scheduling(body, hook, max_draft_orders)
    hook_instance, context = _common(body, hook)
    user_id = _identifier(context, "userId", "context.")
    patient_id = _identifier(context, "patientId", "context.")

    entries = _context_bundle(context, "draftOrders", max_draft_orders, "too_many_orders")
    _check_cost(entries)
    resources = tuple(entry_resources(entries))

    if hook == "order-select":
        selections = context.get("selections")
        if not isinstance(selections, list) or not selections or not all(isinstance(s, str) for s in selections):
            raise bad_request("context.selections must be a non-empty list of references", "context.selections")
        if len(selections) > max_draft_orders:
            raise ApiError(413, "too_many_items", f"context.selections has {len(selections)} entries; at most "
                           f"{max_draft_orders} are accepted", "context.selections")
        by_reference = {_reference(r): r for r in resources}
        unknown = [s for s in selections if s not in by_reference]
        if unknown:
            raise bad_request(
                f"context.selections names {len(unknown)} order(s) not in context.draftOrders", "context.selections"
            )
        chosen = [by_reference[s] for s in dict.fromkeys(selections)]
    else:
        chosen = list(resources)

    return HookRequest(
        hook=hook,
        hook_instance=hook_instance,
        user_id=user_id,
        patient_id=patient_id,
        encounter_id=_optional_id(context, "encounterId"),
        draft_orders=resources,
        orders=tuple(r for r in chosen if judged(r)),
        **_client_data(body),
    )
