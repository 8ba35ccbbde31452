"""The FHIR server fallback against real HTTP servers on 127.0.0.1: token, budget, failures, paging, redirects,
the origin allow-list; through the HTTP API (Flask test client) and at unit level (FhirReader)."""

from __future__ import annotations

import copy
import json
import logging
import socket
import threading
from collections.abc import Iterator
from datetime import date, datetime, timezone
from typing import Any

import pytest
import requests
from conftest import load_fixture
from pytest_httpserver import HTTPServer
from test_api import post
from test_eligibility import chiro_label, notes_in, shifted
from werkzeug import Request, Response

from cds_service import create_app
from cds_service.config import Settings
from cds_service.fhir import FhirBase, FhirReader, bearer_token, normalize_origin
from cds_service.pipeline.policy import load_policies

POLICY = load_policies(Settings().cards_dir)[0]
MESSAGES = POLICY.messages
BASE_PATH = "/fhir/R4"
TOKEN = "example-access-token"
PATIENT = "pt-sh-1001"


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[HTTPServer, HTTPServer]]:
    """Two FHIR servers on 127.0.0.1 (different ports, so different origins)."""
    started = [HTTPServer(host="127.0.0.1", port=0, threaded=True) for _ in range(2)]
    for server in started:
        server.start()
    yield started[0], started[1]
    for server in started:
        server.clear()
        if server.is_running():
            server.stop()


@pytest.fixture
def ehr(servers) -> Iterator[HTTPServer]:
    servers[0].clear()
    yield servers[0]
    servers[0].clear()


@pytest.fixture
def elsewhere(servers) -> Iterator[HTTPServer]:
    servers[1].clear()
    yield servers[1]
    servers[1].clear()


def origin(server: HTTPServer) -> str:
    return f"http://127.0.0.1:{server.port}"


def app_client(settings: Settings, *allowed: str, timeout: float = 5.0):
    """A Flask test client whose service may call `allowed` (generous budget unless a test is about time)."""
    return create_app(settings.with_overrides(fhir_allowed_origins=allowed, fhir_timeout=timeout)).test_client()


def member_data(today: date) -> tuple[dict[str, Any], dict[str, Any]]:
    """Coverage and Condition searchset Bundles of a plan member, onset two weeks before `today`."""
    prefetch = shifted(load_fixture("patient-member.json"), today)["prefetch"]
    return prefetch["coverage"], prefetch["conditions"]


def hook_body(server: HTTPServer, name: str = "patient-no-prefetch-fhir-server.json") -> dict[str, Any]:
    body = load_fixture(name)
    body["fhirServer"] = server.url_for(BASE_PATH)
    return body


def coverage_query(**extra: str) -> dict[str, str]:
    return {"patient": PATIENT, "status": "active", "_count": "100", **extra}


def serve_member(server: HTTPServer, today: date, **headers: str) -> None:
    coverage, conditions = member_data(today)
    server.expect_request(f"{BASE_PATH}/Coverage", method="GET", headers=headers or None,
                          query_string=coverage_query()).respond_with_json(coverage)
    server.expect_request(f"{BASE_PATH}/Condition", method="GET", headers=headers or None,
                          query_string={"patient": PATIENT, "clinical-status": "active,recurrence,relapse",
                                        "_count": "100"}).respond_with_json(conditions)


def only_card(response) -> dict[str, Any]:
    assert response.status_code == 200
    cards = response.get_json()["cards"]
    assert len(cards) == 1
    return cards[0]


def assert_no_patient_data_logged(caplog, body: dict[str, Any]) -> None:
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert PATIENT not in text and TOKEN not in text and "Whitfield" not in text
    assert body["fhirServer"] not in text  # never a URL: it leads to the patient's data


# -- through the HTTP API ------------------------------------------------------------------------------------

