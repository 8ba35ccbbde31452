"""Hostile input (issue 3): CORS, request limits, fuzzed hook requests, no patient data in logs, dev-mode warnings."""

from __future__ import annotations

import copy
import io
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import FIXTURES, load_fixture
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from cds_service import create_app
from cds_service.config import Settings

SELECT = "sacroplasty-order-select"
SIGN = "sacroplasty-order-sign"
SERVICE = {"order-select": SELECT, "order-sign": SIGN, "order-dispatch": "coverage-order-dispatch",
           "appointment-book": "coverage-appointment-book"}
CPT = "order-select-sacroplasty-cpt.json"
SANDBOX = "https://sandbox.cds-hooks.org"


def make_app(tmp_path: Path, **overrides: Any):
    base = {"dev": True, "database_url": f"sqlite:///{tmp_path / 'security.sqlite3'}",
            "public_url": "https://cds.example.org", **overrides}  # production mode requires it
    return create_app(Settings(**base))


def post(client, body: Any, service: str = SELECT, **kwargs: Any):
    return client.post(f"/cds-services/{service}", data=json.dumps(body), content_type="application/json",
                       **kwargs)


def assert_json_error(response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.get_data(as_text=True)[:300]
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert isinstance(body.get("error"), str) and isinstance(body.get("message"), str)
    return body


# --- CORS --------------------------------------------------------------------------------------------------


PREFLIGHT = {"Origin": SANDBOX, "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization, content-type"}


def allows_origin(response, origin: str) -> bool:
    """Any origin is allowed by default; flask-cors answers with the caller's origin (and Vary: Origin)."""
    return response.headers.get("Access-Control-Allow-Origin") in ("*", origin)


def allowed_headers(response) -> set[str]:
    value = response.headers.get("Access-Control-Allow-Headers", "")
    return {h.strip().lower() for h in value.split(",") if h.strip()}


@pytest.mark.parametrize("dev", [True, False])
def test_preflight_allows_authorization_and_content_type(tmp_path, dev: bool) -> None:
    client = make_app(tmp_path, dev=dev).test_client()
    for path in (f"/cds-services/{SELECT}", f"/cds-services/{SELECT}/feedback", "/cds-services"):
        response = client.options(path, headers=PREFLIGHT)
        assert response.status_code in (200, 204), (path, response.status_code)  # no token needed for a preflight
        assert allows_origin(response, SANDBOX)
        assert {"authorization", "content-type"} <= allowed_headers(response)
        assert "POST" in response.headers["Access-Control-Allow-Methods"]
        assert "Access-Control-Allow-Credentials" not in response.headers  # bearer tokens, not cookies


def test_cors_headers_on_answers_and_errors(tmp_path) -> None:
    client = make_app(tmp_path, dev=False).test_client()  # no clients file: hook calls get 401
    anywhere = "https://any-ehr.example"
    origin = {"Origin": anywhere}
    assert allows_origin(client.get("/cds-services", headers=origin), anywhere)
    refused = post(client, load_fixture(CPT), headers=origin)
    assert refused.status_code == 401
    assert allows_origin(refused, anywhere)  # the browser client can read the error
    dev = make_app(tmp_path / "dev", dev=True).test_client()
    response = post(dev, load_fixture(CPT), headers=origin)
    assert response.status_code == 200 and allows_origin(response, anywhere)
    bad = dev.post(f"/cds-services/{SELECT}", data="x", content_type="text/plain", headers=origin)
    assert bad.status_code == 415 and allows_origin(bad, anywhere)


def test_cors_origins_configurable(tmp_path) -> None:
    settings = Settings.from_env({"CDS_CORS_ORIGINS": f"{SANDBOX}/, https://ehr.example.org", "CDS_DEV": "1",
                                  "CDS_DATABASE_URL": f"sqlite:///{tmp_path / 'cors.sqlite3'}"})
    client = create_app(settings).test_client()
    allowed = client.options(f"/cds-services/{SELECT}", headers=PREFLIGHT)
    assert allowed.headers["Access-Control-Allow-Origin"] == SANDBOX
    assert "Origin" in allowed.headers.get("Vary", "")
    other = client.options(f"/cds-services/{SELECT}", headers={**PREFLIGHT, "Origin": "https://ehr.example.org"})
    assert other.headers["Access-Control-Allow-Origin"] == "https://ehr.example.org"
    evil = client.options(f"/cds-services/{SELECT}", headers={**PREFLIGHT, "Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in evil.headers
    response = client.get("/cds-services", headers={"Origin": "https://evil.example"})
    assert response.status_code == 200 and "Access-Control-Allow-Origin" not in response.headers


# --- limits ------------------------------------------------------------------------------------------------


def test_body_cap_is_413_json(tmp_path) -> None:
    client = make_app(tmp_path, max_body_bytes=2000).test_client()
    body = load_fixture(CPT)
    body["context"]["padding"] = "x" * 3000
    assert_json_error(post(client, body), 413)
    small = make_app(tmp_path / "b", max_body_bytes=len(json.dumps(load_fixture(CPT))) + 10).test_client()
    assert post(small, load_fixture(CPT)).status_code == 200  # just under the cap is fine


def post_chunked(client, data: bytes):
    """A body without Content-Length, as a WSGI server that de-chunks the request presents it."""
    return client.post(f"/cds-services/{SELECT}", input_stream=io.BytesIO(data),
                       headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"},
                       environ_overrides={"wsgi.input_terminated": True})


def test_chunked_body_over_cap_is_413_not_truncated(tmp_path) -> None:
    client = make_app(tmp_path, max_body_bytes=2000).test_client()
    body = load_fixture(CPT)
    body["context"]["padding"] = "x" * 3000
    assert_json_error(post_chunked(client, json.dumps(body).encode()), 413)
    roomy = make_app(tmp_path / "roomy").test_client()
    assert post_chunked(roomy, json.dumps(load_fixture(CPT)).encode()).status_code == 200


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "application/xml",
                                          "multipart/form-data; boundary=x", None])
def test_only_json_is_accepted(tmp_path, content_type: str | None) -> None:
    client = make_app(tmp_path).test_client()
    kwargs = {"content_type": content_type} if content_type else {}
    response = client.post(f"/cds-services/{SELECT}", data=json.dumps(load_fixture(CPT)), **kwargs)
    assert_json_error(response, 415)


def test_json_with_charset_is_accepted(tmp_path) -> None:
    client = make_app(tmp_path).test_client()
    response = client.post(f"/cds-services/{SELECT}", data=json.dumps(load_fixture(CPT)).encode(),
                           content_type="application/json; charset=utf-8")
    assert response.status_code == 200


@pytest.mark.parametrize("data", [
    b"[" * 65 + b"]" * 65,  # just past CDS_MAX_JSON_DEPTH (64)
    b"[" * 200_000 + b"]" * 200_000,  # deep enough to exhaust a recursive parser
    b"[" * 500_000,  # deep and unterminated
    b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
])
def test_deep_json_is_400(tmp_path, data: bytes) -> None:
    client = make_app(tmp_path, max_body_bytes=4 * 1024 * 1024).test_client()
    body = assert_json_error(client.post(f"/cds-services/{SELECT}", data=data, content_type="application/json"),
                             400)
    assert body["error"] == "invalid_request"


def test_deep_value_inside_a_valid_request_is_400(tmp_path) -> None:
    client = make_app(tmp_path).test_client()
    body = load_fixture(CPT)
    deep: Any = "x"
    for _ in range(80):
        deep = {"d": deep}
    body["context"]["draftOrders"]["entry"][0]["resource"]["note"] = deep
    assert "nested" in assert_json_error(post(client, body), 400)["message"]


def test_too_many_draft_orders_is_413_and_the_limit_itself_is_fine(tmp_path) -> None:
    client = make_app(tmp_path, max_draft_orders=5).test_client()
    body = load_fixture(CPT)
    entry = body["context"]["draftOrders"]["entry"][0]
    others = [copy.deepcopy(entry) for _ in range(4)]
    for index, other in enumerate(others):
        other["resource"]["id"] = f"other-{index}"
    body["context"]["draftOrders"]["entry"] = [entry, *others]
    assert post(client, body).status_code == 200
    body["context"]["draftOrders"]["entry"].append(copy.deepcopy(others[0]))
    error = assert_json_error(post(client, body), 413)
    assert error["error"] == "too_many_orders"


@pytest.mark.parametrize("data", [b"", b"{", b"\xff\xfe{}", b"\xef\xbb\xbf{}", b"NaN", b'{"a": 1e99999}',
                                  b'"\\ud800"', b"\x00"])
def test_malformed_bodies_are_400(tmp_path, data: bytes) -> None:
    client = make_app(tmp_path).test_client()
    assert_json_error(client.post(f"/cds-services/{SELECT}", data=data, content_type="application/json"), 400)


def test_real_server_limits_and_cors(start_server, tmp_path) -> None:
    server = start_server(env={"CDS_MAX_BODY_BYTES": "20000", "CDS_MAX_DRAFT_ORDERS": "3",
                               "CDS_CORS_ORIGINS": SANDBOX}, args=["--dev"], workers=2)
    url = f"{server.url}/cds-services/{SELECT}"
    body = load_fixture(CPT)

    def check(response: requests.Response, status: int) -> None:
        assert response.status_code == status, response.text[:300]
        assert response.headers["Content-Type"].startswith("application/json")
        assert "Traceback" not in response.text and response.json()["error"]

    assert requests.post(url, json=body, timeout=10).status_code == 200
    big = json.dumps({**body, "padding": "x" * 30000}).encode()
    check(requests.post(url, data=big, headers={"Content-Type": "application/json"}, timeout=10), 413)
    chunks = (big[i:i + 4096] for i in range(0, len(big), 4096))  # no Content-Length: chunked
    check(requests.post(url, data=chunks, headers={"Content-Type": "application/json"}, timeout=10), 413)
    check(requests.post(url, data=b"[" * 15000, headers={"Content-Type": "application/json"}, timeout=10), 400)
    check(requests.post(url, data=json.dumps(body), headers={"Content-Type": "text/plain"}, timeout=10), 415)
    many = load_fixture("order-sign-mixed.json")
    while len(many["context"]["draftOrders"]["entry"]) <= 3:
        many["context"]["draftOrders"]["entry"] += many["context"]["draftOrders"]["entry"]
    check(requests.post(f"{server.url}/cds-services/{SIGN}", json=many, timeout=10), 413)

    preflight = requests.options(url, headers=PREFLIGHT, timeout=10)
    assert preflight.status_code in (200, 204)
    assert preflight.headers["Access-Control-Allow-Origin"] == SANDBOX
    assert {"authorization", "content-type"} <= allowed_headers(preflight)
    evil = requests.options(url, headers={**PREFLIGHT, "Origin": "https://evil.example"}, timeout=10)
    assert "Access-Control-Allow-Origin" not in evil.headers


# --- fuzzing: generated and mutated hook requests never get a 5xx -----------------------------------------


FIXTURE_NAMES = sorted(p.name for p in FIXTURES.glob("*.json"))
FIXTURE_BODIES = {name: load_fixture(name) for name in FIXTURE_NAMES}

json_leaves = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2 ** 70), max_value=2 ** 70),
                        st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30),
                        st.sampled_from(["", "draft", "active", "ServiceRequest", "Bundle", "order-select",
                                         "order-sign", "Patient/x", "0200T", "22511", "sacroplasty"]))
