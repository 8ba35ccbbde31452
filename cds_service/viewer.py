"""GET /: a short page naming the service (the card viewer arrives with issue #8)."""

from __future__ import annotations

from flask import Blueprint, Response, current_app, render_template_string

bp = Blueprint("viewer", __name__)

PAGE = """<!doctype html><html lang="en"><meta charset="utf-8"><title>{{ title }}</title>
<h1>{{ title }}</h1><p>Policy {{ policy.number }}, version {{ policy.version }} ({{ policy.payer.name }}).</p>
<ul><li>Discovery: <code>GET /cds-services</code></li>
{% for s in services %}<li><code>POST /cds-services/{{ s.id }}</code> ({{ s.hook }})</li>{% endfor %}</ul></html>"""


@bp.get("/")
def index() -> Response:
    engine = current_app.extensions["cds_engine"]
    return render_template_string(PAGE, title="Sacroplasty coverage CDS service", policy=engine.policy,
                                  services=list(engine.services.values()))
