"""Da Vinci CRD conformance: the coverage-information systemAction, discovery options, request configuration,
and the Propose Alternate Request card (checked against the CRD IG STU 2.1/2.2 and what its test kit checks)."""

from __future__ import annotations

import copy
import re
from datetime import date, datetime, timezone
from typing import Any

import pytest
from conftest import load_fixture
from fhir.resources.R4B.extension import Extension
from fhir.resources.R4B.servicerequest import ServiceRequest

from cds_service.config import Settings
from cds_service.pipeline import crd
from cds_service.pipeline.decide import Decision
from cds_service.pipeline.detect import Match
from cds_service.pipeline.eligibility import PlanStatus
from cds_service.pipeline.policy import PolicyError, load_catalogue, load_policies

SERVICE = {"order-select": "sacroplasty-order-select", "order-sign": "sacroplasty-order-sign"}
FIXTURE = "order-select-sacroplasty-cpt.json"
COVERAGE_INFORMATION = "http://hl7.org/fhir/us/davinci-crd/StructureDefinition/ext-coverage-information"
CARD_TYPE = "http://terminology.hl7.org/CodeSystem/cdshooks-card-type"
# Fixtures with a sacroplasty order the hook judges (each must get a card).
SACROPLASTY_FIXTURES = [
    "order-select-sacroplasty-cpt.json",
    "order-select-sacroplasty-text.json",
    "order-select-sacroplasty-bilateral.json",
    "order-select-vertebroplasty-sacral.json",
    "order-select-kyphoplasty-sacrum-text.json",
    "order-sign-mixed.json",
    "order-select-mixed-selects-sacroplasty.json",
    "sandbox-pama-order-select-sacroplasty.json",
]

# CRD STU 2.2 ext-coverage-information: sub-extension → (value[x] key, min, max); None = unbounded.
SUB_EXTENSIONS: dict[str, tuple[str, int, int | None]] = {
    "coverage": ("valueReference", 1, 1),
    "covered": ("valueCode", 1, 1),
    "pa-needed": ("valueCode", 0, 1),
    "doc-needed": ("valueCode", 0, None),
    "doc-purpose": ("valueCode", 0, None),
    "info-needed": ("valueCode", 0, None),
    "billingCode": ("valueCoding", 0, None),
    "reason": ("valueCodeableConcept", 0, None),
    "dependency": ("valueReference", 0, None),
    "questionnaire": ("valueCanonical", 0, None),
    "date": ("valueDate", 1, 1),
    "coverage-assertion-id": ("valueString", 1, 1),
    "satisfied-pa-id": ("valueString", 0, 1),
}
# Required value sets (CRD STU 2.2).
VALUE_SETS = {
    "covered": {"covered", "not-covered", "conditional", "indeterminate"},
    "pa-needed": {"no-auth", "auth-needed", "satisfied", "performpa", "conditional", "indeterminate"},
    "doc-needed": {"clinical", "admin", "patient", "conditional", "indeterminate"},
    "doc-purpose": {"withpa", "withclaim", "withorder", "retain-doc", "OTH"},
    "info-needed": {"performer", "location", "timeframe", "contract-window", "detail-code", "OTH"},
}
# http://terminology.hl7.org/CodeSystem/cdshooks-card-type (CRD cardType value set).
CARD_TYPES = {
    "coverage-info", "unsolicited-determ", "claim", "insurance", "limits", "network", "appropriate-use", "cost",
    "therapy-alternatives-opt", "therapy-alternatives-req", "clinical-reminder", "duplicate-therapy",
    "contraindication", "guideline", "off-guideline",
}
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


# ---------------------------------------------------------------- helpers

def post(client, body: dict[str, Any]):
    return client.post(f"/cds-services/{SERVICE[body['hook']]}", json=body)


def answer(client, body: dict[str, Any]) -> dict[str, Any]:
    response = post(client, body)
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()


def draft(body: dict[str, Any], index: int = 0) -> dict[str, Any]:
    return body["context"]["draftOrders"]["entry"][index]["resource"]


def prefetched_coverage_reference(body: dict[str, Any]) -> str:
    coverage = body["prefetch"]["coverage"]["entry"][0]["resource"]
    return f"Coverage/{coverage['id']}"


