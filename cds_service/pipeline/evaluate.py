"""One hook call through the pipeline: request body → parsed hook context → decisions of every pack → cards and
coverage-information updates → response JSON. Free of HTTP and storage: the caller stores what was issued."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timezone
from string import Template
from typing import Any

from cds_service.errors import too_large
from cds_service.pipeline import crd, limits
from cds_service.pipeline.cards import CardBuilder, IssuedCard
from cds_service.pipeline.decide import Decision, Finding, appointment_references, decide, find_booked, find_sacroplasty
from cds_service.pipeline.detect import Detector
from cds_service.pipeline.hooks import HookRequest, judged, parse_hook_request
from cds_service.pipeline.patient import FhirFetcher, gather, prefetch_templates, service_requests
from cds_service.pipeline.policy import Catalogue, Policy

HOOKS = ("order-select", "order-sign", "order-dispatch", "appointment-book")
# Hooks where the orderer is not the user: the card has no delete/create suggestions (the orderer, not the
# performer or scheduler, changes the order), and the orders are read from prefetch or fhirServer.
SCHEDULING_HOOKS = ("order-dispatch", "appointment-book")
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
    # The coverage decision per (order, pack), for the invocation log: order reference, covered, assertion id
    # (None when no coverage-information was sent, e.g. Coverage unknown), pack and version. No patient data.
    decisions: tuple[dict[str, Any], ...] = ()


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
            "prefetch": prefetch_templates(service.hook),
            "extension": crd.discovery_extension(self.catalogue.crd),
        }

    def discovery(self) -> dict[str, Any]:
        return self._discovery

    def parse(self, service: Service, body: Any) -> HookRequest:
        return parse_hook_request(body, service.hook, self.max_draft_orders)

    @staticmethod
    def _findings(hook_request: HookRequest, detector: Detector, based: dict[str, dict[str, Any]]) -> list[Finding]:
        """The sacroplasty orders of this call, for one pack's detector."""
        if hook_request.hook == "appointment-book":
            return find_booked(hook_request, detector, based)
        return find_sacroplasty(hook_request, detector)

    def _resolve(self, hook_request: HookRequest) -> HookRequest:
        """order-dispatch: the dispatched ServiceRequests, read from prefetch or fhirServer, become the orders
        judged (only those: CRD's dispatched orders)."""
        if hook_request.hook == "order-dispatch":
            found = service_requests(hook_request, list(hook_request.order_references), self.fetcher)
            orders = tuple(found[r] for r in hook_request.order_references if r in found and judged(found[r]))
            return replace(hook_request, orders=orders, draft_orders=orders)
        return hook_request

    def evaluate(self, service: Service, body: Any, now: datetime | None = None,
                 base_url: str | None = None) -> Evaluation:
        """The response to one hook call: every order judged against every pack, one card per (order, pack)
        that fires. Raises ApiError for an invalid request.

        `base_url`: this service's public URL as the EHR reaches it (for the card's link to the policy page);
        CDS_PUBLIC_URL when set, else what the caller passes (the request's own URL), else the default.
        """
        hook_request = self._resolve(self.parse(service, body))
        based: dict[str, dict[str, Any]] = {}  # appointment-book: the ServiceRequests the Appointments are based on
        if hook_request.hook == "appointment-book":
            references = appointment_references(hook_request)
            based = service_requests(hook_request, references, self.fetcher) if references else {}
        kinds = crd.requested_kinds(hook_request.extension, self.catalogue.crd)
        found = [(pack, findings) for pack in self.packs
                 if (findings := self._findings(hook_request, pack.detector, based))]
        if not found:
            return Evaluation({"cards": []}, hook_request)
        count = sum(len(findings) for _, findings in found)
        if count > limits.MAX_SACROPLASTY_ORDERS:  # each costs a card, a validation, a CRD update
            where = {"order-dispatch": "context.dispatchedOrders",
                     "appointment-book": "context.appointments"}.get(hook_request.hook, "context.draftOrders")
            raise too_large("items", f"{where} holds {count} orders the policies rule on; at most "
                                     f"{limits.MAX_SACROPLASTY_ORDERS} are judged per call", where)
        now = now or datetime.now(timezone.utc)
        ctx = gather(hook_request, self.fetcher)  # once per call, whatever the number of packs
        ruled: list[tuple[Pack, list[Decision]]] = [
            (pack, decide(findings, ctx, pack.policy, now.date())) for pack, findings in found]
        decisions = [d for _, pack_decisions in ruled for d in pack_decisions]
        # The CRD update first: when it validates a whole draft order, the card reuses that answer.
        actions = crd.coverage_actions(decisions, now.date()) if kinds.coverage_info else []
        base_url = self.public_url or base_url or DEFAULT_BASE_URL
        suggest = hook_request.hook not in SCHEDULING_HOOKS
        issued = tuple(pack.cards.build(d, hook_request, now, base_url, for_orderer=suggest)
                       for pack, pack_decisions in ruled for d in pack_decisions) if kinds.alternatives else ()
        if kinds.max_cards is not None:
            issued = issued[:kinds.max_cards]
        response: dict[str, Any] = {"cards": [i.card for i in issued]}
        if actions:
            response["systemActions"] = actions
        return Evaluation(response, hook_request, issued, _logged_decisions(decisions, actions))


def _reference(resource: dict[str, Any]) -> str | None:
    rtype, rid = resource.get("resourceType"), resource.get("id")
    return f"{rtype}/{rid}" if isinstance(rtype, str) and isinstance(rid, str) else None


def _logged_decisions(decisions: list[Decision], actions: list[dict[str, Any]]) -> tuple[dict[str, Any], ...]:
    """What the invocation log keeps of each decision (see Evaluation.decisions)."""
    assertions: dict[tuple[str | None, str], str] = {}  # (order, Coverage reference) → coverage-assertion-id
    for action in actions:
        resource = action["resource"]
        for extension in resource.get("extension") or []:
            if isinstance(extension, dict) and extension.get("url") == crd.COVERAGE_INFORMATION:
                subs = {e.get("url"): e for e in extension.get("extension", []) if isinstance(e, dict)}
                coverage = subs.get("coverage", {}).get("valueReference", {}).get("reference")
                assertion = subs.get("coverage-assertion-id", {}).get("valueString")
                if isinstance(coverage, str) and isinstance(assertion, str):
                    assertions[(_reference(resource), coverage)] = assertion
    logged = []
    for decision in decisions:
        if decision.policy is None:
            continue
        order = _reference(decision.order)
        coverage = crd.coverage_reference(decision.plan.coverage)
        logged.append({"order": order, "covered": "not-covered", "coverage": coverage,
                       "assertion_id": assertions.get((order, coverage)) if coverage else None,
                       "pack": decision.policy.id, "version": decision.policy.version})
    return tuple(logged)
