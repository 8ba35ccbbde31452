"""The CDS Hooks 2.0 HTTP API: discovery, service invocation, feedback, and JSON errors for everything."""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from functools import lru_cache
from typing import Any

import orjson
from flask import Blueprint, Flask, Request, Response, current_app, g, jsonify, request
from flask.ctx import _AppCtxGlobals
from werkzeug.exceptions import HTTPException
from werkzeug.sansio.utils import get_current_url

from cds_service import metrics
from cds_service.errors import ApiError, bad_request
from cds_service.pipeline.evaluate import Evaluation, Evaluator, Service

log = logging.getLogger(__name__)

bp = Blueprint("cds", __name__)


def _request() -> Request:
    """The request object behind Flask's `request` proxy. Every attribute read through a proxy looks the
    context variable up again (about 50 lookups per hook call, 4% of it): functions that read several
    attributes take the object once."""
    return request._get_current_object()  # type: ignore[attr-defined]


def _g() -> _AppCtxGlobals:
    """flask.g's object, taken once per function for the same reason as `_request`."""
    return g._get_current_object()


def evaluator() -> Evaluator:
    return current_app.extensions["cds_evaluator"]


def _service(service_id: str) -> Service:
    service = evaluator().services.get(service_id)
    if service is None:
        raise ApiError(404, "unknown_service", f"no CDS service with id {service_id!r}; see GET /cds-services")
    return service


# Every byte but quotes and brackets; brackets as parentheses.
_NOT_STRUCTURE = bytes(range(256)).translate(None, b'"[]{}')
_AS_PARENTHESES = bytes.maketrans(b"[{]}", b"(())")


def _too_deep(raw: bytes, limit: int) -> bool:
    """True when the nesting of the valid JSON document `raw` goes deeper than `limit`.

    C-speed byte operations instead of a walk over the parsed value (4-10x cheaper): drop escaped
    backslashes and quotes, keep only quotes and brackets (brackets as parentheses), drop what lies between
    quotes, then peel one level of innermost brackets per pass, at most `limit` passes.
    """
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False  # each level opens a bracket: no deeper than the number of them (those in strings too)
    if b"\\" in raw:
        raw = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    structure = raw.translate(_AS_PARENTHESES, _NOT_STRUCTURE)
    # Two quotes side by side are an empty string, or one string's end and the next one's start with nothing
    # outside them: dropping them changes nothing inside or outside strings, and leaves (in FHIR JSON, where
    # strings rarely hold brackets) no quote at all, sparing the split below.
    structure = structure.replace(b'""', b"")
    if b'"' in structure:
        structure = b"".join(structure.split(b'"')[::2])
    for _ in range(limit):
        if not structure:
            return False
        structure = structure.replace(b"()", b"")
    return bool(structure)


@lru_cache(maxsize=64)
def _host_url(scheme: str, host: str) -> str:
    """request.host_url, made once per (scheme, Host) (a deployment has a handful): Werkzeug builds it anew
    for every request, through an IRI conversion that cost 2% of a sacroplasty call."""
    return get_current_url(scheme, host)


def read_json() -> Any:
    """The request body as parsed JSON. 415 unless JSON, 413 when too big, 400 when invalid."""
    req = _request()
    if req.mimetype != "application/json":
        raise ApiError(415, "unsupported_media_type", "send the request body as application/json")
    raw = req.get_data(cache=False)  # Flask enforces MAX_CONTENT_LENGTH here (413)
    config = current_app.config
    limit = config["MAX_CONTENT_LENGTH"]
    if req.content_length is None and limit is not None and len(raw) >= limit:
        # A chunked body (no Content-Length): Werkzeug stops reading at the cap instead of refusing it.
        raise ApiError(413, "request_entity_too_large", f"the request body is larger than {limit} bytes")
    try:
        body = orjson.loads(raw)  # also refuses invalid UTF-8
    except ValueError as exc:
        raise bad_request(f"the request body is not valid JSON ({type(exc).__name__})") from None
    except RecursionError:
        raise bad_request("the request body is nested too deeply") from None
    if _too_deep(raw, config["CDS_SETTINGS"].max_json_depth):
        raise bad_request("the request body is nested too deeply")
    return body


