"""Is a ServiceRequest, as JSON, valid FHIR R4? One wrapper of fhir.resources, one set of exceptions."""

from __future__ import annotations

from typing import Any

from fhir.resources.R4B.appointment import Appointment
from fhir.resources.R4B.servicerequest import ServiceRequest

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
