"""Detection: positives and near misses (the larger table is tests/detection_table.json), the screen, the
evidence kept, the created replacement orders, and the shapes and sizes of input that must never raise."""

from __future__ import annotations

import dataclasses
import json
import random
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cds_service.config import Settings
from cds_service.pipeline.detect import BOUNDARY, Detector, compact, edit_distance_at_most, governed, pieces
from cds_service.pipeline.policy import load_policies

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
    "0200T-not-a-loinc-code": (order("0200T", system="http://loinc.org"), "code"),
    "unlisted-22899": (order("22899", text="Sacroplasty"), "text"),
    "guidance-77012": (order("77012", text="CT-guided sacroplasty"), "text"),
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
    "0216T-not-a-loinc-code": order("0216T", system="http://loinc.org"),
    "12345-6-a-loinc-code": order("12345-6", system="http://loinc.org", text="Sacroplasty"),
    "unlisted-with-follow-up": order("27299", text="Sacroplasty follow-up visit"),
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
    assert detector.match(order("0200T-50")).laterality == "bilateral"  # modifier 50: bilateral procedure
    assert detector.match(order("0200T-LT")).laterality == "unilateral"


# --- the principle: a coded order is what its standard code says ----------------------------------------------

POLICY = load_policies(Settings().cards_dir)[0]
DETECTION = POLICY.detection


@pytest.mark.parametrize("alternative", POLICY.alternatives, ids=lambda a: a.id)
def test_created_replacement_orders_are_never_a_sacroplasty(detector: Detector, alternative) -> None:
    """What a suggestion creates carries the alternative's CPT code; its words may name the sacroplasty."""
    created = {"resourceType": "ServiceRequest", "status": "draft", "intent": "order",
               "code": {"coding": [dict(c) for c in alternative.codings],
                        "text": f"{alternative.text} (covered alternative to percutaneous sacroplasty)"},
               "reasonCode": [{"text": "Sacral insufficiency fracture"}],
               "note": [{"text": "Replaces a percutaneous sacroplasty order"}]}
    assert alternative.codings
    assert detector.match(created) is None


@pytest.mark.parametrize("code", ["64493", "62323", "20552", "97110", "98940", "98941", "98942"])
@pytest.mark.parametrize("text", ["Sacroplasty", "IR sacroplasty, left S1",
                                  "Percutaneous sacral augmentation (sacroplasty), bilateral"])
def test_a_standard_code_outranks_the_words(detector: Detector, code: str, text: str) -> None:
    assert detector.match(order(text=text)) is not None  # the words alone would be a sacroplasty ...
    assert detector.match(order(code, text=text)) is None  # ... the code says what the order is


def test_a_local_code_leaves_it_to_the_words(detector: Detector) -> None:
    epic = "urn:oid:1.2.840.114350.1.13.0.1.7.2.696580"
    assert detector.match(order("IMG1", system=epic, text="Sacroplasty")).rule == "text"
    assert detector.match(order("IMG1", system=epic, text="CT pelvis")) is None


NAMING_NO_PROCEDURE = [e["code"] for e in DETECTION["codes_naming_no_procedure"]["codes"]]


@pytest.mark.parametrize("code", NAMING_NO_PROCEDURE)
def test_a_code_that_names_no_procedure_leaves_it_to_the_words(detector: Detector, code: str) -> None:
    """Unlisted-procedure and image-guidance codes say nothing about the procedure: the words decide, with their
    context; any other standard code on the order still decides."""
    assert detector.match(order(code, text="Sacroplasty, left")).rule == "text"
    assert detector.match(order(code, text="CT pelvis, s/p sacroplasty")) is None
    assert detector.match(order(code)) is None
    both = order("72193", text="Sacroplasty")
    both["code"]["coding"].append({"system": CPT, "code": code})
    assert detector.match(both) is None  # the CT code decides


@pytest.mark.parametrize("system", [s for uris in DETECTION["code_systems"].values() if isinstance(uris, list)
                                    for s in uris[:1]])
def test_a_code_not_valid_in_its_system_is_read_as_a_code_without_a_system(detector: Detector, system: str) -> None:
    label = next(k for k, v in DETECTION["code_systems"].items() if isinstance(v, list) and system in v)
    if label in ("CPT", "HCPCS"):  # 0200T is valid there
        assert detector.match(order("0200T", system=system)).evidence == f"{label}|0200T"
        bad = order("0200-T", system=system, text="Sacroplasty")  # not a CPT code: the words decide
        assert detector.match(bad).rule == "text"
        return
    match = detector.match(order("0201T", system=system))
    assert match.rule == "code" and match.evidence == "no-system|0201T" and match.laterality == "bilateral"
    assert detector.match(order("0216T", system=system, text="Sacroplasty")).rule == "text"


