"""GET /: the card viewer in dev mode (fire example hook requests, see the cards as an EHR would), and in
production only a short page naming the service, its policy and its endpoints.

The viewer page runs under a strict Content-Security-Policy: scripts only from this app (no inline script, no
CDN), no HTML sinks (Trusted Types), fetch() only to this app. Card text is put into the page as text nodes, so
nothing a CDS service returns can run as script (see static/markdown.js).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from flask import Blueprint, Response, current_app, render_template, send_from_directory

from cds_service.config import Settings
from cds_service.errors import ApiError

bp = Blueprint("viewer", __name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
DEFAULT_FIXTURE = "order-select-sacroplasty-cpt.json"

VIEWER_CSP = "; ".join((
    "default-src 'none'",
    "script-src 'self'",
    "style-src 'self'",
    "connect-src 'self'",
    "img-src 'self'",
    "base-uri 'none'",
    "form-action 'none'",
    "frame-ancestors 'none'",
    "require-trusted-types-for 'script'",
    "trusted-types 'none'",
))
PLAIN_CSP = "default-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"


@dataclass(frozen=True)
class Fixture:
    name: str
    hook: str | None


def _settings() -> Settings:
    return current_app.config["CDS_SETTINGS"]


def _require_dev() -> Settings:
    """The viewer and its fixtures exist only in dev mode; in production they are simply not there."""
    settings = _settings()
    if not settings.dev:
        raise ApiError(404, "not_found", "the card viewer is only available when the service runs with --dev")
    return settings


def list_fixtures(folder: Path) -> list[Fixture]:
    """The example hook requests (*.json) in `folder`, by name, with the hook each one is for."""
    fixtures = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            body = json.loads(path.read_text(encoding="utf-8"))
            hook = body.get("hook") if isinstance(body, dict) and isinstance(body.get("hook"), str) else None
        except (OSError, UnicodeDecodeError, ValueError):
            hook = None
        fixtures.append(Fixture(path.name, hook))
    return fixtures


def _secure(response: Response, csp: str) -> Response:
    response.headers["Content-Security-Policy"] = csp
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.get("/")
def index() -> Response:
    settings = _settings()
    evaluator = current_app.extensions["cds_evaluator"]
    services = list(evaluator.services.values())
    if not settings.dev:
        page = render_template("index.html", policies=evaluator.policies, services=services,
                               base=settings.public_url or "")
        return _secure(Response(page, mimetype="text/html"), PLAIN_CSP)
    fixtures = list_fixtures(settings.fixtures_dir)
    names = {f.name for f in fixtures}
    default = DEFAULT_FIXTURE if DEFAULT_FIXTURE in names else (fixtures[0].name if fixtures else "")
    page = render_template("viewer.html", policies=evaluator.policies, services=services, fixtures=fixtures,
                           default_fixture=default)
    return _secure(Response(page, mimetype="text/html"), VIEWER_CSP)


@bp.get("/viewer/fixtures/<name>")
def fixture(name: str) -> Response:
    """One example hook request, as stored. Only names listed in the fixtures folder are served."""
    settings = _require_dev()
    if name not in {f.name for f in list_fixtures(settings.fixtures_dir)}:
        raise ApiError(404, "not_found", f"no example hook request named {name!r}")
    try:
        text = (settings.fixtures_dir / name).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        raise ApiError(404, "not_found", f"example hook request {name!r} cannot be read") from None
    return _secure(Response(text, mimetype="application/json"), PLAIN_CSP)


@bp.get("/viewer/static/<path:filename>")
def static(filename: str) -> Response:
    """The viewer's script and style sheet, shipped in the package (the page works offline)."""
    _require_dev()
    response = send_from_directory(STATIC_DIR, filename, max_age=0)
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response