def loggable(value: str, limit: int = 80) -> str:
    """A client-chosen string made safe for one log line (no line breaks or control characters)."""
    value = value[:limit]
    return value if value.isprintable() else "".join(c if c.isprintable() else "?" for c in value)


def authenticate(service: Service, feedback: bool = False) -> None:
    """Verify the CDS client's JWT unless the service runs in dev mode (see auth.py)."""
    authenticator = current_app.extensions.get("cds_auth")
    if authenticator is not None:
        g.client = authenticator.verify(request.headers.get("Authorization"), service.id, feedback=feedback)


@bp.get("/cds-services")
def discovery() -> Response:
    if current_app.config["CDS_SETTINGS"].dev:
        log.warning("DEV MODE: hook calls are not authenticated; never expose this instance to a network")
    return jsonify(evaluator().discovery())


@bp.post("/cds-services/<service_id>")
def invoke(service_id: str) -> Response:
    service = _service(service_id)
    ctx = _g()
    ctx.service_id = service.id
    authenticate(service)
    ctx.invocation_received = datetime.now(timezone.utc)  # authenticated: logged from here on, whatever the end
    body = read_json()
    if isinstance(body, dict) and isinstance(body.get("hookInstance"), str):
        ctx.hook_instance = loggable(body["hookInstance"])
        ctx.invocation_hook = body.get("hook") if isinstance(body.get("hook"), str) else None
    req = _request()
    evaluation = evaluator().evaluate(service, body, base_url=_host_url(req.scheme, req.host))
    ctx.evaluation = evaluation
    _record(service, evaluation)
    ctx.cards = len(evaluation.response["cards"])
    for issued in evaluation.issued:
        metrics.CARDS.labels(issued.policy.id, issued.policy.version).inc()
    for covered in metrics.coverage_values(evaluation.response):
        metrics.COVERAGE.labels(covered).inc()
    return jsonify(evaluation.response)


def _record(service: Service, evaluation: Evaluation) -> None:
    """Keep what the payer's report needs of each card issued. Queued, not awaited: the clinician's card
    never waits for the database, nor is lost to it (storage/store.py, storage/writer.py)."""
    store = current_app.extensions.get("cds_store")
    hook_request = evaluation.hook_request
    if store is None or hook_request is None or not evaluation.issued:
        return
    issued_at = datetime.now(timezone.utc)
    store.record_cards([{
        "card_uuid": i.card["uuid"],
        "service_id": service.id,
        "hook": hook_request.hook,
        "hook_instance": hook_request.hook_instance,
        "issued_at": issued_at,
        "policy_id": i.policy.id,
        "policy_version": i.policy.version,
        "rule": i.decision.match.rule,
        "evidence": i.decision.match.evidence,
        "suggestions": i.suggestions,
    } for i in evaluation.issued])


@bp.after_request
def _log_invocation(response: Response) -> Response:
    """The CRD invocation log (storage/store.py `invocations`): one row per authenticated hook call, its answer
    or error included. Queued, never awaited; nothing of the request body beyond hookInstance and hook."""
    ctx = _g()
    received = ctx.get("invocation_received")
    if received is None:
        return response
    app = current_app
    store = app.extensions.get("cds_store")
    if store is None or request.endpoint != "cds.invoke":
        return response
    try:
        evaluation: Evaluation | None = ctx.get("evaluation")
        hook_request = evaluation.hook_request if evaluation is not None else None
        client = ctx.get("client")
        store.record_invocation({
            "hook_instance": hook_request.hook_instance if hook_request else ctx.get("hook_instance"),
            "hook": hook_request.hook if hook_request else ctx.get("invocation_hook"),
            "service_id": ctx.get("service_id"),
            "client": getattr(client, "iss", None),
            "request_id": ctx.get("request_id"),
            "received_at": received,
            "answered_at": datetime.now(timezone.utc),
            "status": response.status_code,
            "decisions": list(evaluation.decisions) if evaluation is not None else [],
            "response": response.get_data(),
        }, retention_days=app.config["CDS_SETTINGS"].audit_retention_days)
    except Exception as exc:  # noqa: BLE001 - the log never costs the clinician the answer
        log.error("invocation log row not queued: %s", type(exc).__name__)
    return response