def test_fallback_fetch_sends_the_bearer_token_and_uses_the_data(settings, ehr) -> None:
    today = datetime.now(timezone.utc).date()
    serve_member(ehr, today, Authorization=f"Bearer {TOKEN}", Accept="application/fhir+json")
    client = app_client(settings, origin(ehr))
    response = post(client, hook_body(ehr))
    card = only_card(response)
    assert notes_in(card) == {"plan_member", "chiro_offered"}
    assert chiro_label(card) == POLICY.alternative("chiropractic-manipulation").label
    actions = response.get_json()["systemActions"]
    assert actions[0]["resource"]["extension"][-1]["extension"][0]["valueReference"] == \
        {"reference": "Coverage/cov-sh-1001"}
    paths = sorted(request.path for request, _ in ehr.log)
    assert paths == [f"{BASE_PATH}/Condition", f"{BASE_PATH}/Coverage"]  # no Patient read: not needed


def test_a_wrong_token_is_refused_by_the_server_and_the_card_says_coverage_was_not_checked(settings, ehr) -> None:
    serve_member(ehr, datetime.now(timezone.utc).date(), Authorization="Bearer another-token")
    body = hook_body(ehr)
    card = only_card(post(app_client(settings, origin(ehr)), body))
    assert notes_in(card) == {"coverage_fetch_failed", "chiro_unknown"}
    assert len(ehr.log) == 2  # it was asked, with the request's token, which did not match


def test_no_fhir_authorization_reads_an_open_server_without_a_token(settings, ehr) -> None:
    serve_member(ehr, datetime.now(timezone.utc).date())
    body = hook_body(ehr)
    del body["fhirAuthorization"]
    card = only_card(post(app_client(settings, origin(ehr)), body))
    assert notes_in(card) == {"plan_member", "chiro_offered"}
    assert all("Authorization" not in request.headers for request, _ in ehr.log)


def test_fhir_authorization_without_a_usable_token_makes_no_call(settings, ehr) -> None:
    serve_member(ehr, datetime.now(timezone.utc).date())
    body = hook_body(ehr)
    body["fhirAuthorization"] = {"access_token": "bad token\r\nX-Injected: 1"}
    card = only_card(post(app_client(settings, origin(ehr)), body))
    assert notes_in(card) == {"coverage_fetch_failed", "chiro_unknown"}
    assert ehr.log == []


def test_slow_server_beyond_the_budget_still_gets_an_answer(settings, ehr, caplog) -> None:
    release = threading.Event()
    coverage, conditions = member_data(datetime.now(timezone.utc).date())

    def stall(data: dict[str, Any]):
        def handler(request: Request) -> Response:  # good data, but only once the hook has answered
            release.wait(10)
            return Response(json.dumps(data), content_type="application/fhir+json")
        return handler

    ehr.expect_request(f"{BASE_PATH}/Coverage").respond_with_handler(stall(coverage))
    ehr.expect_request(f"{BASE_PATH}/Condition").respond_with_handler(stall(conditions))
    body = hook_body(ehr)
    caplog.set_level(logging.INFO, logger="cds_service")
    try:
        response = post(app_client(settings, origin(ehr), timeout=0.3), body)
    finally:
        release.set()
    card = only_card(response)
    assert notes_in(card) == {"coverage_fetch_failed", "chiro_unknown"}
    assert chiro_label(card).endswith(MESSAGES["chiro_label_unknown"])
    assert "systemActions" not in response.get_json()
    assert any("budget" in r.getMessage() or "timed out" in r.getMessage() for r in caplog.records
               if r.levelno == logging.WARNING)
    assert_no_patient_data_logged(caplog, body)


@pytest.mark.parametrize("status", [401, 403, 404, 500, 503])
def test_error_status_means_unavailable(settings, ehr, caplog, status: int) -> None:
    ehr.expect_request(f"{BASE_PATH}/Coverage").respond_with_json(
        {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "security"}]}, status=status)
    ehr.expect_request(f"{BASE_PATH}/Condition").respond_with_json(member_data(date.today())[1])
    body = hook_body(ehr)
    caplog.set_level(logging.WARNING, logger="cds_service")
    card = only_card(post(app_client(settings, origin(ehr)), body))
    assert notes_in(card) == {"coverage_fetch_failed", "chiro_offered"}  # conditions still arrived
    assert any(f"HTTP {status}" in r.getMessage() and "coverage" in r.getMessage() for r in caplog.records)
    assert_no_patient_data_logged(caplog, body)