json_values = st.recursive(json_leaves, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)), max_leaves=12)


def node_paths(value: Any, prefix: tuple = ()) -> Iterator[tuple]:
    """Every path (tuple of keys / indexes) to a node below the root."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        yield prefix + (key,)
        yield from node_paths(child, prefix + (key,))


def parent_of(doc: Any, path: tuple) -> Any:
    for key in path[:-1]:
        doc = doc[key]
    return doc


def mutate(doc: Any, data: st.DataObject) -> Any:
    paths = list(node_paths(doc))
    if not paths:
        return data.draw(json_values)
    path = data.draw(st.sampled_from(paths))
    parent, key = parent_of(doc, path), path[-1]
    operation = data.draw(st.sampled_from(["drop", "replace", "stringify", "wrap", "empty", "duplicate"]))
    if operation == "drop":
        del parent[key]
    elif operation == "replace":
        parent[key] = data.draw(json_values)
    elif operation == "stringify":
        parent[key] = json.dumps(parent[key])
    elif operation == "wrap":
        parent[key] = [parent[key]]
    elif operation == "empty":
        parent[key] = type(parent[key])() if isinstance(parent[key], (dict, list, str)) else None
    elif isinstance(parent, list):
        parent.append(copy.deepcopy(parent[key]))
    else:
        parent[data.draw(st.text(max_size=8))] = copy.deepcopy(parent[key])
    return doc


@pytest.fixture(scope="module")
def fuzz_client(tmp_path_factory):
    app = create_app(Settings(dev=True, database_url=f"sqlite:///{tmp_path_factory.mktemp('fuzz') / 'f.sqlite3'}",
                              max_draft_orders=20))
    return app.test_client()


def assert_sane(response) -> None:
    assert response.status_code < 500, response.get_data(as_text=True)[:500]
    assert response.mimetype == "application/json"
    body = response.get_json()
    if response.status_code >= 400:
        assert isinstance(body["error"], str) and isinstance(body["message"], str)
    else:
        assert isinstance(body["cards"], list)


@hypothesis_settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_fixtures_never_5xx(fuzz_client, data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(FIXTURE_NAMES))
    doc = copy.deepcopy(FIXTURE_BODIES[name])
    service = SERVICE[doc["hook"]] if data.draw(st.integers(0, 9)) else data.draw(st.sampled_from([SELECT, SIGN]))
    for _ in range(data.draw(st.integers(1, 4))):
        doc = mutate(doc, data)
    assert_sane(post(fuzz_client, doc, service=service))


@hypothesis_settings(max_examples=150, deadline=None)
@given(body=json_values, service=st.sampled_from([SELECT, SIGN]))
def test_generated_json_never_5xx(fuzz_client, body: Any, service: str) -> None:
    assert_sane(post(fuzz_client, body, service=service))


@hypothesis_settings(max_examples=150, deadline=None)
@given(raw=st.binary(max_size=300), content_type=st.sampled_from(
    ["application/json", "application/json; charset=latin-1", "application/fhir+json", "text/plain", ""]),
    path=st.sampled_from([SELECT, SIGN, f"{SELECT}/feedback", "no-such-service"]))
def test_raw_bytes_never_5xx(fuzz_client, raw: bytes, content_type: str, path: str) -> None:
    response = fuzz_client.post(f"/cds-services/{path}", data=raw, content_type=content_type or None)
    assert response.status_code < 500, response.get_data(as_text=True)[:300]
    assert response.mimetype == "application/json" and isinstance(response.get_json()["error"], str)


@hypothesis_settings(max_examples=100, deadline=None)
@given(feedback=st.one_of(json_values, st.fixed_dictionaries({"feedback": st.lists(json_values, max_size=3)})))
def test_generated_feedback_never_5xx(fuzz_client, feedback: Any) -> None:
    response = post(fuzz_client, feedback, service=f"{SELECT}/feedback")
    assert response.status_code < 500 or response.status_code == 501, response.get_data(as_text=True)[:300]
    assert response.mimetype == "application/json"


# --- no patient data in logs -------------------------------------------------------------------------------


SENSITIVE_KEYS = {"patientId", "userId", "encounterId", "id", "reference", "family", "given", "birthDate",
                  "subscriberId", "access_token", "fullUrl", "text"}


def patient_data(doc: Any, found: set[str] | None = None) -> set[str]:
    """The identifying strings of a hook request: ids, references, names, birth dates, identifiers, tokens,
    free text (hookInstance is not among them: it is logged on purpose)."""
    found = set() if found is None else found
    if isinstance(doc, dict):
        for key, value in doc.items():
            if key in SENSITIVE_KEYS and isinstance(value, str):
                found.add(value)
            elif key in SENSITIVE_KEYS and isinstance(value, list):
                found.update(v for v in value if isinstance(v, str))
            elif key == "identifier" and isinstance(value, list):
                found.update(i["value"] for i in value if isinstance(i, dict) and isinstance(i.get("value"), str))
            elif key == "requester" and isinstance(value, dict) and isinstance(value.get("display"), str):
                found.add(value["display"])
            patient_data(value, found)
    elif isinstance(doc, list):
        for item in doc:
            patient_data(item, found)
    return found


CPT_PATIENT_DATA = patient_data(load_fixture(CPT))


def test_patient_data_list_is_not_empty() -> None:
    assert {"pt-sh-1001", "Whitfield", "Dolores", "1948-03-12", "000-00-1001", "example-access-token",
            "Practitioner/pr-ortho-77", "enc-sh-5501", "SH-7733-1001", "Dr. Amelia Brandt"} <= CPT_PATIENT_DATA


def hostile_variants() -> Iterator[tuple[str, dict[str, Any]]]:
    """Requests carrying the fixture's patient data that end in every kind of answer."""
    body = load_fixture(CPT)
    yield SELECT, body
    wrong_hook = copy.deepcopy(body)
    wrong_hook["hook"] = "Whitfield"
    yield SELECT, wrong_hook
    unknown_selection = copy.deepcopy(body)
    unknown_selection["context"]["selections"] = ["ServiceRequest/pt-sh-1001"]
    yield SELECT, unknown_selection
    bad_patient = copy.deepcopy(body)
    bad_patient["context"]["patientId"] = ["pt-sh-1001"]
    yield SELECT, bad_patient
    bad_prefetch = copy.deepcopy(body)
    bad_prefetch["prefetch"]["patient"]["birthDate"] = {"Whitfield": "1948-03-12"}
    yield SELECT, bad_prefetch
    as_sign = copy.deepcopy(body)
    as_sign["hook"] = "order-sign"
    yield SIGN, as_sign
    bad_fhir_server = copy.deepcopy(body)
    bad_fhir_server["fhirServer"] = "not a url pt-sh-1001"
    yield SELECT, bad_fhir_server