@bp.post("/cds-services/<service_id>/feedback")
def feedback(service_id: str) -> Response:
    from cds_service.storage.feedback import receive

    service = _service(service_id)
    g.service_id = service.id
    authenticate(service, feedback=True)
    body = read_json()
    answer = jsonify(receive(current_app.extensions.get("cds_store"), service.id, body))
    for entry in body["feedback"] if isinstance(body, dict) and isinstance(body.get("feedback"), list) else ():
        outcome = entry.get("outcome") if isinstance(entry, dict) else None
        metrics.FEEDBACK.labels(outcome if outcome in metrics.FEEDBACK_OUTCOMES else "other").inc()
    return answer


def _error_response(error: ApiError) -> Response:
    response = jsonify(error.body())
    response.status_code = error.status
    for name, value in error.headers.items():
        response.headers[name] = value
    return response


def register_errors(app: Flask) -> None:
    """Every error is JSON with the right status; no stack trace ever reaches a client."""

    @app.errorhandler(ApiError)
    def api_error(error: ApiError) -> Response:
        return _error_response(error)

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException) -> Response:
        code = (error.name or "error").lower().replace(" ", "_")
        response = _error_response(ApiError(error.code or 500, code, error.description or error.name))
        if error.code == 405 and error.get_response().headers.get("Allow"):
            response.headers["Allow"] = error.get_response().headers["Allow"]
        return response

    @app.errorhandler(Exception)
    def unexpected(error: Exception) -> Response:
        log.error("unexpected %s in %s %s", type(error).__name__, request.method, request.path)
        return _error_response(ApiError(500, "internal_error", "the service failed to answer; this is logged"))


def register_request_log(app: Flask) -> None:
    """One line per request: what was called, how it ended, how long it took. Never patient data."""

    @app.before_request
    def start_timer() -> None:
        ctx = _g()
        ctx.started = time.perf_counter()
        if request.path.startswith("/cds-services"):
            ctx.in_progress = True
            metrics.IN_PROGRESS.inc()  # what a killed worker held (metrics.worker_exited)

    @app.teardown_request
    def done(_error: BaseException | None) -> None:
        if g.pop("in_progress", False):
            metrics.IN_PROGRESS.dec()

    @app.after_request
    def log_request(response: Response) -> Response:
        req = _request()
        if req.path.startswith("/cds-services"):
            ctx = _g()
            seconds = time.perf_counter() - ctx.get("started", time.perf_counter())
            url_rule = req.url_rule
            rule = url_rule.rule if url_rule else "-"
            service_id = ctx.get("service_id")
            status = response.status_code
            if req.method == "POST" and rule == "/cds-services/<service_id>":
                service = evaluator().services.get(service_id) if service_id else None
                label = service.id if service else "unknown"  # never the client's string
                metrics.HOOK_CALLS.labels(label, service.hook if service else "unknown", str(status)).inc()
                metrics.HOOK_SECONDS.labels(label).observe(seconds)
            hook_instance = ctx.get("hook_instance")
            cards = ctx.get("cards")
            log.info("%s %s service=%s hookInstance=%s status=%d cards=%s ms=%.1f", req.method, rule,
                     service_id or "-", "-" if hook_instance is None else hook_instance, status,
                     "-" if cards is None else cards, seconds * 1000,
                     extra={"service": service_id, "hook_instance": hook_instance, "status": status,
                            "cards": cards, "duration_ms": round(seconds * 1000, 1)})
        return response
