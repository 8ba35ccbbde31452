"""Da Vinci CRD (Coverage Requirements Discovery) pieces: discovery options, request configuration,
and the coverage-information systemAction that records "not covered" on the order itself."""

from __future__ import annotations

import copy
import uuid
from dataclasses import dataclass
from datetime import date
from typing import Any

from .decide import Decision
from .errors import bad_request
from .policy import Policy

COVERAGE_INFORMATION = "http://hl7.org/fhir/us/davinci-crd/StructureDefinition/ext-coverage-information"
CONFIGURATION = "davinci-crd.configuration"
CONFIGURATION_OPTIONS = "davinci-crd.configuration-options"
VERSION = "davinci-crd.version"
REQUESTED_VERSION = "davinci-crd.requestedVersion"


@dataclass(frozen=True)
class ResponseKinds:
    """Which kinds of response the client wants (all by default)."""

    alternatives: bool = True
    coverage_info: bool = True


def discovery_extension(policy: Policy) -> dict[str, Any]:
    options = [{k: v for k, v in option.items() if k != "response"} for option in policy.crd["options"]]
    return {VERSION: list(policy.crd["versions"]), CONFIGURATION_OPTIONS: options}


def requested_kinds(extension: dict[str, Any], policy: Policy) -> ResponseKinds:
    """Read the request's `davinci-crd.configuration`. Unknown options and non-boolean values are ignored."""
    requested = extension.get(REQUESTED_VERSION)
    if requested is not None and requested not in policy.crd["versions"]:
        raise bad_request(
            f"davinci-crd.requestedVersion {requested!r} is not supported; supported: "
            + ", ".join(policy.crd["versions"]), f"extension.{REQUESTED_VERSION}")
    config = extension.get(CONFIGURATION)
    kinds: dict[str, bool] = {}
    if isinstance(config, dict):
        for option in policy.crd["options"]:
            value = config.get(option["code"])
            if isinstance(value, bool):
                kinds[option["response"].replace("-", "_")] = value
    return ResponseKinds(**kinds)


def _coverage_reference(coverage: dict[str, Any] | None) -> str | None:
    if isinstance(coverage, dict) and isinstance(coverage.get("id"), str) and coverage["id"]:
        return f"Coverage/{coverage['id']}"
    return None


def coverage_actions(decisions: list[Decision], policy: Policy, today: date) -> list[dict[str, Any]]:
    """One `update` systemAction per decision whose patient Coverage with the plan is known.

    The updated resource is the draft order unchanged except for the coverage-information extension;
    every order asserted against the same Coverage in one response shares one coverage-assertion-id.
    """
    assertion_ids: dict[str, str] = {}
    actions = []
    for decision in decisions:
        reference = _coverage_reference(decision.plan.coverage)
        if not reference or not isinstance(decision.order.get("id"), str):
            continue
        assertion_id = assertion_ids.setdefault(reference, str(uuid.uuid4()))
        coverage_information = {
            "url": COVERAGE_INFORMATION,
            "extension": [
                {"url": "coverage", "valueReference": {"reference": reference}},
                {"url": "covered", "valueCode": "not-covered"},
                {"url": "reason", "valueCodeableConcept": {"text": policy.crd["coverage_reason"]}},
                {"url": "date", "valueDate": today.isoformat()},
                {"url": "coverage-assertion-id", "valueString": assertion_id},
            ],
        }
        resource = copy.deepcopy(decision.order)
        kept = [
            e for e in resource.get("extension", []) if isinstance(resource.get("extension"), list)
            and not (isinstance(e, dict) and e.get("url") == COVERAGE_INFORMATION and _covers(e, reference))
        ]
        resource["extension"] = kept + [coverage_information]
        actions.append({
            "type": "update",
            "description": policy.crd["coverage_action_description"],
            "resource": resource,
        })
    return actions


def _covers(extension: dict[str, Any], reference: str) -> bool:
    return any(
        isinstance(sub, dict) and sub.get("url") == "coverage"
        and isinstance(sub.get("valueReference"), dict) and sub["valueReference"].get("reference") == reference
        for sub in extension.get("extension", []) if isinstance(extension.get("extension"), list)
    )
