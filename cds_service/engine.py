"""The hook pipeline, free of HTTP: request body → parsed hook context → decisions → cards → response JSON."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from . import crd, limits
from .cards import CardBuilder, IssuedCard
from .config import Settings
from .decide import decide, find_sacroplasty
from .detect import Detector
from .errors import too_large
from .fhir import FhirClient
from .hooks import HookRequest, parse_hook_request
from .patient import PREFETCH_TEMPLATES, gather
from .policy import Policy, load_policies
from .store import Store

HOOKS = ("order-select", "order-sign")
DEFAULT_BASE_URL = "http://127.0.0.1:8080"  # `cds-service serve`'s own default address


@dataclass(frozen=True)
class Service:
    id: str
    hook: str
    title: str
    description: str


class Engine:
    """Built once per process: policy data loaded, rules compiled, card templates ready."""

    def __init__(self, settings: Settings, store: Store | None = None) -> None:
        self.settings = settings
        self.policies = load_policies(settings.cards_dir)
        self.policy: Policy = self.policies[0]
        self.detector = Detector(self.policy)
        self.cards = CardBuilder(self.policy)
        self.store = store
        self.fhir = FhirClient.from_settings(settings)  # no connection until a sacroplasty call needs one
        self.services = {
            s["id"]: Service(s["id"], hook, s["title"], s["description"])
            for hook, s in self.policy.services.items() if hook in HOOKS
        }
        self._discovery = {"services": [self._describe(s) for s in self.services.values()]}

    def _describe(self, service: Service) -> dict[str, Any]:
        return {
            "hook": service.hook,
            "id": service.id,
            "title": service.title,
            "description": service.description,
            "prefetch": dict(PREFETCH_TEMPLATES),
            "extension": crd.discovery_extension(self.policy),
        }

    def discovery(self) -> dict[str, Any]:
        return self._discovery

    def parse(self, service: Service, body: Any) -> HookRequest:
        return parse_hook_request(body, service.hook, self.settings.max_draft_orders)

    def evaluate(self, service: Service, body: Any, now: datetime | None = None,
                 base_url: str | None = None) -> dict[str, Any]:
        """The response to one hook call. Raises ApiError for an invalid request.

        `base_url`: this service's public URL as the EHR reaches it (for the card's link to the policy page);
        CDS_PUBLIC_URL when set, else what the caller passes (the request's own URL), else the default.
        """
        hook_request = self.parse(service, body)
        kinds = crd.requested_kinds(hook_request.extension, self.policy)
        findings = find_sacroplasty(hook_request, self.detector)
        if not findings:
            return {"cards": []}
        if len(findings) > limits.MAX_SACROPLASTY_ORDERS:  # each costs a card, a validation, a CRD update
            raise too_large("items", f"context.draftOrders holds {len(findings)} sacroplasty orders; at most "
                                     f"{limits.MAX_SACROPLASTY_ORDERS} are judged per call", "context.draftOrders")
        now = now or datetime.now(timezone.utc)
        ctx = gather(hook_request, self.fhir)
        decisions = decide(findings, ctx, self.policy, now.date())
        # The CRD update first: when it validates a whole draft order, the card reuses that answer.
        actions = crd.coverage_actions(decisions, self.policy, now.date()) if kinds.coverage_info else []
        base_url = self.settings.public_url or base_url or DEFAULT_BASE_URL
        issued = [self.cards.build(d, hook_request, now, base_url) for d in decisions] if kinds.alternatives else []
        self._record(service, hook_request, issued, now)
        response: dict[str, Any] = {"cards": [i.card for i in issued]}
        if actions:
            response["systemActions"] = actions
        return response

    def _record(self, service: Service, hook_request: HookRequest, issued: list[IssuedCard], now: datetime) -> None:
        """Keep what the payer's report needs. Queued, not awaited: the clinician's card never waits for
        the database, nor is lost to it (store.py, writer.py)."""
        if not self.store or not issued:
            return
        self.store.record_cards([{
            "card_uuid": i.card["uuid"],
            "service_id": service.id,
            "hook": hook_request.hook,
            "hook_instance": hook_request.hook_instance,
            "issued_at": now,
            "policy_id": self.policy.id,
            "policy_version": self.policy.version,
            "rule": i.decision.match.rule,
            "evidence": i.decision.match.evidence,
            "suggestions": i.suggestions,
        } for i in issued])