def coverage_extensions(resource: dict[str, Any]) -> list[dict[str, Any]]:
    return [e for e in resource.get("extension", []) if e.get("url") == COVERAGE_INFORMATION]


def subs(extension: dict[str, Any], url: str) -> list[dict[str, Any]]:
    return [s for s in extension["extension"] if s["url"] == url]


def value(extension: dict[str, Any], url: str) -> Any:
    (sub,) = subs(extension, url)
    return sub[SUB_EXTENSIONS[url][0]]


def normalized(data: Any) -> Any:
    """The answer with its generated uuids (card, suggestion, created order, coverage-assertion-id) blanked."""
    if isinstance(data, dict):
        return {k: normalized(v) for k, v in data.items()}
    if isinstance(data, list):
        return [normalized(v) for v in data]
    return "<uuid>" if isinstance(data, str) and UUID.match(data) else data


def order_sign(body: dict[str, Any], *extra_drafts: dict[str, Any]) -> dict[str, Any]:
    """An order-sign request made from an order-select fixture, with more draft orders appended."""
    body = copy.deepcopy(body)
    body["hook"] = "order-sign"
    body["context"].pop("selections", None)
    body["context"]["draftOrders"]["entry"] += [{"resource": copy.deepcopy(d)} for d in extra_drafts]
    return body


def structure_errors(extension: dict[str, Any]) -> list[str]:
    """Structure and required value sets of one ext-coverage-information instance."""
    errors = []
    if extension.get("url") != COVERAGE_INFORMATION or "extension" not in extension:
        return ["not a complex coverage-information extension"]
    if any(k.startswith("value") for k in extension):
        errors.append("a complex extension has no value[x]")
    for sub in extension["extension"]:
        if sub.get("url") not in SUB_EXTENSIONS:
            errors.append(f"unknown sub-extension {sub.get('url')!r}")
            continue
        values = [k for k in sub if k.startswith("value")]
        if values != [SUB_EXTENSIONS[sub["url"]][0]]:
            errors.append(f"{sub['url']}: value[x] {values}")
    for url, (_, low, high) in SUB_EXTENSIONS.items():
        n = len(subs(extension, url))
        if n < low or (high is not None and n > high):
            errors.append(f"{url}: {n} repetitions")
    for url, allowed in VALUE_SETS.items():
        for sub in subs(extension, url):
            if sub.get("valueCode") not in allowed:
                errors.append(f"{url}: {sub.get('valueCode')!r} not in its value set")
    return errors


def invariant_errors(extension: dict[str, Any]) -> list[str]:
    """The ext-coverage-information invariants crd-ci-q1..q9 (STU 2.2.1), as FHIRPath would evaluate them."""
    codes = {url: {s.get("valueCode") for s in subs(extension, url)}
             for url in ("covered", "pa-needed", "doc-needed", "doc-purpose", "info-needed")}
    has = {url: bool(subs(extension, url)) for url in SUB_EXTENSIONS}
    triple = codes["covered"] | codes["pa-needed"] | codes["doc-needed"]
    errors = []
    if has["questionnaire"] and not has["doc-needed"]:
        errors.append("q1")
    if "not-covered" in codes["covered"] and has["pa-needed"]:
        errors.append("q2")
    if "conditional" in triple and not has["info-needed"]:
        errors.append("q3")
    if codes["pa-needed"] & {"satisfied", "noauth", "not-covered"} and "withpa" in codes["doc-purpose"]:
        errors.append("q4")
    if ("satisfied" in codes["pa-needed"]) != has["satisfied-pa-id"]:
        errors.append("q5")
    if "OTH" in codes["info-needed"] and not has["reason"]:
        errors.append("q6")
    if any(not s["valueCodeableConcept"].get("text") for s in subs(extension, "reason")):
        errors.append("q7")  # our reasons carry no codes from the value set, so each needs text
    if codes["doc-purpose"] - {"conditional"} and not has["reason"]:
        errors.append("q8")
    if "indeterminate" in triple and not has["reason"]:
        errors.append("q9")
    return errors


# ---------------------------------------------------------------- the coverage-information systemAction

