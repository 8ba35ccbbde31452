"""Policy packs: every folder of cards/ is a pack, each judged on every call. A second, synthetic pack
(tests/packs/, never shipped) loads beside CCP.1247, fires on its own orders only, and shares one answer."""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, load_fixture
from test_api import SERVICE, post

from cds_service import create_app
from cds_service.config import Settings
from cds_service.pipeline.policy import load_catalogue

SYNTHETIC = ROOT / "tests" / "packs" / "synthetic-widgetplasty"
SYNTHETIC_ID = "test-synthetic-widgetplasty"
CCP = "ccp-1247-sacroplasty"
SYN_SYSTEM = "urn:cds-test:synthetic-procedures"


@pytest.fixture
def two_packs(tmp_path: Path) -> Path:
    cards = tmp_path / "cards"
    shutil.copytree(Settings().cards_dir, cards)
    shutil.copytree(SYNTHETIC, cards / SYNTHETIC.name)
    return cards


def app_for(cards: Path, tmp_path: Path):
    return create_app(Settings(dev=True, cards_dir=cards, database_url=f"sqlite:///{tmp_path / 'db.sqlite3'}"))


def widgetplasty(order_id: str = "sr-widget-1", coded: bool = True) -> dict[str, Any]:
    code: dict[str, Any] = {"text": "Widgetplasty, left"}
    if coded:
        code["coding"] = [{"system": SYN_SYSTEM, "code": "SYN-0001", "display": "Widgetplasty"}]
    return {"resourceType": "ServiceRequest", "id": order_id, "status": "draft", "intent": "order", "code": code,
            "subject": {"reference": "Patient/pt-sh-1001"}}


def covered_by_both(body: dict[str, Any]) -> dict[str, Any]:
    """The fixture's patient, covered by Sandhills Center and by the synthetic test payer."""
    entries = body["prefetch"]["coverage"]["entry"]
    synthetic = copy.deepcopy(entries[0]["resource"])
    synthetic.update(id="cov-synthetic", payor=[{"identifier": {"system": "urn:cds-test:payer-id",
                                                                "value": "SYNTHETIC-TEST-PAYER"}}])
    synthetic.pop("contained", None)
    entries.append({"resource": synthetic})
    return body


def with_orders(body: dict[str, Any], orders: list[dict[str, Any]], hook: str) -> dict[str, Any]:
    body = covered_by_both(copy.deepcopy(body))
    body["hook"] = hook
    body["context"]["draftOrders"] = {"resourceType": "Bundle", "type": "collection",
                                      "entry": [{"resource": o} for o in orders]}
    if hook == "order-select":
        body["context"]["selections"] = [f"ServiceRequest/{orders[0]['id']}"]
    else:
        body["context"].pop("selections", None)
    return body


def pack_ids(answer: dict[str, Any]) -> list[str]:
    return [card["extension"]["cds-sacroplasty.policy"]["id"] for card in answer["cards"]]


def sacroplasty_order() -> dict[str, Any]:
    return load_fixture("order-select-sacroplasty-cpt.json")["context"]["draftOrders"]["entry"][0]["resource"]


def test_both_packs_load_and_discovery_keeps_its_ids(two_packs: Path, tmp_path: Path) -> None:
    catalogue = load_catalogue(two_packs)
    assert {p.id for p in catalogue.packs} == {CCP, SYNTHETIC_ID}
    services = app_for(two_packs, tmp_path).test_client().get("/cds-services").get_json()["services"]
    assert {s["id"] for s in services} == {"sacroplasty-order-select", "sacroplasty-order-sign",
                                           "coverage-order-dispatch", "coverage-appointment-book"}
    for service in services:
        assert "CCP.1247" in service["description"] and "TEST.0001" in service["description"]
        assert "sacroplasty" not in service["title"].lower()  # neutral titles


def test_the_shipped_cards_hold_only_real_packs() -> None:
    assert {p.id for p in load_catalogue(Settings().cards_dir).packs} == {CCP}


@pytest.mark.parametrize("coded", [True, False], ids=["coded", "named"])
def test_each_pack_fires_on_its_own_orders_only(two_packs: Path, tmp_path: Path, coded: bool) -> None:
    client = app_for(two_packs, tmp_path).test_client()
    base = load_fixture("order-select-sacroplasty-cpt.json")
    widget = post(client, with_orders(base, [widgetplasty(coded=coded)], "order-select")).get_json()
    assert pack_ids(widget) == [SYNTHETIC_ID]
    assert widget["cards"][0]["summary"].startswith("Widgetplasty not covered")
    sacro = post(client, with_orders(base, [sacroplasty_order()], "order-select")).get_json()
    assert pack_ids(sacro) == [CCP]


