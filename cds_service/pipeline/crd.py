"""Da Vinci CRD (Coverage Requirements Discovery) pieces: discovery options, request configuration,
and the coverage-information systemAction that records "not covered" on the order itself.

Coverage information travels only as a systemAction (CRD resp-25: never as a card). It is asserted only
for the orders our policy rules on; an order gets it only when the patient's Coverage with the plan is
known, because the extension's `coverage` sub-extension is required.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, fields
from datetime import date
from typing import Any

import orjson

from cds_service.errors import bad_request
from cds_service.pipeline.cards import new_ids
from cds_service.pipeline.decide import Decision
from cds_service.pipeline.patient import FHIR_ID
from cds_service.pipeline.policy import Policy, PolicyError
from cds_service.pipeline.validation import order_errors

log = logging.getLogger(__name__)

COVERAGE_INFORMATION = "http://hl7.org/fhir/us/davinci-crd/StructureDefinition/ext-coverage-information"
CONFIGURATION = "davinci-crd.configuration"
CONFIGURATION_OPTIONS = "davinci-crd.configuration-options"
VERSION = "davinci-crd.version"
REQUESTED_VERSION = "davinci-crd.requestedVersion"

# Sub-extensions that change with every assertion without saying anything new about coverage.
_PER_ASSERTION = ("date", "coverage-assertion-id")
# Keys of a configuration option that are published in discovery (the rest is internal).
_OPTION_KEYS = ("code", "type", "name", "description", "default")


@dataclass(frozen=True)
class ResponseKinds:
    """Which kinds of response the client wants (all by default)."""

    alternatives: bool = True
    coverage_info: bool = True
    max_cards: int | None = None  # the guide's `max-cards` option, clamped to [0, MAX_CARDS]


MAX_CARDS = 100  # a larger max-cards asks for nothing more: no call issues more (limits.MAX_SACROPLASTY_ORDERS)


_KINDS = {f.name for f in fields(ResponseKinds)}


def _kind(option: dict[str, Any]) -> str:
    """The ResponseKinds field an option switches (policy.json `response`, e.g. "coverage-info")."""
    kind = str(option.get("response", "")).replace("-", "_")
    if kind not in _KINDS:
        raise PolicyError(f"crd option {option.get('code')!r}: unknown response kind {option.get('response')!r}")
    return kind


def discovery_extension(crd_config: dict[str, Any]) -> dict[str, Any]:
    """`davinci-crd.version` and `davinci-crd.configuration-options` for a service's discovery entry
    (cards/services.json `crd`)."""
    options = []
    for option in crd_config["options"]:
        _kind(option)  # a policy whose option switches nothing must not start
        missing = [key for key in _OPTION_KEYS if key not in option]
        if missing:  # CRD dev-4: code, type, name, description and a default, always
            raise PolicyError(f"crd option {option.get('code')!r}: missing {', '.join(missing)}")
        options.append({key: option[key] for key in _OPTION_KEYS})
    return {VERSION: list(crd_config["versions"]), CONFIGURATION_OPTIONS: options}


def _major_minor(version: str) -> str:
    """CRD versions are compared on their first two parts: "2.2.1" asks for "2.2"."""
    return ".".join(version.strip().split(".")[:2])


def requested_kinds(extension: dict[str, Any], crd_config: dict[str, Any]) -> ResponseKinds:
    """Read the request's `davinci-crd.requestedVersion` and `davinci-crd.configuration`.

    An unsupported requested version is an error (the IG: the server SHALL return an error). Unknown
    configuration options, and values that are not of the option's type, are ignored (CRD dev-17).
    """
    requested = extension.get(REQUESTED_VERSION)
    if requested is not None:
        if not isinstance(requested, str) or _major_minor(requested) not in crd_config["versions"]:
            shown = repr(requested) if isinstance(requested, str) and len(requested) <= 20 else "of this form"
            raise bad_request(
                f"davinci-crd.requestedVersion {shown} is not supported; supported: "
                + ", ".join(crd_config["versions"]), f"extension.{REQUESTED_VERSION}")
    config = extension.get(CONFIGURATION)
    kinds: dict[str, bool] = {}
    max_cards: int | None = None
    if isinstance(config, dict):
        for option in crd_config["options"]:
            value = config.get(option["code"])
            kind = _kind(option)
            if kind == "max_cards":
                # An integer (a boolean is not one), clamped; another type is ignored like any ill-typed option.
                if isinstance(value, int) and not isinstance(value, bool):
                    max_cards = min(max(value, 0), MAX_CARDS)
            elif isinstance(value, bool):
                kinds[kind] = value
        # A what-if call (`unsolicited-determ`, or any other option not offered here) is answered as any other
        # call: the guide lets a server ignore options it does not know (dev-17).
    return ResponseKinds(**kinds, max_cards=max_cards)


def coverage_reference(coverage: dict[str, Any] | None) -> str | None:
    """Coverage/id, echoed into every update: only for an id that is one (FHIR: at most 64 characters)."""
    if isinstance(coverage, dict) and isinstance(coverage.get("id"), str) and FHIR_ID.fullmatch(coverage["id"]):
        return f"Coverage/{coverage['id']}"
    return None


def _sub_extensions(extension: Any) -> list[dict[str, Any]]:
    subs = extension.get("extension") if isinstance(extension, dict) else None
    return [s for s in subs if isinstance(s, dict)] if isinstance(subs, list) else []


def _refers_to(extension: Any, reference: str) -> bool:
    """Is this a coverage-information extension about the Coverage `reference` (relative or absolute)?"""
    if not isinstance(extension, dict) or extension.get("url") != COVERAGE_INFORMATION:
        return False
    for sub in _sub_extensions(extension):
        value = sub.get("valueReference")
        target = value.get("reference") if isinstance(value, dict) else None
        if sub.get("url") == "coverage" and isinstance(target, str):
            return target == reference or target.endswith("/" + reference)
    return False


def _assertion(extension: Any) -> list[str]:
    """What an assertion says, without its date and id: two equal ones carry the same information."""
    return sorted(json.dumps(sub, sort_keys=True) for sub in _sub_extensions(extension)
                  if sub.get("url") not in _PER_ASSERTION)


def coverage_information(reference: str, policy: Policy, assertion_id: str, today: date) -> dict[str, Any]:
    """The ext-coverage-information saying the order is not covered under the policy.

    No `pa-needed` (invariant crd-ci-q2: not with not-covered); `reason` has text (crd-ci-q7).
    """
    return {
        "url": COVERAGE_INFORMATION,
        "extension": [
            {"url": "coverage", "valueReference": {"reference": reference}},
            {"url": "covered", "valueCode": "not-covered"},
            {"url": "reason", "valueCodeableConcept": {"text": policy.crd["coverage_reason"]}},
            {"url": "date", "valueDate": today.isoformat()},
            {"url": "coverage-assertion-id", "valueString": assertion_id},
        ],
    }


def _valid_r4(resource: dict[str, Any]) -> bool:
    errors = order_errors(resource)
    if errors:  # only a count is logged: details can quote patient data
        log.warning("coverage-information update left out: the draft order is not valid FHIR R4 (%d error(s))",
                    errors)
        return False
    return True


def _assertion_id(assertion_ids: dict[str, str], reference: str) -> str:
    """The coverage-assertion-id of every assertion against Coverage `reference` in this response: a new
    UUID the first time (cards.new_ids: str(uuid.uuid4())'s format, without a UUID object)."""
    assertion_id = assertion_ids.get(reference)
    if assertion_id is None:
        assertion_id = assertion_ids[reference] = next(new_ids(1))
    return assertion_id


def coverage_actions(decisions: list[Decision], today: date) -> list[dict[str, Any]]:
    """One `update` systemAction per order that has an id and whose Coverage with a ruling pack's payer is
    known, carrying the assertion of every pack that ruled on it (each decision knows its pack).

    The updated resource is the draft order unchanged except for its coverage-information extensions
    (CRD resp-37): ours replace any earlier ones about the same Coverage, others are kept. Every order
    asserted against the same Coverage in one response shares one coverage-assertion-id (resp-32/33).
    No action when the draft already carries the same assertions (resp-35: nothing new), or when the
    result would not be valid FHIR R4 (resp-47; we may not repair the client's other elements).
    """
    assertion_ids: dict[str, str] = {}
    by_order: dict[str, list[tuple[Decision, str]]] = {}
    for decision in decisions:
        reference = coverage_reference(decision.plan.coverage)
        order_id = decision.order.get("id")
        if reference and isinstance(order_id, str) and order_id and decision.policy is not None:
            by_order.setdefault(order_id, []).append((decision, reference))
    actions = []
    for ruled in by_order.values():
        first, _ = ruled[0]
        order = first.order
        ours = [coverage_information(reference, decision.policy, _assertion_id(assertion_ids, reference), today)
                for decision, reference in ruled if decision.policy is not None]
        references = {reference for _, reference in ruled}
        existing = order.get("extension", [])
        existing = [] if existing is None else existing
        if not isinstance(existing, list):
            log.warning("coverage-information update left out: the draft order's extension is not a list")
            continue
        earlier = [e for e in existing if any(_refers_to(e, r) for r in references)]
        if earlier and sorted(map(_assertion, earlier)) == sorted(map(_assertion, ours)):
            continue
        resource = orjson.loads(orjson.dumps(order))  # a deep copy, 8x faster than copy.deepcopy
        resource["extension"] = [e for e in resource.get("extension") or []
                                 if not any(_refers_to(e, r) for r in references)] + ours
        # Only coverage-information extensions changed, ours valid by construction: a valid order stays valid.
        # An invalid one stays invalid when ours were only appended to its (non-empty) extensions: nothing of
        # it was removed, so it is not validated a second time (the costliest step, bounded by the caps).
        if not first.order_is_valid:
            if not earlier and existing:
                log.warning("coverage-information update left out: the draft order is not valid FHIR R4")
                continue
            if not _valid_r4(resource):
                continue
        descriptions = dict.fromkeys(d.policy.crd["coverage_action_description"] for d, _ in ruled if d.policy)
        actions.append({"type": "update", "description": " ".join(descriptions), "resource": resource})
    return actions
