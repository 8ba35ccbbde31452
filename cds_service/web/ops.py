"""Operations endpoints: GET /health (liveness), GET /ready (readiness), GET /metrics (Prometheus).

/health and /ready are public and cheap, carry no patient data, and are not in the request log (which logs
/cds-services calls only). /metrics is served only when CDS_METRICS is on and, with CDS_METRICS_TOKEN set, only
to `Authorization: Bearer <token>`; otherwise it is 404, as if it did not exist. See docs/operations.md.
"""

from __future__ import annotations

import hmac
import re
import threading
from typing import Any

from flask import Blueprint, Flask, Response, current_app, g, jsonify, request
from sqlalchemy import text

from cds_service import metrics
from cds_service.errors import ApiError
from cds_service.pipeline.cards import new_ids

bp = Blueprint("ops", __name__)


@bp.get("/health")
def health() -> Response:
    """Liveness: this process answers HTTP. No database, no outbound call."""
    return jsonify({"status": "ok"})


class NotReadyError(Exception):
    """Why this worker should get no calls now: `reason` (policy, database, writer) and a message."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def _check_database(engine: Any, seconds: float) -> None:
    """Returns when `SELECT 1` answers within `seconds`; else NotReadyError (no connection details, no URL)."""
    outcome: dict[str, str | None] = {}

    def probe() -> None:
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            outcome["error"] = None
        except Exception as exc:  # noqa: BLE001 - any failure means not ready; the type names it
            outcome["error"] = type(exc).__name__

    thread = threading.Thread(target=probe, name="ready-probe", daemon=True)
    thread.start()
    thread.join(seconds)
    if "error" not in outcome:
        raise NotReadyError("database", f"the database did not answer within {seconds:g} s")
    if outcome["error"] is not None:
        raise NotReadyError("database", f"the database did not answer ({outcome['error']})")


def writer_depth(store: Any) -> int:
    """Items waiting in this worker's database writer (0 without a store)."""
    return int(store.writer_depth) if store is not None else 0


def check_ready() -> None:
    """Returns when this worker can serve; else NotReadyError."""
    settings = current_app.config["CDS_SETTINGS"]
    evaluator = current_app.extensions.get("cds_evaluator")
    if evaluator is None or not evaluator.services:
        raise NotReadyError("policy", "no policy pack is loaded")
    store = current_app.extensions.get("cds_store")
    if store is None:
        raise NotReadyError("database", "no database is configured")
    _check_database(store.engine, settings.ready_db_seconds)
    depth = writer_depth(store)
    if depth > settings.ready_max_queue:
        raise NotReadyError("writer", f"{depth} records wait for the database writer (more than "
                                      f"{settings.ready_max_queue})")


@bp.get("/ready")
def ready() -> Response:
    """Readiness: the packs are loaded, the database answers in time, the writer is not backed up."""
    try:
        check_ready()
    except NotReadyError as problem:
        response = jsonify({"status": "unavailable", "reason": problem.reason, "message": problem.message})
        response.status_code = 503
        response.headers["Cache-Control"] = "no-store"
        return response
    return jsonify({"status": "ready"})


@bp.get("/metrics")
def scrape() -> Response:
    settings = current_app.config["CDS_SETTINGS"]
    if not settings.metrics:
        raise ApiError(404, "not_found", "The requested URL was not found on the server.")
    if settings.metrics_token:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                 settings.metrics_token.encode()):
            raise ApiError(401, "unauthorized", "the metrics endpoint needs its bearer token",
                           headers={"WWW-Authenticate": 'Bearer realm="metrics"'})
    store = current_app.extensions.get("cds_store")
    if store is not None:
        metrics.WRITER_DEPTH.set(writer_depth(store))
    return Response(metrics.render(), mimetype=None, content_type=metrics.CONTENT_TYPE)


# --- request ids --------------------------------------------------------------------------------------------

REQUEST_ID_HEADER = "X-Request-ID"
_REQUEST_ID_ENVIRON = "HTTP_" + REQUEST_ID_HEADER.upper().replace("-", "_")  # its WSGI environ key
# A client's id is kept when it is a plain token (a UUID, a trace id); anything else is replaced by a fresh one,
# so the header can carry no line break, no markup and no free text into the log.
_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


def request_id_from(header: str | None) -> str:
    """The client's X-Request-ID when it is a plain token of at most 128 characters, else a new UUID (version
    4, formatted as str(uuid.uuid4()) is, without building a UUID object: cards.new_ids)."""
    if header and _REQUEST_ID.fullmatch(header):
        return header
    return next(new_ids(1))


def register_request_id(app: Flask) -> None:
    """Every request gets an id, on flask.g.request_id (for log lines and audit rows) and on the response."""

    @app.before_request
    def assign_request_id() -> None:
        # The header straight from the WSGI environ: what request.headers.get(REQUEST_ID_HEADER) reads, without
        # building the headers view (every call has this hook).
        g.request_id = request_id_from(request.environ.get(_REQUEST_ID_ENVIRON))

    @app.after_request
    def return_request_id(response: Response) -> Response:
        request_id = g.get("request_id")
        if request_id:
            response.headers[REQUEST_ID_HEADER] = request_id
        return response