def leaked(text: str) -> list[str]:
    return sorted(value for value in CPT_PATIENT_DATA if value in text)


def test_logs_hold_no_patient_data_in_process(tmp_path, caplog) -> None:
    app = make_app(tmp_path, log_level="DEBUG")
    caplog.set_level(logging.DEBUG)
    client = app.test_client()
    statuses = set()
    for service, body in hostile_variants():
        statuses.add(post(client, body, service=service).status_code)
    statuses.add(client.post(f"/cds-services/{SELECT}", data=json.dumps(load_fixture(CPT)),
                             content_type="text/plain").status_code)
    assert {200, 400, 415} <= statuses
    assert "hookInstance=4d864266-9814-5dcc-bfcb-4fa6469715de" in caplog.text  # the log does say what happened
    assert leaked(caplog.text) == []


def test_logs_hold_no_patient_data_real_server(start_server, tmp_path) -> None:
    log = tmp_path / "server.log"
    server = start_server(env={"CDS_TEST_LOG": str(log), "CDS_LOG_LEVEL": "DEBUG"}, args=["--dev"], workers=2)
    statuses = set()
    for service, body in hostile_variants():
        statuses.add(requests.post(f"{server.url}/cds-services/{service}", json=body, timeout=10).status_code)
    assert {200, 400} <= statuses
    deadline = time.monotonic() + 5  # the server writes its log lines a few times a second (logs.py)
    text = ""
    while not ("status=200" in text and "status=400" in text) and time.monotonic() < deadline:
        time.sleep(0.1)
        text = log.read_text(encoding="utf-8", errors="replace")
    assert "status=200" in text and "status=400" in text
    assert leaked(text) == []