@pytest.mark.parametrize("payload", [
    b"{not json",
    b"[1, 2, 3]",
    b'{"resourceType": "OperationOutcome", "issue": []}',
    b'{"resourceType": "Patient", "id": "pt-sh-1001"}',
    b'{"resourceType": "Bundle", "entry": "nope"}',
    b"\xff\xfe garbage",
], ids=["invalid-json", "not-an-object", "operation-outcome", "wrong-resource-type", "bad-entry", "bytes"])
def test_garbage_means_unavailable(settings, ehr, payload: bytes) -> None:
    ehr.expect_request(f"{BASE_PATH}/Coverage").respond_with_data(payload, content_type="application/fhir+json")
    ehr.expect_request(f"{BASE_PATH}/Condition").respond_with_data(payload, content_type="application/fhir+json")
    response = post(app_client(settings, origin(ehr)), hook_body(ehr))
    assert notes_in(only_card(response)) == {"coverage_fetch_failed", "chiro_unknown"}


def test_paging_follows_next_links_under_the_base(settings, ehr) -> None:
    coverage, conditions = member_data(datetime.now(timezone.utc).date())
    first = {"resourceType": "Bundle", "type": "searchset",
             "link": [{"relation": "next", "url": ehr.url_for(f"{BASE_PATH}?_getpages=c1&_offset=1")}],
             "entry": []}
    ehr.expect_request(f"{BASE_PATH}/Coverage").respond_with_json(first)
    ehr.expect_request(BASE_PATH, query_string={"_getpages": "c1", "_offset": "1"}).respond_with_json(coverage)
    ehr.expect_request(f"{BASE_PATH}/Condition").respond_with_json(conditions)
    response = post(app_client(settings, origin(ehr)), hook_body(ehr))
    assert notes_in(only_card(response)) == {"plan_member", "chiro_offered"}
    assert response.get_json()["systemActions"]  # the Coverage on page 2 was used
    assert len(ehr.log) == 3


def test_paging_stops_at_the_page_limit(settings, ehr) -> None:
    endless = {"resourceType": "Bundle", "type": "searchset",
               "link": [{"relation": "next", "url": ehr.url_for(f"{BASE_PATH}/Coverage")}], "entry": []}
    ehr.expect_request(f"{BASE_PATH}/Coverage").respond_with_json(endless)
    ehr.expect_request(f"{BASE_PATH}/Condition").respond_with_json(member_data(date.today())[1])
    card = only_card(post(app_client(settings, origin(ehr)), hook_body(ehr)))
    assert "coverage_fetch_failed" in notes_in(card)
    assert sum(r.path.endswith("/Coverage") for r, _ in ehr.log) == 3


def test_next_link_outside_the_base_is_not_followed(settings, ehr) -> None:
    first = {"resourceType": "Bundle", "type": "searchset",
             "link": [{"relation": "next", "url": ehr.url_for("/admin/page2")}], "entry": []}
    ehr.expect_request(f"{BASE_PATH}/Coverage").respond_with_json(first)
    ehr.expect_request(f"{BASE_PATH}/Condition").respond_with_json(member_data(date.today())[1])
    card = only_card(post(app_client(settings, origin(ehr)), hook_body(ehr)))
    assert "coverage_fetch_failed" in notes_in(card)
    assert all(not r.path.startswith("/admin") for r, _ in ehr.log)


def test_redirect_to_another_origin_is_refused_and_never_followed(settings, ehr, elsewhere) -> None:
    coverage, conditions = member_data(datetime.now(timezone.utc).date())
    target = elsewhere.url_for(f"{BASE_PATH}/Coverage?patient={PATIENT}")
    ehr.expect_request(f"{BASE_PATH}/Coverage").respond_with_data("", status=302, headers={"Location": target})
    ehr.expect_request(f"{BASE_PATH}/Condition").respond_with_json(conditions)
    elsewhere.expect_request(f"{BASE_PATH}/Coverage").respond_with_json(coverage)
    # even with the other origin allowed, a redirect may not carry the token and the patient id to it
    client = app_client(settings, origin(ehr), origin(elsewhere))
    card = only_card(post(client, hook_body(ehr)))
    assert notes_in(card) == {"coverage_fetch_failed", "chiro_offered"}
    assert elsewhere.log == []


