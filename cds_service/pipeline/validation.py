"""Is a ServiceRequest, as JSON, valid FHIR R4? One wrapper of fhir.resources, one set of exceptions."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from fhir.resources.R4B.appointment import Appointment
from fhir.resources.R4B.servicerequest import ServiceRequest
from fhir_core.types import DateTime as FhirDateTime

# pydantic's ValidationError is a ValueError; fhir.resources raises KeyError for a contained resource of unknown
# type and TypeError for some wrongly shaped elements.
INVALID = (ValueError, KeyError, TypeError)


def order_errors(resource: dict[str, Any]) -> int:
    """0 when `resource` is a valid FHIR R4 ServiceRequest (or Appointment, for appointment-book), else how many
    problems were found (at least 1).

    Only the count is given: the messages can quote patient data, which must not reach a log."""
    try:
        if resource.get("resourceType") == "Appointment":
            Appointment.model_validate(resource)
        else:
            ServiceRequest.model_validate(resource)
    except INVALID as exc:
        count = getattr(exc, "error_count", None)  # pydantic's ValidationError counts its errors
        return max(int(count()), 1) if callable(count) else 1
    return 0


# --- a cheaper check, for the orders the service builds itself -----------------------------------------------

# What a replacement order (cards.CardBuilder.replacement_base) can hold.
_BASE_KEYS = frozenset({"resourceType", "status", "intent", "subject", "encounter", "requester", "authoredOn",
                        "priority", "insurance", "note", "code"})
_REFERENCE_KEYS = frozenset({"reference", "display"})
_TEXT = re.compile(r"[ \r\n\t\S]+")  # fhir_core's FHIR string pattern, read here as a whole-string match
# A dateTime to the second with a zone (what EHRs send in authoredOn); other forms go to the full model.
_DATE_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-5][0-9](\.[0-9]{1,6})?"
                        r"(Z|[+-][0-9]{2}:[0-9]{2})")


def _plain(value: Any) -> bool:
    """A FHIR string of printable ASCII with some non-space: valid whatever else the model checks of it."""
    return isinstance(value, str) and 0 < len(value) <= 10_000 and value.isascii() and value.isprintable() \
        and not value.isspace()


def _code(value: Any) -> bool:
    """A FHIR code: printable ASCII, no space at either end nor two in a row."""
    return _plain(value) and value == value.strip() and "  " not in value


def _reference(value: Any) -> bool:
    return isinstance(value, dict) and bool(value) and value.keys() <= _REFERENCE_KEYS \
        and "reference" in value and all(_plain(v) for v in value.values())


def _date_time(value: Any) -> bool:
    """A full FHIR dateTime with seconds and a zone, that is a real instant (no 24:00, no leap second)."""
    if not isinstance(value, str) or not _DATE_TIME.fullmatch(value) or not FhirDateTime.pattern.fullmatch(value):
        return False
    try:
        datetime.fromisoformat(value[:-1] + "+00:00" if value.endswith("Z") else value)
    except ValueError:
        return False
    return True


def _note(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict) \
        and value[0].keys() == {"text"} and isinstance(value[0]["text"], str) \
        and bool(_TEXT.fullmatch(value[0]["text"])) and not any(ch < " " and ch not in "\r\n\t"
                                                                for ch in value[0]["text"])


def surely_valid_replacement(resource: dict[str, Any]) -> bool:
    """True only when `resource` is a ServiceRequest of the few elements a replacement order has, each of a
    form valid FHIR R4 by construction; False means "ask `order_errors`", not "invalid".

    Why: a card validates the base of its replacement orders when the draft order was not validated whole
    (no CRD update), and the full fhir.resources model costs ~0.13 ms there, for elements that are almost
    always plain references, a date and two codes. tests/test_hotpath_golden.py checks that the model accepts
    whatever this accepts, on fixtures and generated orders."""
    if resource.keys() - _BASE_KEYS or resource.get("resourceType") != "ServiceRequest":
        return False
    if not (_code(resource.get("status")) and _code(resource.get("intent")) and _reference(resource.get("subject"))):
        return False
    for key in ("encounter", "requester"):
        if key in resource and not _reference(resource[key]):
            return False
    if "priority" in resource and not _code(resource["priority"]):
        return False
    if "authoredOn" in resource and not _date_time(resource["authoredOn"]):
        return False
    insurance = resource.get("insurance", [{"reference": "-"}])
    if not (isinstance(insurance, list) and insurance and all(_reference(i) for i in insurance)):
        return False
    code = resource.get("code")
    return isinstance(code, dict) and code.keys() == {"text"} and _plain(code["text"]) \
        and ("note" not in resource or _note(resource["note"]))