def test_hook_instance_cannot_forge_log_lines(tmp_path, caplog) -> None:
    """hookInstance is logged, and the client chooses it: a line break in it must not start a new log line."""
    app = make_app(tmp_path)
    caplog.set_level(logging.INFO)
    body = load_fixture(CPT)
    body["hookInstance"] = "d1\nCRITICAL forged entry\r\x1b[2J"
    assert post(app.test_client(), body).status_code in (200, 400)
    for record in caplog.records:
        message = record.getMessage()
        assert "\n" not in message and "\r" not in message and "\x1b" not in message, message


def test_auth_app_logs_hold_no_patient_data(tmp_path, caplog) -> None:
    app = make_app(tmp_path, dev=False, log_level="DEBUG")  # no clients: refused before the body is read
    caplog.set_level(logging.DEBUG)
    response = post(app.test_client(), load_fixture(CPT),
                    headers={"Authorization": "Bearer example-access-token.pt-sh-1001.Whitfield"})
    assert response.status_code == 401
    assert "reason=" in caplog.text and leaked(caplog.text) == []


# --- dev mode is loud --------------------------------------------------------------------------------------


def test_dev_mode_warns_at_start_and_on_discovery(tmp_path, caplog) -> None:
    caplog.set_level(logging.WARNING)
    app = make_app(tmp_path, dev=True)
    start = [r for r in caplog.records if r.levelno >= logging.WARNING and "DEV MODE" in r.getMessage()]
    assert start
    caplog.clear()
    assert app.test_client().get("/cds-services").status_code == 200
    assert any(r.levelno >= logging.WARNING and "DEV MODE" in r.getMessage() for r in caplog.records)


def test_production_mode_does_not_claim_dev(tmp_path, caplog) -> None:
    caplog.set_level(logging.WARNING)
    app = make_app(tmp_path, dev=False)
    app.test_client().get("/cds-services")
    assert "DEV MODE" not in caplog.text


def test_real_server_dev_mode_is_loud(start_server, tmp_path) -> None:
    log = tmp_path / "server.log"
    server = start_server(env={"CDS_TEST_LOG": str(log)}, args=["--dev"], workers=2)
    started = log.read_text(encoding="utf-8").count("DEV MODE")
    assert started >= 1
    assert requests.get(server.url + "/cds-services", timeout=10).status_code == 200
    assert log.read_text(encoding="utf-8").count("DEV MODE") > started