def test_redirect_within_the_base_is_followed(settings, ehr) -> None:
    coverage, conditions = member_data(datetime.now(timezone.utc).date())
    ehr.expect_request(f"{BASE_PATH}/Coverage").respond_with_data(
        "", status=307, headers={"Location": f"{BASE_PATH}/v2/Coverage?patient={PATIENT}"})
    ehr.expect_request(f"{BASE_PATH}/v2/Coverage").respond_with_json(coverage)
    ehr.expect_request(f"{BASE_PATH}/Condition").respond_with_json(conditions)
    card = only_card(post(app_client(settings, origin(ehr)), hook_body(ehr)))
    assert notes_in(card) == {"plan_member", "chiro_offered"}


def test_host_not_on_the_allow_list_is_never_contacted(settings, ehr, caplog) -> None:
    serve_member(ehr, datetime.now(timezone.utc).date())
    body = hook_body(ehr)
    caplog.set_level(logging.WARNING, logger="cds_service")
    client = app_client(settings, "https://ehr.example.org", f"http://127.0.0.1:{ehr.port + 1}")
    card = only_card(post(client, body))
    assert ehr.log == []
    assert notes_in(card) == {"plan_unknown", "chiro_unknown"}
    assert any("not in CDS_FHIR_ALLOWED_ORIGINS" in r.getMessage() for r in caplog.records)
    assert_no_patient_data_logged(caplog, body)


def test_empty_allow_list_means_no_outbound_call_at_all(settings, ehr) -> None:
    serve_member(ehr, datetime.now(timezone.utc).date())
    client = create_app(settings).test_client()  # the default: CDS_FHIR_ALLOWED_ORIGINS empty
    assert notes_in(only_card(post(client, hook_body(ehr)))) == {"plan_unknown", "chiro_unknown"}
    assert ehr.log == []


def test_http_origin_must_be_listed_as_http(settings, ehr) -> None:
    serve_member(ehr, datetime.now(timezone.utc).date())
    client = app_client(settings, f"https://127.0.0.1:{ehr.port}")
    only_card(post(client, hook_body(ehr)))
    assert ehr.log == []


def test_prefetch_present_or_null_is_never_fetched(settings, ehr) -> None:
    serve_member(ehr, datetime.now(timezone.utc).date())
    body = hook_body(ehr, "patient-member.json")
    body["prefetch"]["conditions"] = None  # the client has no conditions: known to be none
    response = post(app_client(settings, origin(ehr)), body)
    assert notes_in(only_card(response)) == {"plan_member", "chiro_no_problem"}
    assert ehr.log == []


def test_only_the_missing_key_is_fetched(settings, ehr) -> None:
    serve_member(ehr, datetime.now(timezone.utc).date())
    body = shifted(hook_body(ehr, "patient-member.json"), datetime.now(timezone.utc).date())
    del body["prefetch"]["coverage"]
    response = post(app_client(settings, origin(ehr)), body)
    assert notes_in(only_card(response)) == {"plan_member", "chiro_offered"}
    assert [r.path for r, _ in ehr.log] == [f"{BASE_PATH}/Coverage"]


def test_client_reported_error_is_not_refetched(settings, ehr) -> None:
    serve_member(ehr, datetime.now(timezone.utc).date())
    body = hook_body(ehr, "patient-member.json")
    body["prefetch"]["coverage"] = {"resourceType": "OperationOutcome",
                                    "issue": [{"severity": "error", "code": "timeout"}]}
    response = post(app_client(settings, origin(ehr)), body)
    assert "coverage_fetch_failed" in notes_in(only_card(response))
    assert ehr.log == []


def test_non_sacroplasty_call_makes_no_outbound_call(settings, ehr) -> None:
    serve_member(ehr, datetime.now(timezone.utc).date())
    body = hook_body(ehr, "order-select-vertebroplasty-lumbar.json")
    body.pop("prefetch", None)
    response = post(app_client(settings, origin(ehr)), body)
    assert response.status_code == 200 and response.get_json() == {"cards": []}
    assert ehr.log == []


