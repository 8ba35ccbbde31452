"""Card schema and content, per CDS Hooks 2.0 and the policy data; and no suggestion loops back."""

from __future__ import annotations

import copy
import uuid

import pytest
from conftest import load_fixture
from fhir.resources.R4B.servicerequest import ServiceRequest
from test_api import EXPECTED, SERVICE, post

from cds_service.config import Settings
from cds_service.pipeline.policy import load_policies

POLICY = load_policies(Settings().cards_dir)[0]
CARD_FIXTURES = sorted(name for name, orders in EXPECTED.items() if orders)


def cards_for(client, name: str) -> tuple[dict, list[dict]]:
    request = load_fixture(name)
    return request, post(client, request).get_json()["cards"]


@pytest.mark.parametrize("name", CARD_FIXTURES)
def test_card_schema(client, name: str) -> None:
    request, cards = cards_for(client, name)
    assert cards
    for card in cards:
        assert len(card["summary"]) < 140
        assert card["indicator"] == "warning"
        assert card["source"]["label"] and card["source"]["url"].startswith("https://")
        assert card["source"]["topic"]["system"] == "http://terminology.hl7.org/CodeSystem/cdshooks-card-type"
        assert card["selectionBehavior"] == "at-most-one"
        assert "links" not in card
        assert card["detail"].strip()
        for reason in card["overrideReasons"]:
            assert reason["system"] and reason["code"] and reason["display"]
        for suggestion in card["suggestions"]:
            assert suggestion["label"]
            types = [a["type"] for a in suggestion["actions"]]
            assert types == ["delete", "create"]
            assert all(a["description"] for a in suggestion["actions"])


@pytest.mark.parametrize("name", CARD_FIXTURES)
def test_uuids_unique_per_response(client, name: str) -> None:
    _, cards = cards_for(client, name)
    ids = [c["uuid"] for c in cards] + [s["uuid"] for c in cards for s in c["suggestions"]]
    ids += [a["resource"]["id"] for c in cards for s in c["suggestions"] for a in s["actions"] if "resource" in a]
    assert len(ids) == len(set(ids))
    for value in [c["uuid"] for c in cards] + [s["uuid"] for c in cards for s in c["suggestions"]]:
        uuid.UUID(value)


@pytest.mark.parametrize("name", CARD_FIXTURES)
def test_created_orders_validate_as_r4_servicerequest(client, name: str) -> None:
    request, cards = cards_for(client, name)
    for card in cards:
        for suggestion in card["suggestions"]:
            created = [a["resource"] for a in suggestion["actions"] if a["type"] == "create"]
            assert len(created) == 1
            resource = ServiceRequest.model_validate(created[0])
            assert resource.status == "draft"
            assert resource.subject.reference == f"Patient/{request['context']['patientId']}"
            assert resource.requester and resource.authoredOn and resource.intent
            assert POLICY.number in resource.note[0].text


def test_delete_names_the_sacroplasty_draft_and_create_keeps_its_context(client) -> None:
    request, cards = cards_for(client, "order-sign-mixed.json")
    draft = next(e["resource"] for e in request["context"]["draftOrders"]["entry"]
                 if e["resource"]["id"] == "sr-sacro-2")
    for suggestion in cards[0]["suggestions"]:
        delete, create = suggestion["actions"]
        assert delete["resourceId"] == "ServiceRequest/sr-sacro-2"
        created = create["resource"]
        for key in ("subject", "encounter", "requester", "authoredOn"):
            assert created[key] == draft[key], key
        assert "reasonReference" not in created  # a reason is copied only where it fits (test_card_safety.py)


def test_missing_requester_and_date_come_from_context(client) -> None:
    request, cards = cards_for(client, "sandbox-pama-order-select-sacroplasty.json")
    created = cards[0]["suggestions"][0]["actions"][1]["resource"]
    assert created["requester"] == {"reference": request["context"]["userId"]}
    assert created["authoredOn"][:4].isdigit()


