"""The Python peer: a minimal FastAPI service of the same card, served by uvicorn[standard] (bench/run.py).

What a team picking FastAPI would write: the hook request parsed into a pydantic model, the draft orders
scanned for a sacroplasty (CPT 0200T or 0201T, or "sacroplasty" in the order's text), and, when one is found,
the card our service answered for that hook (captured by run.py from the service itself, in PEER_CARDS) with
the order's id, the hookInstance and fresh uuids filled in. It validates no FHIR and writes no card record, so
it does less than the service. With PEER_AUTH=1 it authenticates as the authenticated baseline does
(bench/bench_auth.py). Not a project dependency: run.py installs fastapi and uvicorn[standard] if missing.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

from bench_auth import check
from fastapi import FastAPI, Header
from fastapi.responses import JSONResponse
from pydantic import BaseModel

SACROPLASTY_CODES = {"0200T", "0201T"}
CARDS: dict[str, str] = json.loads(open(os.environ["PEER_CARDS"]).read()) if os.environ.get("PEER_CARDS") else {}
AUTH = os.environ.get("PEER_AUTH") == "1"

app = FastAPI()


class HookRequest(BaseModel):
    hookInstance: str  # noqa: N815 (the CDS Hooks field name)
    hook: str
    fhirServer: str | None = None  # noqa: N815
    fhirAuthorization: dict[str, Any] | None = None  # noqa: N815
    context: dict[str, Any]
    prefetch: dict[str, Any] | None = None


def _sacroplasty(order: dict[str, Any]) -> bool:
    code = order.get("code") or {}
    if any(c.get("code") in SACROPLASTY_CODES for c in code.get("coding") or []):
        return True
    return "sacroplasty" in str(code.get("text", "")).lower()


@app.post("/cds-services/{service_id}")
async def hook(service_id: str, body: HookRequest, authorization: str | None = Header(default=None)) -> Any:
    if AUTH:
        refused = check(authorization, service_id)
        if refused:
            return JSONResponse({"error": refused}, status_code=401)
    entries = (body.context.get("draftOrders") or {}).get("entry") or []
    found = next((e["resource"] for e in entries if _sacroplasty(e.get("resource") or {})), None)
    template = CARDS.get(body.hook)
    if found is None or template is None:
        return {"cards": []}
    card = json.loads(template.replace("@@ORDER@@", found["id"]).replace("@@HOOK@@", body.hookInstance))
    card["uuid"] = str(uuid.uuid4())
    for suggestion in card.get("suggestions") or []:
        suggestion["uuid"] = str(uuid.uuid4())
    return {"cards": [card]}