def test_invalid_patient_id_is_never_put_in_a_url(settings, ehr) -> None:
    serve_member(ehr, datetime.now(timezone.utc).date())
    body = hook_body(ehr)
    body["context"]["patientId"] = "x&_include=*"
    response = post(app_client(settings, origin(ehr)), body)
    assert notes_in(only_card(response)) == {"coverage_fetch_failed", "chiro_unknown"}
    assert ehr.log == []


def test_real_server_reads_the_fhir_settings_from_the_environment(start_server, ehr) -> None:
    serve_member(ehr, datetime.now(timezone.utc).date(), Authorization=f"Bearer {TOKEN}")
    server = start_server(env={"CDS_FHIR_ALLOWED_ORIGINS": f"https://ehr.example.org, {origin(ehr)}/",
                               "CDS_FHIR_TIMEOUT": "5"})
    body = hook_body(ehr)
    for _ in range(3):  # several calls: each worker's pooled session is made once and reused
        response = requests.post(f"{server.url}/cds-services/sacroplasty-order-select", json=body, timeout=30)
        assert response.status_code == 200
        assert notes_in(response.json()["cards"][0]) == {"plan_member", "chiro_offered"}
    assert len(ehr.log) == 6


# -- unit level: FhirReader and URL rules ----------------------------------------------------------------------

def fetch(client: FhirReader, server: HTTPServer, queries: dict[str, str], token: str | None = TOKEN):
    authorization = {"access_token": token} if token else None
    return client.fetch(server.url_for(BASE_PATH), authorization, queries, "unit-test")


def test_client_fetches_concurrently_and_merges_pages(ehr) -> None:
    page2 = {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": {"resourceType": "Coverage",
                                                                                   "id": "b"}}]}
    page1 = {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": {"resourceType": "Coverage",
                                                                                   "id": "a"}}],
             "link": [{"relation": "self", "url": "x"}, {"relation": "next", "url": f"{BASE_PATH}/p2"}]}
    ehr.expect_request(f"{BASE_PATH}/Coverage").respond_with_json(page1)
    ehr.expect_request(f"{BASE_PATH}/p2").respond_with_json(page2)
    ehr.expect_request(f"{BASE_PATH}/Patient/p1").respond_with_json({"resourceType": "Patient", "id": "p1"})
    outcome = fetch(FhirReader([origin(ehr)], 5), ehr, {"coverage": "Coverage?patient=p1",
                                                         "patient": "Patient/p1"})
    assert outcome.attempted and not outcome.failed
    assert [e["resource"]["id"] for e in outcome.values["coverage"]["entry"]] == ["a", "b"]
    assert outcome.values["patient"]["id"] == "p1"


def test_client_caps_the_response_size(ehr) -> None:
    big = {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": {"resourceType": "Basic",
                                                                                 "id": "x" * 5000}}]}
    ehr.expect_request(f"{BASE_PATH}/Coverage").respond_with_json(big)
    ehr.expect_request(f"{BASE_PATH}/Condition").respond_with_handler(
        lambda request: Response((json.dumps(big) for _ in range(1)), content_type="application/fhir+json"))
    outcome = fetch(FhirReader([origin(ehr)], 5, max_bytes=2000), ehr,
                    {"coverage": "Coverage?patient=p", "conditions": "Condition?patient=p"})
    assert outcome.failed == {"coverage", "conditions"} and outcome.values == {}
    small = fetch(FhirReader([origin(ehr)], 5, max_bytes=20000), ehr, {"coverage": "Coverage?patient=p"})
    assert not small.failed


def test_client_does_nothing_without_a_listed_origin(ehr) -> None:
    outcome = fetch(FhirReader([], 5), ehr, {"coverage": "Coverage?patient=p"})
    assert not outcome.attempted and not outcome.values and not outcome.failed
    assert ehr.log == []


@pytest.mark.parametrize("value, expected", [
    ("https://EHR.example.org", "https://ehr.example.org"),
    ("https://ehr.example.org:443/", "https://ehr.example.org"),
    ("http://127.0.0.1:8089", "http://127.0.0.1:8089"),
    ("https://[::1]:8443", "https://[::1]:8443"),
    ("https://ehr.example.org/fhir", None),
    ("ftp://ehr.example.org", None),
    ("https://user:pw@ehr.example.org", None),
    ("ehr.example.org", None),
    ("https://ehr.example.org:99999", None),
])
def test_normalize_origin(value: str, expected: str | None) -> None:
    assert normalize_origin(value) == expected


