"""GET /policies/<policy id>: the policy's full reasoning as a public HTML page, rendered from cards/.

The card's detail stays short enough to read at the order; its evidence, history and every alternative and
override reason live here, behind a link in the detail's Markdown. The page holds policy content only, never
patient data, and is the same for every caller, so it is rendered once per policy and process.
"""

from __future__ import annotations

from functools import lru_cache

from flask import Blueprint, Response, current_app, render_template
from markdown_it import MarkdownIt
from markupsafe import Markup

from cds_service.errors import ApiError
from cds_service.pipeline.policy import Policy

bp = Blueprint("policy_page", __name__)

PAGE_CSP = "default-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"

# CommonMark without raw HTML: policy text is shown, never run.
_MARKDOWN = MarkdownIt("commonmark", {"html": False})


def page_markdown(policy: Policy) -> str:
    """The page's Markdown: cards/<policy>/page.md with the policy's data filled in."""
    bullets = lambda lines: "\n".join(f"- {line}" for line in lines)  # noqa: E731
    return policy.page_template.substitute(
        number=policy.number,
        revision_date=policy.revision_date,
        url=policy.source["url"],
        alternatives=bullets([a.policy_text for a in policy.alternatives]
                             + [a.policy_text for a in policy.also_covered]),
        override_reasons=bullets([r["display"] for r in policy.override_reasons]),
        history=bullets(policy.history),
    )


@lru_cache(maxsize=16)
def _render(policy: Policy) -> str:
    body = Markup(_MARKDOWN.render(page_markdown(policy)))  # noqa: S704 - html disabled above
    return render_template("policy.html", policy=policy, body=body)


@bp.get("/policies/<policy_id>")
def policy_page(policy_id: str) -> Response:
    policy = current_app.extensions["cds_evaluator"].policy(policy_id)
    if policy is None:
        raise ApiError(404, "not_found", f"no policy with id {policy_id!r}")
    response = Response(_render(policy), mimetype="text/html")
    response.headers["Content-Security-Policy"] = PAGE_CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Cache-Control"] = "public, max-age=300"
    return response