def test_every_code_in_the_data_has_the_format_of_its_system() -> None:
    """The formats must accept every code the detection data lists (else a listed code would be ignored)."""
    formats = {k: v for k, v in DETECTION["code_formats"].items() if not k.startswith("_")}
    entries = DETECTION["codes"] + DETECTION["vertebral_augmentation"]["codes"] + \
        DETECTION["codes_naming_no_procedure"]["codes"]
    for entry in entries:
        for system in entry["systems"]:
            assert re.fullmatch(formats[system], entry["code"]), (system, entry["code"])
    for entry in DETECTION["vertebral_augmentation"]["sacral_site_codes"]:
        assert re.fullmatch(formats["SNOMED CT"], entry["code"])
    assert not re.fullmatch(formats["LOINC"], "0200T") and re.fullmatch(formats["LOINC"], "24558-9")
    assert not re.fullmatch(formats["SNOMED CT"], "0201T") and not re.fullmatch(formats["CPT"], "0QU13JZ")
    assert not re.fullmatch(formats["ICD-10-PCS"], "0OU13JZ")  # the letter O is not used in ICD-10-PCS


def test_every_detection_code_has_a_source_row_in_the_code_book() -> None:
    """Codes need a source: each code detection.json lists is a row of a table in cards/codes.md."""
    book = (Settings().cards_dir / "codes.md").read_text(encoding="utf-8")
    entries = DETECTION["codes"] + DETECTION["vertebral_augmentation"]["codes"] + \
        DETECTION["codes_naming_no_procedure"]["codes"] + DETECTION["vertebral_augmentation"]["sacral_site_codes"]
    for entry in entries:
        assert re.search(rf"^\|(?:[^\n]*\|)?\s*{re.escape(entry['code'])}\s*\|", book, re.M), entry["code"]


def test_a_bare_code_counts_only_in_the_category_iii_format(detector: Detector) -> None:
    assert detector.match(order("0201T", system=None)).rule == "code"
    assert detector.match(order("22511", system=None, site=SACRUM_SITE)) is None  # no code, no words
    assert detector.match(order("22511", system=None, text="Vertebroplasty", site=SACRUM_SITE)).evidence == \
        "text:vertebral-augmentation-sacrum"
    assert detector.match(order("22511", system=None, text="Vertebroplasty L3")) is None
    assert detector.match(order("0QU13JZ", system=None)) is None


# --- context: a cue negates only the mention it governs ------------------------------------------------------------

GOVERNED = {
    # text: is it an order of the procedure?
    "After failed conservative care, sacroplasty": True,
    "After failed conservative care sacroplasty": True,
    "After sacroplasty": False,
    "After her recent left sacroplasty": False,
    "Pre-authorized sacroplasty, left": True,
    "Pre-sacroplasty labs": False,
    "Prior authorization obtained - sacroplasty": True,
    "Prior sacroplasty": False,
    "Post-traumatic sacral fracture: sacroplasty bilateral": True,
    "Post sacroplasty CT": False,
    "Vertebroplasty L4 (prior sacroplasty S1)": False,
    "Prior (2023) sacroplasty": False,
    "Recent sacroplasty - wound check": False,
    "Recent sacral fracture sacroplasty": True,
    "History of osteoporosis and sacroplasty": False,
    "History of osteoporosis; sacroplasty": True,
    "Hx: sacroplasty": False,
    "Sacroplasty with bone biopsy and evaluation": True,
    "Sacroplasty under CT, same day follow up": True,
    "Sacroplasty follow-up visit": False,
    "Sacroplasty, follow up": False,
    "IR consult: sacroplasty": False,
    "Sacroplasty under fluoroscopy and CT": True,
    "CT pelvis, sacroplasty": False,
    "CT-guided sacroplasty": True,
}


@pytest.mark.parametrize("text", GOVERNED)
def test_a_cue_negates_only_the_mention_it_governs(detector: Detector, text: str) -> None:
    assert (detector.match(order(text=text)) is not None) == GOVERNED[text]