def test_both_cards_in_one_order_sign_answer(two_packs: Path, tmp_path: Path) -> None:
    client = app_for(two_packs, tmp_path).test_client()
    body = with_orders(load_fixture("order-select-sacroplasty-cpt.json"),
                       [sacroplasty_order(), widgetplasty()], "order-sign")
    answer = post(client, body).get_json()
    assert sorted(pack_ids(answer)) == sorted([CCP, SYNTHETIC_ID])
    by_pack = dict(zip(pack_ids(answer), answer["cards"], strict=True))
    assert by_pack[CCP]["extension"]["davinci-crd.associated-resource"] == [{"reference": "ServiceRequest/sr-sacro-1"}]
    assert by_pack[SYNTHETIC_ID]["extension"]["davinci-crd.associated-resource"] == [
        {"reference": "ServiceRequest/sr-widget-1"}]
    assert by_pack[SYNTHETIC_ID]["source"]["label"].startswith("Synthetic test pack")


def test_an_order_two_packs_rule_on_gets_two_cards_and_one_update_with_both_assertions(
        two_packs: Path, tmp_path: Path) -> None:
    # The synthetic pack also rules on CPT 0200T here, and the patient is covered by both payers.
    detection = json.loads((two_packs / SYNTHETIC.name / "detection.json").read_text())
    detection["codes"].append({"systems": ["CPT", "HCPCS"], "code": "0200T", "display": "test"})
    (two_packs / SYNTHETIC.name / "detection.json").write_text(json.dumps(detection))
    body = covered_by_both(load_fixture("order-select-sacroplasty-cpt.json"))
    answer = post(app_for(two_packs, tmp_path).test_client(), body).get_json()
    assert sorted(pack_ids(answer)) == sorted([CCP, SYNTHETIC_ID])
    (update,) = answer["systemActions"]
    extensions = [e for e in update["resource"]["extension"]
                  if e["url"].endswith("ext-coverage-information")]
    reasons = sorted(next(s["valueCodeableConcept"]["text"] for s in e["extension"] if s["url"] == "reason")
                     for e in extensions)
    assert len(extensions) == 2 and "CCP.1247" in reasons[0] + reasons[1] and "TEST.0001" in reasons[0] + reasons[1]


def test_a_pack_whose_payer_is_not_the_patients_stays_silent(two_packs: Path, tmp_path: Path) -> None:
    body = with_orders(load_fixture("order-select-sacroplasty-cpt.json"), [widgetplasty()], "order-select")
    body["prefetch"]["coverage"]["entry"].pop()  # Sandhills Center only
    assert post(app_for(two_packs, tmp_path).test_client(), body).get_json() == {"cards": []}


def test_a_pack_with_a_repeated_id_is_refused(two_packs: Path) -> None:
    from cds_service.pipeline.policy import PolicyError, load_policies

    shutil.copytree(two_packs / SYNTHETIC.name, two_packs / "another-copy")
    with pytest.raises(PolicyError, match="id"):
        load_policies.__wrapped__(two_packs)


def test_each_pack_has_its_policy_page(two_packs: Path, tmp_path: Path) -> None:
    client = app_for(two_packs, tmp_path).test_client()
    assert "Synthetic test pack TEST.0001" in client.get(f"/policies/{SYNTHETIC_ID}").get_data(as_text=True)
    assert client.get(f"/policies/{CCP}").status_code == 200


def test_check_policy_proves_the_synthetic_pack_with_its_own_examples() -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "cds_service.cli", "check-policy", str(SYNTHETIC)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "examples: 2 passed, 0 failed" in done.stdout


def test_each_pack_in_the_report_under_its_own_pack_and_version(two_packs: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    app = app_for(two_packs, tmp_path)
    client = app.test_client()
    body = with_orders(load_fixture("order-select-sacroplasty-cpt.json"),
                       [sacroplasty_order(), widgetplasty()], "order-sign")
    cards = post(client, body).get_json()["cards"]
    assert len(cards) == 2
    feedback = {"feedback": [{"card": c["uuid"], "outcome": "overridden", "outcomeTimestamp": "2026-11-01T10:00:00Z"}
                             for c in cards]}
    assert client.post(f"/cds-services/{SERVICE['order-sign']}/feedback", json=feedback).status_code == 200
    assert app.extensions["cds_store"].flush()
    env = {**os.environ, "CDS_DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}", "CDS_CARDS_DIR": str(two_packs)}
    done = subprocess.run([sys.executable, "-m", "cds_service.cli", "report", "--format", "json"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    by_pack = json.loads(done.stdout)["by_policy_version"]
    assert by_pack[f"{CCP} 2021-07.2"]["cards_issued"] == 1 and by_pack[f"{SYNTHETIC_ID} test-1"]["cards_issued"] == 1
    assert by_pack[f"{SYNTHETIC_ID} test-1"]["overridden"] == 1