def test_coverage_information_structure_and_value_sets(client) -> None:
    body = load_fixture(FIXTURE)
    before = datetime.now(timezone.utc).date()
    result = answer(client, body)
    after = datetime.now(timezone.utc).date()
    (action,) = result["systemActions"]
    assert action["type"] == "update"
    assert isinstance(action["description"], str) and action["description"].strip()
    assert "resourceId" not in action
    resource = action["resource"]
    assert (resource["resourceType"], resource["id"]) == ("ServiceRequest", draft(body)["id"])
    (extension,) = coverage_extensions(resource)
    assert structure_errors(extension) == []
    assert value(extension, "coverage") == {"reference": prefetched_coverage_reference(body)}
    assert value(extension, "covered") == "not-covered"
    assert before <= date.fromisoformat(value(extension, "date")) <= after
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", value(extension, "date"))
    assert value(extension, "coverage-assertion-id").strip()
    (reason,) = subs(extension, "reason")
    assert "CCP.1247" in reason["valueCodeableConcept"]["text"]
    Extension.model_validate(extension)


def test_coverage_information_respects_the_invariants(client) -> None:
    (action,) = answer(client, load_fixture(FIXTURE))["systemActions"]
    (extension,) = coverage_extensions(action["resource"])
    assert not subs(extension, "pa-needed")
    assert invariant_errors(extension) == []


@pytest.mark.parametrize("broken,invariant", [
    ({"url": "pa-needed", "valueCode": "no-auth"}, "q2"),
    ({"url": "doc-needed", "valueCode": "conditional"}, "q3"),
    ({"url": "satisfied-pa-id", "valueString": "PA-1"}, "q5"),
    ({"url": "questionnaire", "valueCanonical": "http://example.org/Questionnaire/q"}, "q1"),
])
def test_the_invariant_check_catches_violations(client, broken: dict[str, Any], invariant: str) -> None:
    """The checker used above is not vacuous: one added sub-extension breaks the named invariant."""
    (action,) = answer(client, load_fixture(FIXTURE))["systemActions"]
    extension = copy.deepcopy(coverage_extensions(action["resource"])[0])
    extension["extension"].append(broken)
    assert invariant in invariant_errors(extension)


def test_structure_check_catches_a_code_outside_the_value_set(client) -> None:
    (action,) = answer(client, load_fixture(FIXTURE))["systemActions"]
    extension = copy.deepcopy(coverage_extensions(action["resource"])[0])
    subs(extension, "covered")[0]["valueCode"] = "denied"
    assert structure_errors(extension) == ["covered: 'denied' not in its value set"]


def test_updated_resource_is_the_draft_plus_the_extension(client) -> None:
    body = load_fixture(FIXTURE)
    other = {"url": "http://example.org/StructureDefinition/ehr-flag", "valueBoolean": True}
    draft(body)["extension"] = [other]
    (action,) = answer(client, body)["systemActions"]
    resource = action["resource"]
    without = {k: v for k, v in resource.items() if k != "extension"}
    assert without == {k: v for k, v in draft(body).items() if k != "extension"}
    assert [e for e in resource["extension"] if e.get("url") != COVERAGE_INFORMATION] == [other]
    assert len(coverage_extensions(resource)) == 1
    ServiceRequest.model_validate(resource)


def test_updated_resource_of_a_draft_without_extensions(client) -> None:
    body = load_fixture(FIXTURE)
    assert "extension" not in draft(body)
    (action,) = answer(client, body)["systemActions"]
    resource = dict(action["resource"])
    assert len(coverage_extensions(resource)) == len(resource.pop("extension")) == 1
    assert resource == draft(body)


def test_an_earlier_different_assertion_for_the_same_coverage_is_replaced(client) -> None:
    body = load_fixture(FIXTURE)
    reference = prefetched_coverage_reference(body)
    earlier_same = {"url": COVERAGE_INFORMATION, "extension": [
        {"url": "coverage", "valueReference": {"reference": reference}},
        {"url": "covered", "valueCode": "conditional"},
        {"url": "pa-needed", "valueCode": "auth-needed"},
        {"url": "info-needed", "valueCode": "performer"},
        {"url": "date", "valueDate": "2026-01-02"},
        {"url": "coverage-assertion-id", "valueString": "earlier-1"}]}
    earlier_other = copy.deepcopy(earlier_same)
    earlier_other["extension"][0]["valueReference"]["reference"] = "Coverage/another-plan"
    earlier_other["extension"][-1]["valueString"] = "earlier-2"
    draft(body)["extension"] = [earlier_same, earlier_other]
    (action,) = answer(client, body)["systemActions"]
    extensions = coverage_extensions(action["resource"])
    assert earlier_same not in extensions and earlier_other in extensions
    (ours,) = [e for e in extensions if value(e, "coverage") == {"reference": reference}]
    assert value(ours, "covered") == "not-covered"
    ServiceRequest.model_validate(action["resource"])


