"""POST /cds-services/{id}/feedback (issue #6 fills this in)."""

from __future__ import annotations

from typing import Any

from .errors import ApiError


def receive(engine: Any, service: Any, body: Any) -> dict[str, Any]:
    raise ApiError(501, "not_implemented", "feedback is not stored yet")
