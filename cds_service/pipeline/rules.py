"""Conditional rules a pack's alternative can name (alternatives.json `rule`), by name.

A rule decides, per sacroplasty order, whether its alternative is offered as a one-click order, with which label
suffix, and which note the card detail carries. A pack uses a rule by naming it; a pack naming a rule that is
not here fails validation at load. Adding a rule is a code change here, reviewed as a clinical change.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import date
from typing import Any, Protocol

from cds_service.pipeline.eligibility import ChiroStatus, patient_chiropractic
from cds_service.pipeline.patient import PatientContext
from cds_service.pipeline.policy import Policy

RuleStatus = ChiroStatus  # offer, note (a message key), label_suffix


class PatientRule(Protocol):
    """A rule's patient-level part, computed once per call."""

    def for_order(self, order: dict[str, Any] | None, policy: Policy,
                  contraindications: frozenset[str] = frozenset()) -> RuleStatus: ...


RuleFactory = Callable[[PatientContext, Policy, date], PatientRule]

RULES: dict[str, RuleFactory] = {
    # Policy CCP.1247: "Chiropractic manipulation in the first four weeks if there is no radiculopathy."
    "chiropractic-first-four-weeks": patient_chiropractic,
}