def test_no_update_when_the_draft_already_carries_the_same_assertion(client) -> None:
    """CRD resp-35: no systemAction unless something is new; a new date or id is not news."""
    body = load_fixture(FIXTURE)
    (first,) = answer(client, body)["systemActions"]
    (stored,) = coverage_extensions(first["resource"])
    stored = copy.deepcopy(stored)
    subs(stored, "date")[0]["valueDate"] = "2020-01-01"
    subs(stored, "coverage-assertion-id")[0]["valueString"] = "from-an-earlier-call"
    draft(body)["extension"] = [stored]
    again = answer(client, body)
    assert len(again["cards"]) == 1
    assert not again.get("systemActions")


def test_two_orders_same_coverage_share_one_assertion_id(client) -> None:
    body = load_fixture(FIXTURE)
    second = copy.deepcopy(draft(body))
    second["id"] = "sr-sacro-1b"
    second["code"]["coding"][0]["code"] = "0201T"
    result = answer(client, order_sign(body, second))
    actions = result["systemActions"]
    assert [a["resource"]["id"] for a in actions] == [draft(body)["id"], "sr-sacro-1b"]
    ids = {value(e, "coverage-assertion-id") for a in actions for e in coverage_extensions(a["resource"])}
    assert len(ids) == 1
    assert len(result["cards"]) == 2


def test_different_coverages_get_different_assertion_ids() -> None:
    policy = load_policies(Settings().cards_dir)[0]
    body = load_fixture(FIXTURE)
    orders = [dict(draft(body), id=f"sr-{n}") for n in range(3)]
    coverages = [{"resourceType": "Coverage", "id": cid} for cid in ("cov-a", "cov-b", "cov-a")]
    decisions = [Decision(order, Match(rule="code", evidence="test"),
                          PlanStatus(applies=True, coverage=coverage, note=None), {}, policy=policy)
                 for order, coverage in zip(orders, coverages, strict=True)]
    actions = crd.coverage_actions(decisions, date(2026, 1, 2))
    by_coverage: dict[str, set[str]] = {}
    for action in actions:
        (extension,) = coverage_extensions(action["resource"])
        by_coverage.setdefault(value(extension, "coverage")["reference"], set()).add(
            value(extension, "coverage-assertion-id"))
    assert set(by_coverage) == {"Coverage/cov-a", "Coverage/cov-b"}
    assert all(len(ids) == 1 for ids in by_coverage.values())
    assert by_coverage["Coverage/cov-a"] != by_coverage["Coverage/cov-b"]


@pytest.mark.parametrize("coverage", ["absent", "null", "empty-bundle"])
def test_no_system_action_without_a_known_coverage_but_the_card_shows(client, coverage: str) -> None:
    body = load_fixture(FIXTURE)
    body.pop("fhirServer")
    body.pop("fhirAuthorization")
    if coverage == "absent":
        del body["prefetch"]["coverage"]
    else:
        body["prefetch"]["coverage"] = (None if coverage == "null"
                                        else {"resourceType": "Bundle", "type": "searchset", "entry": []})
    result = answer(client, body)
    assert len(result["cards"]) == 1
    assert not result.get("systemActions")


@pytest.mark.parametrize("coverage_id", ["c" * 65, "cov 1", "cov/1", ""])
def test_no_system_action_for_a_coverage_id_that_is_not_a_fhir_id(client, coverage_id: str) -> None:
    """Coverage/id is echoed into every update: a FHIR id (at most 64 characters of [A-Za-z0-9-.]) or none."""
    body = load_fixture(FIXTURE)
    assert answer(client, body).get("systemActions")
    body["prefetch"]["coverage"]["entry"][0]["resource"]["id"] = coverage_id
    result = answer(client, body)
    assert len(result["cards"]) == 1
    assert not result.get("systemActions")


