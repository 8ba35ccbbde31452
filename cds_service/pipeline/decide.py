"""Parsed hook context + patient context → one decision per sacroplasty order."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from functools import cached_property
from typing import Any

from cds_service.pipeline.detect import Detector, Match
from cds_service.pipeline.eligibility import PlanStatus, patient_contraindications, plan_status
from cds_service.pipeline.hooks import HookRequest
from cds_service.pipeline.patient import PatientContext
from cds_service.pipeline.policy import Policy
from cds_service.pipeline.rules import RULES, RuleStatus
from cds_service.pipeline.validation import order_errors


@dataclass(frozen=True)
class Finding:
    order: dict[str, Any]
    match: Match


@dataclass(frozen=True)
class Decision:
    order: dict[str, Any]
    match: Match
    plan: PlanStatus
    rules: dict[str, RuleStatus]  # rule name (alternatives.json `rule`) → its answer for this order
    contraindications: frozenset[str] = frozenset()  # kinds recorded (conditions.json): withhold alternatives
    policy: Policy | None = None  # the pack that ruled

    @cached_property
    def order_is_valid(self) -> bool:
        """Is the draft order, as sent, valid FHIR R4? Checked at most once per call: fhir.resources
        validation is the costliest step of a sacroplasty call, and what the card's replacement orders and
        the CRD update copy from a valid order needs no validation of its own."""
        return order_errors(self.order) == 0

    @property
    def known_valid(self) -> bool:
        """True when `order_is_valid` has been checked already (for the CRD update) and held. Never checks:
        a card that only needs the few elements its replacement orders copy validates just those, which
        costs half as much as the whole order."""
        return self.__dict__.get("order_is_valid") is True  # where cached_property keeps its value


def find_sacroplasty(hook_request: HookRequest, detector: Detector) -> list[Finding]:
    """The orders to judge that are sacroplasties, in request order."""
    findings = []
    for order in hook_request.orders:
        match = detector.match(order)
        if match:
            findings.append(Finding(order, match))
    return findings


def _based_on(appointment: dict[str, Any]) -> list[str]:
    refs = appointment.get("basedOn")
    return [r["reference"] for r in refs if isinstance(r, dict) and isinstance(r.get("reference"), str)
            and r["reference"].startswith("ServiceRequest/")] if isinstance(refs, list) else []


def appointment_references(hook_request: HookRequest) -> list[str]:
    """The ServiceRequests the proposed Appointments are based on, each once."""
    return list(dict.fromkeys(r for a in hook_request.appointments for r in _based_on(a)))


def find_booked(hook_request: HookRequest, detector: Detector,
                based: dict[str, dict[str, Any]]) -> list[Finding]:
    """appointment-book: an Appointment is for a sacroplasty when a ServiceRequest it is based on is one (the
    finding is then on that ServiceRequest: CRD puts coverage information on the order when there is one), else
    when its own serviceType or reasonCode names one (the finding is on the Appointment)."""
    findings: list[Finding] = []
    seen: set[int] = set()
    for appointment in hook_request.appointments:
        orders = [based[r] for r in _based_on(appointment) if r in based]
        hits = [Finding(o, m) for o in orders if (m := detector.match(o))]
        if not hits:
            concepts = [c for key in ("serviceType", "reasonCode") for c in (appointment.get(key) or [])
                        if isinstance(c, dict)] if isinstance(appointment.get("serviceType", []), list) and \
                isinstance(appointment.get("reasonCode", []), list) else []
            match = next((m for c in concepts
                          if (m := detector.match({"resourceType": "ServiceRequest", "code": c}))), None)
            hits = [Finding(appointment, match)] if match else []
        for hit in hits:
            if id(hit.order) not in seen:
                seen.add(id(hit.order))
                findings.append(hit)
    return findings


def decide(findings: list[Finding], ctx: PatientContext, policy: Policy, today: date) -> list[Decision]:
    """Decisions for the findings the policy applies to (none when the patient is in another plan)."""
    plan = plan_status(ctx, policy)
    if not plan.applies:
        return []
    # The patient's part once per call; each order adds its own code text and reasons.
    recorded = patient_contraindications(ctx, policy)
    rules = {name: RULES[name](ctx, policy, today) for name in policy.rule_names}
    decisions = []
    for finding in findings:
        kinds = recorded.for_order(finding.order)
        statuses = {name: rule.for_order(finding.order, policy, kinds) for name, rule in rules.items()}
        decisions.append(Decision(finding.order, finding.match, plan, statuses, kinds, policy))
    return decisions
