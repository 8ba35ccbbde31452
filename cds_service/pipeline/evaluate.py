"""One hook call through the pipeline: request body → parsed hook context → decisions of every pack → cards and
coverage-information updates → response JSON. Free of HTTP and storage: the caller stores what was issued."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from string import Template
from typing import Any

from cds_service.errors import too_large
from cds_service.pipeline import crd, limits
from cds_service.pipeline.cards import CardBuilder, IssuedCard
from cds_service.pipeline.decide import Decision, decide, find_sacroplasty
from cds_service.pipeline.detect import Detector
from cds_service.pipeline.hooks import HookRequest, parse_hook_request
from cds_service.pipeline.patient import PREFETCH_TEMPLATES, FhirFetcher, gather
from cds_service.pipeline.policy import Catalogue, Policy

HOOKS = ("order-select", "order-sign")
DEFAULT_BASE_URL = "http://127.0.0.1:8080"  # `cds-service serve`'s own default address


@dataclass(frozen=True)
class Service:
    id: str
    hook: str
    title: str
    description: str


@dataclass(frozen=True)
class Pack:
    """One policy pack, compiled once: its rules and its card builder."""

    policy: Policy
    detector: Detector
    cards: CardBuilder


@dataclass(frozen=True)
class Evaluation:
    """What one hook call answered, and what the payer's records need of it."""

    response: dict[str, Any]
    hook_request: HookRequest | None = None
    issued: tuple[IssuedCard, ...] = ()


class Evaluator:
    """Built once per process: every pack loaded and compiled, the services described."""

    def __init__(self, catalogue: Catalogue, max_draft_orders: int, public_url: str | None = None,
                 fetcher: FhirFetcher | None = None) -> None:
        self.catalogue = catalogue
        self.max_draft_orders = max_draft_orders
        self.public_url = public_url
        self.fetcher = fetcher  # no connection until a call with a finding needs one
        self.packs = tuple(Pack(p, Detector(p), CardBuilder(p)) for p in catalogue.packs)
        listed = ", ".join(f"{p.label} ({p.title})" for p in catalogue.packs)
        self.services = {
            s.id: Service(s.id, s.hook, s.title, Template(s.description).safe_substitute(packs=listed))
            for s in catalogue.services if s.hook in HOOKS
        }
        self._discovery = {"services": [self._describe(s) for s in self.services.values()]}

    @property
    def policies(self) -> tuple[Policy, ...]:
        return self.catalogue.packs

    def policy(self, policy_id: str) -> Policy | None:
        return next((p for p in self.catalogue.packs if p.id == policy_id), None)

    def _describe(self, service: Service) -> dict[str, Any]:
        return {
            "hook": service.hook,
            "id": service.id,
            "title": service.title,
            "description": service.description,
            "prefetch": dict(PREFETCH_TEMPLATES),
            "extension": crd.discovery_extension(self.catalogue.crd),
        }

    def discovery(self) -> dict[str, Any]:
        return self._discovery

    def parse(self, service: Service, body: Any) -> HookRequest:
        return parse_hook_request(body, service.hook, self.max_draft_orders)

    def evaluate(self, service: Service, body: Any, now: datetime | None = None,
                 base_url: str | None = None) -> Evaluation:
        """The response to one hook call: every order judged against every pack, one card per (order, pack)
        that fires. Raises ApiError for an invalid request.

        `base_url`: this service's public URL as the EHR reaches it (for the card's link to the policy page);
        CDS_PUBLIC_URL when set, else what the caller passes (the request's own URL), else the default.
        """
        hook_request = self.parse(service, body)
        kinds = crd.requested_kinds(hook_request.extension, self.catalogue.crd)
        found = [(pack, findings) for pack in self.packs
                 if (findings := find_sacroplasty(hook_request, pack.detector))]
        if not found:
            return Evaluation({"cards": []}, hook_request)
        count = sum(len(findings) for _, findings in found)
        if count > limits.MAX_SACROPLASTY_ORDERS:  # each costs a card, a validation, a CRD update
            raise too_large("items", f"context.draftOrders holds {count} orders the policies rule on; at most "
                                     f"{limits.MAX_SACROPLASTY_ORDERS} are judged per call", "context.draftOrders")
        now = now or datetime.now(timezone.utc)
        ctx = gather(hook_request, self.fetcher)  # once per call, whatever the number of packs
        ruled: list[tuple[Pack, list[Decision]]] = [
            (pack, decide(findings, ctx, pack.policy, now.date())) for pack, findings in found]
        decisions = [d for _, pack_decisions in ruled for d in pack_decisions]
        # The CRD update first: when it validates a whole draft order, the card reuses that answer.
        actions = crd.coverage_actions(decisions, now.date()) if kinds.coverage_info else []
        base_url = self.public_url or base_url or DEFAULT_BASE_URL
        issued = tuple(pack.cards.build(d, hook_request, now, base_url) for pack, pack_decisions in ruled
                       for d in pack_decisions) if kinds.alternatives else ()
        response: dict[str, Any] = {"cards": [i.card for i in issued]}
        if actions:
            response["systemActions"] = actions
        return Evaluation(response, hook_request, issued)