@pytest.mark.parametrize("mutation", ["extension-null", "extension-object", "contained-unknown-type",
                                      "not-fhir-element"])
def test_a_draft_that_is_not_valid_fhir_never_breaks_the_answer(client, mutation: str) -> None:
    body = load_fixture(FIXTURE)
    order = draft(body)
    if mutation == "extension-null":
        order["extension"] = None
    elif mutation == "extension-object":
        order["extension"] = {"url": "http://example.org/x", "valueBoolean": True}
    elif mutation == "contained-unknown-type":
        order["contained"] = [{"resourceType": "NoSuchResource", "id": "x"}]
    else:
        order["vendorField"] = 1
    result = answer(client, body)
    assert len(result["cards"]) == 1
    for action in result.get("systemActions", []):
        ServiceRequest.model_validate(action["resource"])
        assert {k: v for k, v in action["resource"].items() if k != "extension"} == {
            k: v for k, v in order.items() if k != "extension"}
    # null is the only one we can answer without touching anything but the extensions
    assert len(result.get("systemActions", [])) == (1 if mutation == "extension-null" else 0)


@pytest.mark.parametrize("earlier", [False, True])
def test_an_invalid_draft_is_validated_once_unless_an_earlier_assertion_was_removed(client, monkeypatch,
                                                                                    earlier: bool) -> None:
    """Validation is the costliest step: an invalid order that only gains our extension stays invalid, so it
    is not validated again; one that loses an earlier (broken) assertion may have become valid, so it is."""
    body = load_fixture(FIXTURE)
    reference = prefetched_coverage_reference(body)
    broken = {"url": COVERAGE_INFORMATION, "extension": [
        {"url": "coverage", "valueReference": {"reference": reference}}, {"url": "covered", "valueCode": 7}]}
    draft(body)["extension"] = [broken] if earlier else [{"valueString": "no url"}]
    calls = []
    original = crd._valid_r4
    monkeypatch.setattr(crd, "_valid_r4", lambda resource: calls.append(1) or original(resource))
    result = answer(client, body)
    assert len(result["cards"]) == 1
    assert len(calls) == (1 if earlier else 0)
    assert len(result.get("systemActions", [])) == (1 if earlier else 0)


def test_coverage_information_only_for_sacroplasty_orders(client) -> None:
    body = load_fixture("order-sign-mixed.json")
    result = answer(client, body)
    assert [a["resource"]["id"] for a in result["systemActions"]] == ["sr-sacro-2"]


def test_coverage_information_is_never_a_card(client) -> None:
    result = answer(client, load_fixture(FIXTURE))
    assert result["systemActions"]
    assert all(card["source"]["topic"]["code"] != "coverage-info" for card in result["cards"])
    assert all(COVERAGE_INFORMATION not in str(card.get("suggestions", [])) for card in result["cards"])


# ---------------------------------------------------------------- discovery and request configuration

def test_discovery_declares_crd_version_and_configuration_options(client) -> None:
    services = client.get("/cds-services").get_json()["services"]
    assert {s["hook"] for s in services} == set(SERVICE) | {"order-dispatch", "appointment-book"}
    for service in services:
        extension = service["extension"]
        versions = extension["davinci-crd.version"]
        assert versions and all(isinstance(v, str) and re.fullmatch(r"\d+\.\d+", v) for v in versions)
        options = extension["davinci-crd.configuration-options"]
        assert {o["code"] for o in options} == {"coverage-info", "therapy-alternatives-opt", "max-cards"}
        for option in options:
            assert set(option) == {"code", "type", "name", "description", "default"}
            if option["code"] == "max-cards":  # the guide's example option (CRDServices.json)
                assert option["type"] == "integer" and option["default"] == 10
                continue
            assert option["code"] in CARD_TYPES
            assert option["type"] == "boolean" and option["default"] is True
            assert option["name"].strip() and option["description"].strip()
        for key in ("code", "name", "description"):
            assert len({o[key] for o in options}) == len(options), key


