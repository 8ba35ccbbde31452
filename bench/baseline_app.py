"""The framework's limit: a Flask app whose hook route only parses the JSON body and answers no cards.

Run by bench/run.py under the same gunicorn settings as `cds-service serve` (cds_service/cli.py).
"""

from __future__ import annotations

from flask import Flask, Response, jsonify, request

app = Flask(__name__)


@app.post("/cds-services/<service_id>")
def hook(service_id: str) -> Response:
    request.get_json()  # parse the body, as any hook service must
    return jsonify({"cards": []})