def governed_by_scanning_back(words: list[str], clause: set[int], nexts: set[int], modifiers: frozenset[str],
                              window: int | None, after_head: frozenset[str]) -> list[bool]:
    """The same rule as detect.governed, written the slow way: for each token, look back at every cue."""
    def after_opening_boundaries(between: list[str]) -> list[str]:
        i = 0
        while i < len(between) and between[i] == BOUNDARY:
            i += 1
        return between[i:]

    def level(word: str) -> bool:
        return bool(re.fullmatch(r"[slt][1-9]|t1[0-2]|[0-9]+", word))

    def in_phrase(phrase: list[str]) -> bool:
        """phrase (the words after the cue, up to this one) is a start of: modifiers* head after-head*, where
        boundaries may stand only before the head."""
        heads = [k for k, w in enumerate(phrase) if w != BOUNDARY and w not in modifiers and not level(w)]
        return not heads or all(w != BOUNDARY and (w in after_head or level(w)) for w in phrase[heads[0] + 1:])

    out = []
    for i, word in enumerate(words):
        flag = False
        if word != BOUNDARY:
            for end in clause:
                rest = after_opening_boundaries(words[end:i])
                flag |= end <= i and BOUNDARY not in rest and (window is None or len(rest) < window)
            for end in nexts:
                flag |= end <= i and in_phrase(words[end:i] + [word])
        out.append(flag)
    return out


@given(words=st.lists(st.sampled_from(["a", "b", "left", "s1", "2024", BOUNDARY]), max_size=12),
       clause=st.sets(st.integers(0, 12), max_size=3), nexts=st.sets(st.integers(0, 12), max_size=3),
       window=st.one_of(st.none(), st.integers(1, 5)))
@settings(max_examples=1000, deadline=None)
def test_governed_agrees_with_scanning_back(words, clause, nexts, window) -> None:
    modifiers, after_head = frozenset({"left", "a"}), frozenset({"left"})
    assert list(governed(words, clause, nexts, modifiers, window, after_head)) == \
        governed_by_scanning_back(words, clause, nexts, modifiers, window, after_head)


# --- evidence: a short identifier from detection.json, never the order's words -----------------------------------

def allowed_evidence() -> set[str]:
    out = {f"text:{r['id']}" for r in DETECTION["text"]["rules"]}
    for entry in DETECTION["codes"] + DETECTION["vertebral_augmentation"]["codes"]:
        out |= {f"{system}|{entry['code']}" for system in entry["systems"]}
        out.add(f"no-system|{entry['code']}")
    return out


TABLE = json.loads((Path(__file__).parent / "detection_table.json").read_text(encoding="utf-8"))["rows"]


@pytest.mark.parametrize("resource", [r["order"] for r in TABLE if r["expected"]] + [r for r, _ in POSITIVES.values()])
def test_evidence_is_an_identifier_from_the_data(detector: Detector, resource) -> None:
    match = detector.match(resource)
    assert match.evidence in allowed_evidence()
    assert len(match.evidence) <= 200  # the column is VARCHAR(200)


# --- the screen (detection.json "screen"): orders without any of its strings skip the rules ----------------------

@pytest.fixture(scope="module")
def unscreened() -> Detector:
    return Detector(dataclasses.replace(POLICY, detection={k: v for k, v in DETECTION.items() if k != "screen"}))


def test_the_policy_screen_is_sound_and_used(detector: Detector) -> None:
    assert detector.screen_is_sound()
    assert detector._screen  # else the checks below would pass vacuously


@pytest.mark.parametrize("drop", DETECTION["screen"])
def test_a_screen_missing_a_string_is_not_used(drop: str) -> None:
    """Each screen string is needed: without it some rule could match an order the screen skips, so the
    Detector runs every rule instead (never a wrong answer)."""
    detection = dict(DETECTION, screen=[s for s in DETECTION["screen"] if s != drop])
    weaker = Detector(dataclasses.replace(POLICY, detection=detection))
    assert not weaker.screen_is_sound()
    assert weaker._screen == ()


FUZZY = [w[:-1] for r in DETECTION["text"]["rules"] for w in r["words"] if w.endswith("~")]
EDITS = DETECTION["text"]["fuzzy_edits"]


def misspell(word: str, rng: random.Random, edits: int) -> str:
    for _ in range(edits):
        i = rng.randrange(len(word) + 1)
        letter = rng.choice("abcdefghijklmnopqrstuvwxyz")
        op = rng.choice(["insert", "delete", "substitute"])
        if op == "insert":
            word = word[:i] + letter + word[i:]
        elif i < len(word):
            word = word[:i] + ("" if op == "delete" else letter) + word[i + 1:]
    return word