@pytest.mark.parametrize("option", [
    {"code": "cost", "type": "boolean", "name": "Cost", "description": "d", "default": True, "response": "cost"},
    {"code": "cost", "type": "boolean", "name": "Cost", "description": "d", "response": "coverage-info"},
])
def test_a_policy_option_that_switches_nothing_or_lacks_a_default_is_refused(option: dict[str, Any]) -> None:
    config = load_catalogue(Settings().cards_dir).crd
    broken = {**config, "options": [*config["options"], option]}
    with pytest.raises(PolicyError):
        crd.discovery_extension(broken)


def configured(body: dict[str, Any], configuration: Any) -> dict[str, Any]:
    body = copy.deepcopy(body)
    body.setdefault("extension", {})["davinci-crd.configuration"] = configuration
    return body


def test_coverage_info_off_removes_only_the_system_action(client) -> None:
    body = load_fixture(FIXTURE)
    default = answer(client, body)
    off = answer(client, configured(body, {"coverage-info": False}))
    assert default["systemActions"] and "systemActions" not in off
    assert normalized(off["cards"]) == normalized(default["cards"]) != []


def test_alternatives_off_removes_only_the_card(client) -> None:
    body = load_fixture(FIXTURE)
    default = answer(client, body)
    off = answer(client, configured(body, {"therapy-alternatives-opt": False}))
    assert default["cards"] and off["cards"] == []
    assert normalized(off["systemActions"]) == normalized(default["systemActions"]) != []


def test_everything_off_returns_nothing_and_true_is_the_default(client) -> None:
    body = load_fixture(FIXTURE)
    assert answer(client, configured(body, {"coverage-info": False, "therapy-alternatives-opt": False})) == {
        "cards": []}
    both_on = answer(client, configured(body, {"coverage-info": True, "therapy-alternatives-opt": True}))
    assert normalized(both_on) == normalized(answer(client, body))


@pytest.mark.parametrize("change", [
    "unknown-options", "wrongly-typed-option", "configuration-not-object", "unknown-context-keys",
    "unknown-top-level-keys", "unknown-extension-keys", "extension-not-object",
])
def test_unknown_things_are_ignored(client, change: str) -> None:
    body = load_fixture(FIXTURE)
    baseline = answer(client, body)
    changed = copy.deepcopy(body)
    if change == "unknown-options":
        changed = configured(body, {"max-cards": 1, "cost": False, "x-vendor-option": {"a": 1}})
    elif change == "wrongly-typed-option":
        changed = configured(body, {"coverage-info": "false", "therapy-alternatives-opt": 0})
    elif change == "configuration-not-object":
        changed = configured(body, [{"code": "nothing", "value": False}])
    elif change == "unknown-context-keys":
        changed["context"]["x-vendor-context"] = {"anything": [1, 2]}
        changed["context"]["dispatchedOrders"] = ["ServiceRequest/sr-sacro-1"]
    elif change == "unknown-top-level-keys":
        changed["x-vendor"] = "value"
        changed["extension"] = {"com.example.thing": True}
    elif change == "unknown-extension-keys":
        changed["extension"] = {"davinci-crd.somethingElse": 1, "davinci-crd.configuration": {}}
    else:
        changed["extension"] = "not an object"
    assert normalized(answer(client, changed)) == normalized(baseline)


def test_supported_requested_versions_are_accepted(client) -> None:
    services = client.get("/cds-services").get_json()["services"]
    versions = services[0]["extension"]["davinci-crd.version"]
    body = load_fixture(FIXTURE)
    baseline = normalized(answer(client, body))
    for version in versions + [versions[-1] + ".1"]:  # a patch level asks for the same version
        requested = copy.deepcopy(body)
        requested["extension"] = {"davinci-crd.requestedVersion": version}
        assert normalized(answer(client, requested)) == baseline, version


@pytest.mark.parametrize("fixture", [FIXTURE, "order-select-mixed-selects-ct.json"])
@pytest.mark.parametrize("version", ["1.0", "3.0", "2", "", 2.2, None, ["2.2"], {"v": "2.2"}])
def test_unsupported_requested_version_is_a_400(client, fixture: str, version: Any) -> None:
    body = load_fixture(fixture)
    body["extension"] = {"davinci-crd.requestedVersion": version}
    response = post(client, body)
    if version is None:  # JSON null: not requested
        assert response.status_code == 200
        return
    assert response.status_code == 400
    assert response.is_json
    error = response.get_json()
    assert error["error"] == "invalid_request"
    assert error["field"] == "extension.davinci-crd.requestedVersion"
    assert "not supported" in error["message"]