@pytest.mark.parametrize("url, inside", [
    ("https://ehr.example.org/fhir/R4/Coverage?x=1", True),
    ("https://ehr.example.org/fhir/R4?_getpages=1", True),
    ("https://EHR.example.org:443/fhir/R4/Condition", True),
    ("https://ehr.example.org/fhir/R4evil/Coverage", False),
    ("https://ehr.example.org/fhir/R4/../../admin", False),
    ("https://ehr.example.org/fhir/R4/%2e%2e/admin", False),
    ("http://ehr.example.org/fhir/R4/Coverage", False),
    ("https://ehr.example.org:8443/fhir/R4/Coverage", False),
    ("https://evil.example.org/fhir/R4/Coverage", False),
    ("https://ehr.example.org@evil.example.org/fhir/R4/Coverage", False),
    # issue 13, finding 10: shapes that Tomcat, Jetty or IIS may resolve above the base
    ("https://ehr.example.org/fhir/R4/..;/..;/admin", False),
    ("https://ehr.example.org/fhir/R4/Coverage/..;jsessionid=1/../../admin", False),
    ("https://ehr.example.org/fhir/R4/%2f..%2f..%2fadmin", False),
    ("https://ehr.example.org/fhir/R4/Coverage%2F..%2F..%2F..%2Fadmin", False),
    ("https://ehr.example.org/fhir/R4/\\..\\..\\admin", False),
    ("https://ehr.example.org/fhir/R4/..%5c..%5cadmin", False),
    ("https://ehr.example.org/fhir/R4/.%2e/.%2e/admin", False),
    ("https://ehr.example.org/fhir/R4/%252e%252e/%252e%252e/admin", False),
    ("https://ehr.example.org/fhir/R4/.../admin", False),
    ("https://ehr.example.org/fhir/R4%2f..%2fadmin", False),
    ("https://ehr.example.org/fhir%2FR4/Coverage", False),
    ("https://ehr.example.org/fhir/R4/Coverage%00/x", False),
    ("https://ehr.example.org/fhir/R4/Coverage/a.b..c", True),
    ("https://ehr.example.org/fhir/R4/Coverage?patient=../x", True),  # a query, not a path: no server climbs it
])
def test_base_contains_only_its_own_subtree(url: str, inside: bool) -> None:
    base = FhirBase.parse("https://ehr.example.org/fhir/R4/")
    assert base is not None and base.url == "https://ehr.example.org/fhir/R4"
    assert base.contains(url) is inside


@pytest.mark.parametrize("authorization, expected", [
    (None, (True, None)),
    ({"access_token": "abc.DEF-123_~+/=="}, (True, "abc.DEF-123_~+/==")),
    ({"access_token": "abc", "token_type": "bearer"}, (True, "abc")),
    ({"access_token": "abc", "token_type": "DPoP"}, (False, None)),
    ({"access_token": "a b"}, (False, None)),
    ({"access_token": 42}, (False, None)),
    ({"token_type": "Bearer"}, (False, None)),
])
def test_bearer_token(authorization, expected) -> None:
    assert bearer_token(copy.deepcopy(authorization)) == expected


# -- issue 13, finding 10: nothing that could climb above the base is ever sent ------------------------------

CLIMBS = ["..;/admin", "..%2Fadmin", "%2f..%2fadmin", "\\..\\admin", "%2e%2e/admin", "Coverage/..;/..;/admin",
          "%252e%252e%252fadmin"]


@pytest.mark.parametrize("climb", CLIMBS)
def test_query_that_climbs_is_not_sent(ehr, climb: str) -> None:
    ehr.expect_request(f"{BASE_PATH}/Coverage").respond_with_json({"resourceType": "Bundle", "type": "searchset"})
    outcome = fetch(FhirReader([origin(ehr)], 5), ehr, {"coverage": climb})
    assert outcome.failed == {"coverage"}
    assert ehr.log == []


