"""A pack's example table (cards/<pack>/examples.json): each case a hook call with the answer the policy expects,
run through the Evaluator with that pack alone — how `cds-service check-policy` proves a policy edit without a
server or a database."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, time, timezone
from pathlib import Path
from typing import Any

from cds_service.errors import ApiError
from cds_service.pipeline import schema
from cds_service.pipeline.cards import IssuedCard
from cds_service.pipeline.evaluate import Evaluator
from cds_service.pipeline.policy import Catalogue, Policy, PolicyError, ServiceConfig

EXAMPLE_PATIENT = "example-patient"


@dataclass(frozen=True)
class ExampleResult:
    name: str
    why: str
    problem: str | None  # what differs from the expected answer; None when the case passes


def example_request(case: Any, number: int) -> dict[str, Any]:
    """The hook request of one example: its orders as draft ServiceRequests (ids, status, subject filled in when
    the example leaves them out), its prefetch lists wrapped in Bundles."""
    orders = [{"resourceType": "ServiceRequest", "id": f"example-order-{i}", "status": "draft", "intent": "order",
               "subject": {"reference": f"Patient/{EXAMPLE_PATIENT}"}, **order}
              for i, order in enumerate(case.orders, start=1)]
    context: dict[str, Any] = {
        "userId": "Practitioner/example-clinician",
        "patientId": EXAMPLE_PATIENT,
        "draftOrders": {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": o} for o in orders]},
    }
    if case.hook == "order-select":
        context["selections"] = [f"ServiceRequest/{o['id']}" for o in orders]
    body: dict[str, Any] = {"hookInstance": str(uuid.uuid5(uuid.NAMESPACE_URL, f"example-{number}")),
                            "hook": case.hook, "context": context}
    if case.prefetch is not None:
        body["prefetch"] = {key: {"resourceType": "Bundle", "type": "searchset",
                                  "entry": [{"resource": r} for r in value]} if isinstance(value, list) else value
                            for key, value in case.prefetch.items()}
    return body


def judge(case: Any, cards: list[IssuedCard]) -> str | None:
    """What differs between the example's expected answer and the cards of its pack; None when nothing."""
    expected = case.expected
    if not expected.card:
        return f"expected no card, got {len(cards)}" if cards else None
    if not cards:
        return "expected a card, got none"
    match = cards[0].decision.match
    if expected.rule is not None and expected.rule not in (match.rule, match.evidence):
        return f"expected rule {expected.rule!r}, got {match.rule!r} ({match.evidence})"
    offered = sorted({alternative for card in cards for alternative in card.suggestions.values()})
    if expected.offered is not None and sorted(set(expected.offered)) != offered:
        return f"expected offered {sorted(set(expected.offered))}, got {offered}"
    wrongly = sorted(set(expected.not_offered) & set(offered))
    if wrongly:
        return f"offered {wrongly}, expected not"
    return None


def run_examples(path: Path, policy: Policy, services: tuple[ServiceConfig, ...],
                 crd_config: dict[str, Any]) -> list[ExampleResult]:
    """Every case of the table at `path`, judged with `policy` alone. Raises PolicyError for a malformed table."""
    table = schema.parse(schema.ExamplesFile, path)
    known = {a.id for a in policy.alternatives}
    problems = [f"{path}: cases[{i}].expected.{key}: {name!r} is no orderable alternative of alternatives.json"
                for i, case in enumerate(table.cases) for key in ("offered", "not_offered")
                for name in getattr(case.expected, key) or () if name not in known]
    if problems:
        raise PolicyError.of(problems)
    evaluator = Evaluator(Catalogue(services, crd_config, (policy,)), max_draft_orders=100)
    by_hook = {s.hook: s for s in evaluator.services.values()}
    results = []
    for number, case in enumerate(table.cases, start=1):
        today = datetime.strptime(case.today or table.today, "%Y-%m-%d").date()
        now = datetime.combine(today, time(12), timezone.utc)
        try:
            evaluation = evaluator.evaluate(by_hook[case.hook], example_request(case, number), now=now)
            problem = judge(case, [c for c in evaluation.issued if c.policy is policy])
        except ApiError as exc:
            problem = f"the request was refused: {exc.message}"
        results.append(ExampleResult(case.name, case.why, problem))
    return results
