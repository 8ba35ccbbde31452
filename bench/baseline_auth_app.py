"""The authenticated baseline for mix d: bench/baseline_app.py plus what authentication must cost.

The same no-op hook route (parse the JSON body, answer no cards), after verifying the same ES384 JWT with PyJWT
against the same JWKS and recording its jti in SQLite (bench/bench_auth.py). Run by bench/run.py under the
unauthenticated baseline's gunicorn settings (gthread, 2 workers x 4 threads).
"""

from __future__ import annotations

from bench_auth import check
from flask import Flask, Response, jsonify, request

app = Flask(__name__)


@app.post("/cds-services/<service_id>")
def hook(service_id: str) -> Response | tuple[Response, int]:
    refused = check(request.headers.get("Authorization"), service_id)
    if refused:
        return jsonify({"error": refused}), 401
    request.get_json()  # parse the body, as any hook service must
    return jsonify({"cards": []})