@pytest.mark.parametrize("climb", CLIMBS)
def test_next_link_that_climbs_is_not_followed(ehr, climb: str) -> None:
    first = {"resourceType": "Bundle", "type": "searchset", "entry": [],
             "link": [{"relation": "next", "url": f"{ehr.url_for(BASE_PATH)}/{climb}"}]}
    ehr.expect_request(f"{BASE_PATH}/Coverage").respond_with_json(first)
    outcome = fetch(FhirReader([origin(ehr)], 5), ehr, {"coverage": "Coverage?patient=p"})
    assert outcome.failed == {"coverage"}
    assert [r.path for r, _ in ehr.log] == [f"{BASE_PATH}/Coverage"]


@pytest.mark.parametrize("climb", CLIMBS)
def test_redirect_that_climbs_is_not_followed(ehr, climb: str) -> None:
    ehr.expect_request(f"{BASE_PATH}/Coverage").respond_with_response(
        Response(status=302, headers={"Location": f"{ehr.url_for(BASE_PATH)}/{climb}"}))
    outcome = fetch(FhirReader([origin(ehr)], 5), ehr, {"coverage": "Coverage?patient=p"})
    assert outcome.failed == {"coverage"}
    assert [r.path for r, _ in ehr.log] == [f"{BASE_PATH}/Coverage"]


# -- issue 13, finding 8: a server that trickles its answer holds no fetch thread past the budget --------------


class TricklingServer:
    """A raw HTTP server on 127.0.0.1. A query with `slow-head` in it gets its header lines one every 0.1 s
    (for 10 s), one with `slow-body` gets its body one byte every 0.1 s; anything else a searchset at once."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.base = f"http://127.0.0.1:{self.port}{BASE_PATH}"
        self._stop = threading.Event()
        self.requests: list[str] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(15)
            request = b""
            try:
                while b"\r\n\r\n" not in request:
                    chunk = conn.recv(4096)
                    if not chunk:
                        return
                    request += chunk
                line = request.split(b"\r\n", 1)[0].decode()
                self.requests.append(line)
                body = json.dumps({"resourceType": "Bundle", "type": "searchset", "entry": [
                    {"resource": {"resourceType": "Coverage", "id": "c1"}}]}).encode()
                head = f"HTTP/1.1 200 OK\r\nContent-Type: application/fhir+json\r\nContent-Length: {len(body)}\r\n"
                if "slow-head" in line:
                    conn.sendall(head.encode())
                    for n in range(100):
                        if self._stop.wait(0.1):
                            return
                        conn.sendall(f"X-Pad-{n}: x\r\n".encode())
                    conn.sendall(b"\r\n" + body)
                elif "slow-body" in line:
                    conn.sendall(head.replace(str(len(body)), "1000").encode() + b"\r\n")
                    for _ in range(1000):
                        if self._stop.wait(0.1):
                            return
                        conn.sendall(b" ")
                else:
                    conn.sendall(head.encode() + b"Connection: close\r\n\r\n" + body)
            except OSError:
                return  # the client gave up on us: what the service is meant to do

    def stop(self) -> None:
        self._stop.set()
        self._listener.close()


@pytest.fixture
def trickling() -> Iterator[TricklingServer]:
    server = TricklingServer()
    yield server
    server.stop()


@pytest.mark.parametrize("slow", ["slow-head", "slow-body"])
def test_trickling_server_does_not_starve_the_pool_for_later_calls(trickling, slow: str) -> None:
    client = FhirReader([f"http://127.0.0.1:{trickling.port}"], 0.5, threads=2)
    stalled = client.fetch(trickling.base, None, {"coverage": f"Coverage?patient={slow}",
                                                  "conditions": f"Coverage?patient={slow}-2"}, "unit-test")
    assert stalled.failed == {"coverage", "conditions"}  # the budget is kept, as before
    # Both fetch threads were on the slow origin; the next calls must find them free again.
    for _ in range(3):
        healthy = client.fetch(trickling.base, None, {"coverage": "Coverage?patient=p"}, "unit-test")
        assert not healthy.failed, "the fetch threads were still held by the trickling answers"
        assert healthy.values["coverage"]["entry"][0]["resource"]["id"] == "c1"
