"""JSON in and out through orjson: several times faster than the standard library on hook-sized bodies."""

from __future__ import annotations

from typing import Any

import orjson
from flask import Response
from flask.json.provider import JSONProvider


class FastJSONProvider(JSONProvider):
    """Flask's JSON (jsonify, request.get_json, the test client) through orjson: compact, keys in the
    order they were inserted, so cards keep their fields in spec order."""

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        return orjson.dumps(obj).decode("utf-8")

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        return orjson.loads(s)

    def response(self, *args: Any, **kwargs: Any) -> Response:
        obj = self._prepare_response_obj(args, kwargs)
        # JSONProvider types its app as Flask's sans-IO base, whose response class takes no body; the app
        # this provider is installed on is a Flask app, whose response class is the full Response
        response_class = self._app.response_class
        assert issubclass(response_class, Response)
        return response_class(orjson.dumps(obj), mimetype="application/json")
