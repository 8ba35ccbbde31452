"""Parsed hook context + patient context → one decision per sacroplasty order."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from typing import Any

from .detect import Detector, Match
from .eligibility import ChiroStatus, PlanStatus, chiropractic_status, plan_status
from .hooks import HookRequest
from .patient import PatientContext
from .policy import Policy


@dataclass(frozen=True)
class Finding:
    order: dict[str, Any]
    match: Match


@dataclass(frozen=True)
class Decision:
    order: dict[str, Any]
    match: Match
    plan: PlanStatus
    chiropractic: ChiroStatus


def find_sacroplasty(hook_request: HookRequest, detector: Detector) -> list[Finding]:
    """The orders to judge that are sacroplasties, in request order."""
    findings = []
    for order in hook_request.orders:
        match = detector.match(order)
        if match:
            findings.append(Finding(order, match))
    return findings


def decide(findings: list[Finding], ctx: PatientContext, policy: Policy, today: date) -> list[Decision]:
    """Decisions for the findings the policy applies to (none when the patient is in another plan)."""
    plan = plan_status(ctx, policy)
    if not plan.applies:
        return []
    chiro = chiropractic_status(ctx, policy, today)
    return [Decision(f.order, f.match, plan, chiro) for f in findings]