# ---------------------------------------------------------------- the Propose Alternate Request card

def test_card_topic_is_therapy_alternatives_opt(client) -> None:
    (card,) = answer(client, load_fixture(FIXTURE))["cards"]
    topic = card["source"]["topic"]
    assert topic == {"system": CARD_TYPE, "code": "therapy-alternatives-opt",
                     "display": "Optional Therapy Alternatives"}
    assert isinstance(card["source"]["label"], str) and card["source"]["label"].strip()


@pytest.mark.parametrize("fixture", SACROPLASTY_FIXTURES)
def test_alternatives_card_is_a_propose_alternate_request(client, fixture: str) -> None:
    body = load_fixture(fixture)
    drafts = {f"{r['resourceType']}/{r['id']}": r for r in
              (e["resource"] for e in body["context"]["draftOrders"]["entry"])}
    cards = answer(client, body)["cards"]
    assert cards
    for card in cards:
        assert "links" not in card
        assert UUID.match(card["uuid"])
        assert len(card["summary"]) < 140
        assert card["indicator"] in {"info", "warning", "critical"}
        assert card["selectionBehavior"] in {"at-most-one", "any"}
        assert card["suggestions"]
        for suggestion in card["suggestions"]:
            assert suggestion["label"].strip() and UUID.match(suggestion["uuid"])
            actions = suggestion["actions"]
            assert sorted(a["type"] for a in actions) == ["create", "delete"]
            (delete,) = [a for a in actions if a["type"] == "delete"]
            (create,) = [a for a in actions if a["type"] == "create"]
            assert all(isinstance(a["description"], str) and a["description"].strip() for a in actions)
            assert delete["resourceId"] in drafts and "resource" not in delete
            assert "resourceId" not in create
            assert create["resource"]["resourceType"] == delete["resourceId"].split("/")[0]
        assert card["extension"]["davinci-crd.associated-resource"] == [
            {"reference": card["suggestions"][0]["actions"][0]["resourceId"]}]


@pytest.mark.parametrize("fixture", SACROPLASTY_FIXTURES)
def test_created_orders_carry_what_the_crd_profile_requires(client, fixture: str) -> None:
    body = load_fixture(fixture)
    created = [a["resource"] for card in answer(client, body)["cards"] for s in card["suggestions"]
               for a in s["actions"] if a["type"] == "create"]
    assert created
    for resource in created:
        for element in ("status", "intent", "code", "subject", "authoredOn", "requester"):
            assert resource.get(element), element
        assert resource["status"] == "draft"  # CRD 2.0.1 fixes it; 2.2 expects it for order-select/sign
        assert resource["subject"]["reference"] == f"Patient/{body['context']['patientId']}"
        assert re.match(r"^(Practitioner|PractitionerRole)/", resource["requester"]["reference"])
        assert resource["code"]["coding"]
        ServiceRequest.model_validate(resource)


def test_each_card_names_its_order_in_the_detail(client) -> None:
    """CRD dev-24: with several orders, each card says in `detail`, in human terms, which order it is about."""
    body = load_fixture(FIXTURE)
    second = copy.deepcopy(draft(body))
    second["id"] = "sr-sacro-1b"
    second["code"] = {"coding": second["code"]["coding"], "text": "Sacroplasty [right] *urgent*"}
    cards = answer(client, order_sign(body, second))["cards"]
    assert len(cards) == 2
    assert draft(body)["code"]["text"] in cards[0]["detail"]
    assert "Sacroplasty \\[right\\] \\*urgent\\*" in cards[1]["detail"]
    assert "Sacroplasty [right]" not in cards[0]["detail"]


def test_an_order_without_id_gets_no_create_only_suggestions(client) -> None:
    """Propose Alternate Request (crd-respar-1): delete + create, never a lone create."""
    body = order_sign(load_fixture(FIXTURE))
    del draft(body)["id"]
    result = answer(client, body)
    (card,) = result["cards"]
    assert "suggestions" not in card and "selectionBehavior" not in card and "links" not in card
    assert not result.get("systemActions")
