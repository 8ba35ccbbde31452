"""Detection table: each positive and each near miss is its own case."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cds_service.config import Settings
from cds_service.detect import Detector
from cds_service.policy import load_policies

CPT = "http://www.ama-assn.org/go/cpt"
PCS = "http://www.cms.gov/Medicare/Coding/ICD10"


@pytest.fixture(scope="module")
def detector() -> Detector:
    return Detector(load_policies(Settings().cards_dir)[0])


def order(code: str | None = None, system: str = CPT, text: str | None = None, display: str | None = None,
          site: Any = None) -> dict[str, Any]:
    concept: dict[str, Any] = {}
    if code:
        coding = {"system": system, "code": code}
        if display:
            coding["display"] = display
        concept["coding"] = [coding]
    elif display:
        concept["coding"] = [{"display": display}]
    if text:
        concept["text"] = text
    resource: dict[str, Any] = {"resourceType": "ServiceRequest", "id": "x", "status": "draft", "code": concept}
    if site is not None:
        resource["bodySite"] = site
    return resource


SACRUM_SITE = [{"coding": [{"system": "http://snomed.info/sct", "code": "54735007", "display": "Sacrum"}]}]

POSITIVES = {
    "cpt-0200T": (order("0200T"), "code"),
    "cpt-0201T-bilateral": (order("0201T"), "code"),
    "cpt-lowercase-t": (order("0200t"), "code"),
    "cpt-oid-system": (order("0200T", system="urn:oid:2.16.840.1.113883.6.12"), "code"),
    "icd10pcs-percutaneous": (order("0QU13JZ", system=PCS), "code"),
    "icd10pcs-endoscopic": (order("0QU14JZ", system=PCS), "code"),
    "text-sacroplasty": (order(text="Sacroplasty"), "text"),
    "text-percutaneous-sacroplasty": (order(text="percutaneous sacroplasty, left"), "text"),
    "text-sacral-augmentation": (order(text="Sacral augmentation"), "text"),
    "text-percutaneous-sacral-augmentation": (order(text="Percutaneous sacral augmentation"), "text"),
    "text-balloon-sacroplasty": (order(text="Balloon sacroplasty"), "text"),
    "text-sacral-kyphoplasty": (order(text="Sacral balloon kyphoplasty"), "vertebral-augmentation-site"),
    "text-sacral-cementoplasty": (order(text="Sacral cementoplasty"), "text"),
    "display-only": (order(display="Sacroplasty (percutaneous)"), "text"),
    "text-kyphoplasty-of-sacrum": (order(text="Kyphoplasty of the sacrum"), "vertebral-augmentation-site"),
    "22511-bodysite-sacrum-code": (order("22511", site=SACRUM_SITE), "vertebral-augmentation-site"),
    "22511-bodysite-text-S1": (order("22511", site=[{"text": "S1"}]), "vertebral-augmentation-site"),
    "22514-text-sacral-ala": (order("22514", text="Kyphoplasty, right sacral ala"), "vertebral-augmentation-site"),
    "22512-addon-S2": (order("22512", text="vertebroplasty S2"), "vertebral-augmentation-site"),
    "22515-addon-sacrum": (order("22515", site=[{"text": "sacrum"}]), "vertebral-augmentation-site"),
    "bodysite-single-object": (order("22511", site={"text": "Sacrum"}), "vertebral-augmentation-site"),
}

NEGATIVES = {
    "vertebroplasty-22511-L3": order("22511", text="Vertebroplasty L3", site=[{"text": "L3 vertebra"}]),
    "vertebroplasty-22511-no-site": order("22511", display="Percutaneous vertebroplasty; lumbosacral"),
    "kyphoplasty-22514-L1": order("22514", text="Kyphoplasty L1"),
    "kyphoplasty-thoracic-22513": order("22513", text="Kyphoplasty T12"),
    "vertebroplasty-text-lumbar": order(text="Percutaneous vertebroplasty, L4"),
    "sacroiliac-joint-injection": order("27096", text="Sacroiliac joint injection"),
    "si-joint-text": order(text="Right sacroiliac joint steroid injection"),
    "ct-sacrum": order("72192", text="CT pelvis / sacrum without contrast"),
    "xray-sacrum": order("72220", text="X-ray sacrum and coccyx, 2 views"),
    "mri-sacrum": order("72195", text="MRI sacrum"),
    "sacral-nerve-stimulation": order("64561", text="Sacral neuromodulation, percutaneous"),
    "caudal-epidural": order("62323", text="Epidural injection, lumbar or sacral (caudal)"),
    "facet-injection-lumbosacral": order("64493", text="Facet joint injection, lumbar or sacral"),
    "physical-therapy": order("97110", text="Therapeutic exercise"),
    "empty-coding": {"resourceType": "ServiceRequest", "id": "x", "status": "draft", "code": {"coding": [{}]}},
    "no-code": {"resourceType": "ServiceRequest", "id": "x", "status": "draft"},
    "code-not-an-object": {"resourceType": "ServiceRequest", "code": "0200T"},
    "coding-garbage": {"resourceType": "ServiceRequest", "code": {"coding": [1, None, "0200T", {"code": 5}]}},
    "0200T-other-system": order("0200T", system="http://loinc.org"),
}


@pytest.mark.parametrize("name", POSITIVES)
def test_sacroplasty_detected(detector: Detector, name: str) -> None:
    resource, rule = POSITIVES[name]
    match = detector.match(resource)
    assert match is not None, name
    assert match.rule == rule


@pytest.mark.parametrize("name", NEGATIVES)
def test_near_miss_not_detected(detector: Detector, name: str) -> None:
    assert detector.match(NEGATIVES[name]) is None


def test_bilateral_laterality(detector: Detector) -> None:
    assert detector.match(order("0201T")).laterality == "bilateral"
    assert detector.match(order(text="Bilateral sacroplasty")).laterality == "bilateral"
    assert detector.match(order("0200T")).laterality == "unilateral"


# --- the screen (detection.json "screen"): orders without any of its strings skip the patterns -----------

DETECTION = load_policies(Settings().cards_dir)[0].detection
SCREENED_PATTERNS = DETECTION["text_patterns"] + DETECTION["vertebral_augmentation"]["sacral_site_patterns"]


@pytest.fixture(scope="module")
def unscreened() -> Detector:
    policy = load_policies(Settings().cards_dir)[0]
    return Detector(dataclasses.replace(policy, detection={k: v for k, v in policy.detection.items()
                                                           if k != "screen"}))


def test_the_policy_has_a_screen(detector: Detector) -> None:
    assert detector._screen  # else the checks below would pass vacuously


@pytest.mark.parametrize("pattern", SCREENED_PATTERNS)
@given(data=st.data())
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_every_text_a_pattern_matches_passes_the_screen(pattern: str, data: st.DataObject) -> None:
    """The contract the screen relies on, for each pattern: whatever it matches holds a screen string."""
    text = data.draw(st.from_regex(re.compile(pattern, re.IGNORECASE)))
    assert any(s.casefold() in text.casefold() for s in DETECTION["screen"]), (pattern, text)


@pytest.mark.parametrize("resource", [r for r, _ in POSITIVES.values()] + list(NEGATIVES.values()))
def test_screen_changes_no_answer_on_the_table(detector: Detector, unscreened: Detector, resource) -> None:
    assert detector.match(resource) == unscreened.match(resource)


WORDS = ["sacroplasty", "Sacral", "SACRUM", "ala", "S1", "s5", "augmentation", "of", "the", "kyphoplasty",
         "vertebroplasty", "vertebral", "balloon", "cementoplasty", "L3", "lumbar", "CT", "bilateral", "ſacral"]


@given(code=st.sampled_from([None, "0200T", "22511", "22514", "72131", "97110"]),
       text=st.lists(st.sampled_from(WORDS), max_size=6).map(" ".join),
       site=st.one_of(st.none(), st.lists(st.sampled_from(WORDS), max_size=3).map(lambda w: [{"text": " ".join(w)}]),
                      st.just(SACRUM_SITE)))
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_screen_changes_no_answer_on_generated_orders(detector: Detector, unscreened: Detector, code, text,
                                                     site) -> None:
    resource = order(code, text=text or None, site=site)
    assert detector.match(resource) == unscreened.match(resource)
