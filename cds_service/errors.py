"""The one exception type that becomes a JSON error response with a 4xx status."""

from __future__ import annotations


class ApiError(Exception):
    """A client error: status, a short machine code, and a message that names the problem."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers or {}

    def body(self) -> dict[str, object]:
        body: dict[str, object] = {"error": self.code, "message": self.message}
        if self.field:
            body["field"] = self.field
        return body


def bad_request(message: str, field: str | None = None) -> ApiError:
    return ApiError(400, "invalid_request", message, field)


# The `error` code of a 413, by which cap of limits.py was gone beyond.
_TOO_LARGE = {"elements": "too_many_elements", "items": "too_many_items", "text": "text_too_long"}


def too_large(what: str, message: str, field: str | None = None) -> ApiError:
    """413: the request carries more than the service's cost model accepts (limits.py)."""
    return ApiError(413, _TOO_LARGE.get(what, "request_too_large"), message, field)
