"""Does the policy apply to this patient, and may chiropractic manipulation be offered?"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from typing import Any

from .patient import PatientContext
from .policy import Policy


@dataclass(frozen=True)
class PlanStatus:
    applies: bool  # False: the patient has active coverage, none with the policy's payer
    coverage: dict[str, Any] | None  # the patient's Coverage with the payer, when known
    note: str | None  # message key in policy.messages for the card detail


@dataclass(frozen=True)
class ChiroStatus:
    offer: bool
    note: str | None  # message key in policy.messages for the card detail
    label_suffix: str = ""


def plan_status(ctx: PatientContext, policy: Policy) -> PlanStatus:
    if "coverage" in ctx.unavailable:
        return PlanStatus(True, None, "coverage_fetch_failed")
    if not ctx.coverages:
        return PlanStatus(True, None, "plan_unknown")
    return PlanStatus(True, ctx.coverages[0], "plan_member")


def chiropractic_status(ctx: PatientContext, policy: Policy, today: date) -> ChiroStatus:
    return ChiroStatus(True, "chiro_unknown", policy.messages["chiro_label_unknown"])