def test_one_suggestion_per_orderable_alternative_with_codes(client) -> None:
    _, cards = cards_for(client, "order-select-sacroplasty-cpt.json")
    suggestions = cards[0]["suggestions"]
    offered = {s["actions"][1]["resource"]["code"]["coding"][0]["code"] for s in suggestions}
    expected = {a.codings[0]["code"] for a in POLICY.alternatives}
    chiropractic = {a.codings[0]["code"] for a in POLICY.alternatives if a.rule == "chiropractic-first-four-weeks"}
    assert expected - chiropractic <= offered <= expected
    for suggestion in suggestions:
        codings = suggestion["actions"][1]["resource"]["code"]["coding"]
        assert any(c["system"] == "http://www.ama-assn.org/go/cpt" for c in codings)


def test_detail_carries_policy_identity_and_the_other_alternatives(client) -> None:
    _, cards = cards_for(client, "order-select-sacroplasty-cpt.json")
    card = cards[0]
    detail = card["detail"]
    assert POLICY.number in detail and POLICY.revision_date in detail
    assert f"/policies/{POLICY.id})" in detail
    for other in POLICY.also_covered:
        assert other.card_text in detail
    assert "investigational" in detail
    identity = card["extension"]["cds-sacroplasty.policy"]
    assert identity == POLICY.identity
    assert card["extension"]["davinci-crd.associated-resource"] == [{"reference": "ServiceRequest/sr-sacro-1"}]


def test_card_text_comes_from_cards_data(tmp_path) -> None:
    """Changing the data changes the card: no wording is hard-coded."""
    import json
    import shutil

    from cds_service import create_app

    folder = tmp_path / "cards" / "policy"
    shutil.copytree(Settings().cards_dir / "ccp1247-sacroplasty", folder)
    shutil.copy(Settings().cards_dir / "services.json", tmp_path / "cards")
    meta = json.loads((folder / "policy.json").read_text())
    meta["card"]["summary"] = "Changed summary from the data"
    meta["version"] = "2099-01"
    (folder / "policy.json").write_text(json.dumps(meta))
    app = create_app(Settings(dev=True, cards_dir=tmp_path / "cards",
                              database_url=f"sqlite:///{tmp_path / 'db.sqlite3'}"))
    card = post(app.test_client(), load_fixture("order-select-sacroplasty-cpt.json")).get_json()["cards"][0]
    assert card["summary"] == "Changed summary from the data"
    assert card["extension"]["cds-sacroplasty.policy"]["version"] == "2099-01"


@pytest.mark.parametrize("hook", ["order-select", "order-sign"])
def test_no_loop_created_orders_get_no_card(client, hook: str) -> None:
    """Every order a suggestion creates, sent back as the selected draft, gets no card."""
    request, cards = cards_for(client, "order-select-sacroplasty-cpt.json")
    created = [a["resource"] for s in cards[0]["suggestions"] for a in s["actions"] if a["type"] == "create"]
    assert created
    for resource in created:
        again = copy.deepcopy(request)
        again["hook"] = hook
        again["context"]["draftOrders"] = {"resourceType": "Bundle", "type": "collection",
                                           "entry": [{"resource": resource}]}
        if hook == "order-select":
            again["context"]["selections"] = [f"ServiceRequest/{resource['id']}"]
        else:
            again["context"].pop("selections")
        response = client.post(f"/cds-services/{SERVICE[hook]}", json=again)
        assert response.status_code == 200
        assert response.get_json() == {"cards": []}, resource["code"]


def test_new_ids_are_canonical_version_4_uuids() -> None:
    from cds_service.pipeline.cards import new_ids

    ids = list(new_ids(5000))
    parsed = [uuid.UUID(value) for value in ids]
    assert all(u.version == 4 and u.variant == uuid.RFC_4122 for u in parsed)
    assert [str(u) for u in parsed] == ids  # lower-case 8-4-4-4-12, as str(uuid.uuid4()) writes them
    assert len(set(ids)) == len(ids)
    assert len({value[14] for value in ids}) == 1 and {value[19] for value in ids} == set("89ab")