@pytest.mark.parametrize("word", FUZZY)
@given(seed=st.integers(0, 2**32), edits=st.integers(0, 2), split=st.integers(0, 20),
       sep=st.sampled_from([" ", "-", "/", " - ", ""]))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_every_misspelling_the_rules_accept_passes_the_screen(detector: Detector, unscreened: Detector, word: str,
                                                              seed: int, edits: int, split: int, sep: str) -> None:
    """Within fuzzy_edits edits, split anywhere: if the unscreened rules call it a sacroplasty, the screen lets
    it through (and the answers agree)."""
    typo = misspell(word, random.Random(seed), min(edits, EDITS))
    cut = split % (len(typo) + 1)
    text = typo[:cut] + sep + typo[cut:]
    resource = order(text=f"IR {text}, left")
    assert detector.match(resource) == unscreened.match(resource)
    if unscreened.match(resource):
        assert any(s in compact(text, 300) for s in DETECTION["screen"])


WORDS = ["sacroplasty", "sacroplsty", "sacro", "plasty", "Sacral", "SACRUM", "ala", "S1", "s5", "L5", "L5-S1",
         "L5/S1", "augmentation", "AUGMT", "cement", "PMMA", "of", "the", "kyphoplasty", "vertebroplasty",
         "vertebral", "balloon", "cementoplasty", "L3", "lumbar", "CT", "guided", "s/p", "after", "consult",
         "old", "fracture", "nerve", "root", "bilateral", "ſacral", "prior", "authorization", ",", ";", "(", ")",
         "pre", "authorized", "post", "traumatic", "with", "follow", "up", "screw", "adjacent", "to", "failed",
         "hx", ":", "under", "iliac"]


@given(code=st.sampled_from([None, "0200T", "22511", "22514", "72131", "97110", "22899", "77012"]),
       system=st.sampled_from([CPT, "urn:oid:1.2.840.114350.1.13.0.1.7.2.696580", None, "http://loinc.org"]),
       text=st.lists(st.sampled_from(WORDS), max_size=7).map(" ".join),
       site=st.one_of(st.none(), st.lists(st.sampled_from(WORDS), max_size=3).map(lambda w: [{"text": " ".join(w)}]),
                      st.just(SACRUM_SITE)))
@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_screen_changes_no_answer_on_generated_orders(detector: Detector, unscreened: Detector, code, system, text,
                                                     site) -> None:
    resource = order(code, system=system, text=text or None, site=site)
    match = detector.match(resource)
    assert match == unscreened.match(resource)
    if match:
        assert match.evidence in allowed_evidence()


@pytest.mark.parametrize("row", TABLE, ids=[r["id"] for r in TABLE])
def test_screen_changes_no_answer_on_the_table(detector: Detector, unscreened: Detector, row) -> None:
    assert detector.match(row["order"]) == unscreened.match(row["order"])


# --- the tolerant matching itself ---------------------------------------------------------------------------------

def levenshtein(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


@given(a=st.text("sacroplty", max_size=14), b=st.text("sacroplty", max_size=14), limit=st.integers(0, 3))
@settings(max_examples=400, deadline=None)
def test_banded_edit_distance_agrees_with_levenshtein(a: str, b: str, limit: int) -> None:
    assert edit_distance_at_most(a, b, limit) == (levenshtein(a, b) <= limit)


@given(seed=st.integers(0, 2**32), edits=st.integers(0, 3))
@settings(max_examples=300, deadline=None)
def test_a_word_within_k_edits_keeps_one_of_its_k_plus_1_pieces(seed: int, edits: int) -> None:
    typo = misspell("sacroplasty", random.Random(seed), edits)
    assert any(p in typo for p in pieces("sacroplasty", edits))


# --- any JSON, any size: never raises, cost bounded ----------------------------------------------------------------

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
                    lambda children: st.lists(children, max_size=4)
                    | st.dictionaries(st.sampled_from(["code", "coding", "system", "text", "display", "bodySite",
                                                       "0200T", "x"]), children, max_size=4),
                    max_leaves=20)


@given(code=JSON, site=JSON)
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_json_shape_never_raises(detector: Detector, code, site) -> None:
    detector.match({"resourceType": "ServiceRequest", "code": code, "bodySite": site})
    detector.match(code)


def test_only_the_first_max_chars_of_a_text_are_read(detector: Detector) -> None:
    limit = DETECTION["text"]["max_chars"]
    assert detector.match(order(text="x " * (limit // 2 - 10) + "sacroplasty")) is not None
    assert detector.match(order(text="x " * limit + "sacroplasty")) is None
    assert detector.match(order(text="sacroplasty " + "y" * 1_000_000)) is not None


def test_laterality_is_read_from_the_order_not_from_a_code_display(detector: Detector) -> None:
    display = "Percutaneous vertebroplasty, 1 vertebral body, unilateral or bilateral injection; lumbosacral"
    assert detector.match(order("22511", display=display, text="Vertebroplasty S1, left")).laterality is None
    assert detector.match(order("22511", display=display, text="Vertebroplasty S1, bilateral")).laterality == \
        "bilateral"
