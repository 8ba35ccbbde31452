"""`cds-service call` and `cds-service keys`: the CDS Hooks 2.0 response check, JWT signing, exit codes,
against the real server and against small test servers that answer what we tell them to."""

from __future__ import annotations

import copy
import json
import os
import re
import stat
from pathlib import Path
from typing import Any

import conftest
import jwt
import pytest
from conftest import FIXTURES, free_port, load_fixture
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from cds_service.cli import main
from cds_service.tools.conformance import check_response
from cds_service.tools.signing import thumbprint

SACRO = FIXTURES / "order-select-sacroplasty-cpt.json"
SERVICE_PATH = "/cds-services/sacroplasty-order-select"


def valid_response() -> dict[str, Any]:
    """A small response that uses every card feature and conforms to CDS Hooks 2.0."""
    return {
        "cards": [{
            "uuid": "card-1",
            "summary": "A short summary",
            "detail": "Some **detail**.",
            "indicator": "warning",
            "source": {"label": "Policy", "url": "https://example.org/policy",
                       "topic": {"system": "urn:topics", "code": "t"}},
            "suggestions": [{
                "label": "Do this instead",
                "uuid": "suggestion-1",
                "actions": [
                    {"type": "delete", "description": "Remove the order", "resourceId": "ServiceRequest/1"},
                    {"type": "create", "description": "Add an order", "resource": {"resourceType": "ServiceRequest"}},
                ],
            }],
            "selectionBehavior": "at-most-one",
            "overrideReasons": [{"system": "urn:reasons", "code": "r1", "display": "Reason one"}],
            "links": [{"label": "More", "url": "https://example.org/more", "type": "absolute"}],
        }],
        "systemActions": [{"type": "update", "description": "Annotate",
                           "resource": {"resourceType": "ServiceRequest", "id": "1"}}],
    }


def card(response: dict[str, Any]) -> dict[str, Any]:
    return response["cards"][0]


# (what is wrong, how to break a valid response, the path the problem must name)
MALFORMED = [
    ("no cards", lambda r: r.pop("cards"), "cards: is required"),
    ("cards not a list", lambda r: r.update(cards={}), "cards: must be an array"),
    ("card not an object", lambda r: r.update(cards=["text"]), "cards[0]: must be a JSON object"),
    ("no summary", lambda r: card(r).pop("summary"), "cards[0].summary: is required"),
    ("summary of 140 characters", lambda r: card(r).update(summary="x" * 140), "cards[0].summary: is 140 characters"),
    ("summary not text", lambda r: card(r).update(summary=5), "cards[0].summary: must be a string"),
    ("unknown indicator", lambda r: card(r).update(indicator="urgent"), "cards[0].indicator"),
    ("no indicator", lambda r: card(r).pop("indicator"), "cards[0].indicator: is required"),
    ("no source", lambda r: card(r).pop("source"), "cards[0].source: is required"),
    ("source without label", lambda r: card(r)["source"].pop("label"), "cards[0].source.label: is required"),
    ("relative source url", lambda r: card(r)["source"].update(url="/policy"), "cards[0].source.url"),
    ("topic without code", lambda r: card(r)["source"]["topic"].pop("code"), "cards[0].source.topic.code"),
    ("null detail", lambda r: card(r).update(detail=None), "cards[0].detail: is null"),
    ("empty suggestions", lambda r: card(r).update(suggestions=[]), "cards[0].suggestions: is []"),
    ("suggestions without selectionBehavior", lambda r: card(r).pop("selectionBehavior"),
     "cards[0].selectionBehavior: is required"),
    ("unknown selectionBehavior", lambda r: card(r).update(selectionBehavior="one"), "cards[0].selectionBehavior"),
    ("suggestion without label", lambda r: card(r)["suggestions"][0].pop("label"),
     "cards[0].suggestions[0].label: is required"),
    ("isRecommended not boolean", lambda r: card(r)["suggestions"][0].update(isRecommended="yes"),
     "cards[0].suggestions[0].isRecommended"),
    ("unknown action type", lambda r: card(r)["suggestions"][0]["actions"][0].update(type="remove"),
     "cards[0].suggestions[0].actions[0].type"),
    ("action without description", lambda r: card(r)["suggestions"][0]["actions"][0].pop("description"),
     "cards[0].suggestions[0].actions[0].description: is required"),
    ("create without resource", lambda r: card(r)["suggestions"][0]["actions"][1].pop("resource"),
     "cards[0].suggestions[0].actions[1].resource"),
    ("create of a non-resource", lambda r: card(r)["suggestions"][0]["actions"][1].update(resource={"id": "x"}),
     "cards[0].suggestions[0].actions[1].resource.resourceType"),
    ("resourceId as an array", lambda r: card(r)["suggestions"][0]["actions"][0].update(resourceId=["a"]),
     "cards[0].suggestions[0].actions[0].resourceId: must be a single string"),
    ("override reason without display", lambda r: card(r)["overrideReasons"][0].pop("display"),
     "cards[0].overrideReasons[0].display: is required"),
    ("link of unknown type", lambda r: card(r)["links"][0].update(type="web"), "cards[0].links[0].type"),
    ("relative link url", lambda r: card(r)["links"][0].update(url="more.html"), "cards[0].links[0].url"),
    ("appContext on an absolute link", lambda r: card(r)["links"][0].update(appContext="x"),
     "cards[0].links[0].appContext"),
    ("uuid not text", lambda r: card(r).update(uuid=7), "cards[0].uuid: must be a string"),
    ("same uuid twice", lambda r: card(r)["suggestions"][0].update(uuid="card-1"),
     "cards[0].suggestions[0].uuid: 'card-1' is not unique"),
    ("same card uuid on two cards", lambda r: r["cards"].append(copy.deepcopy(card(r))), "cards[1].uuid"),
    ("empty systemActions", lambda r: r.update(systemActions=[]), "systemActions: is []"),
    ("systemAction of unknown type", lambda r: r["systemActions"][0].update(type="patch"), "systemActions[0].type"),
    ("extension not an object", lambda r: card(r).update(extension=["x"]), "cards[0].extension"),
]


def test_a_valid_response_conforms() -> None:
    result = check_response(valid_response())
    assert result.problems == [] and result.notes == []
    assert check_response({"cards": []}).ok


def test_a_summary_of_139_characters_conforms() -> None:
    response = valid_response()
    card(response)["summary"] = "x" * 139
    assert check_response(response).ok


@pytest.mark.parametrize("what, damage, named", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_each_problem_is_found_and_named(what: str, damage, named: str) -> None:
    response = valid_response()
    damage(response)
    result = check_response(response)
    assert not result.ok, what
    assert any(p.startswith(named) for p in result.problems), result.problems


def test_should_rules_are_notes_not_failures() -> None:
    """uuid is OPTIONAL in CDS Hooks 2.0 and resourceId a SHOULD: worth saying, not a failure."""
    response = valid_response()
    card(response).pop("uuid")
    card(response)["suggestions"][0]["actions"][0].pop("resourceId")
    result = check_response(response)
    assert result.ok
    assert any(n.startswith("cards[0]: has no uuid") for n in result.notes)
    assert any("resourceId" in n for n in result.notes)


def test_our_own_cards_conform(client) -> None:
    for name in ("order-select-sacroplasty-cpt.json", "order-sign-mixed.json"):
        body = load_fixture(name)
        service = "sacroplasty-order-select" if body["hook"] == "order-select" else "sacroplasty-order-sign"
        response = client.post(f"/cds-services/{service}", json=body)
        assert response.status_code == 200
        assert response.get_json()["cards"], name
        result = check_response(response.get_json())
        assert result.problems == [] and result.notes == [], name


# ----- against the real server ------------------------------------------------------------------------

def test_call_the_real_server_prints_cards_and_exits_0(start_server, capsys) -> None:
    server = start_server(args=["--dev"])
    code = main(["call", server.url + SERVICE_PATH, str(SACRO)])
    out, err = capsys.readouterr()
    assert code == 0, err
    policy = json.loads((conftest.ROOT / "cards/ccp1247-sacroplasty/policy.json").read_text())
    assert "-> HTTP 200 in " in out and " ms: 1 card, 1 system action" in out
    assert f"[WARNING] {policy['card']['summary']}" in out
    assert "1. Order a facet joint injection instead" in out
    assert "delete ServiceRequest/sr-sacro-1" in out
    assert "The response conforms to CDS Hooks 2.0." in out


@pytest.mark.parametrize("service, fixture", [
    ("coverage-order-dispatch", "order-dispatch-sacroplasty.json"),
    ("coverage-appointment-book", "appointment-book-sacroplasty-order.json"),
    ("coverage-appointment-book", "appointment-book-sacroplasty-coded.json"),
])
def test_call_works_for_the_dispatch_and_booking_hooks(start_server, capsys, service: str, fixture: str) -> None:
    server = start_server(args=["--dev"])
    code = main(["call", f"{server.url}/cds-services/{service}", str(FIXTURES / fixture)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "-> HTTP 200 in " in out and " ms: 1 card, 1 system action" in out
    assert "delete " not in out  # no suggestions for the performer or the scheduler
    assert "The response conforms to CDS Hooks 2.0." in out


def test_call_json_prints_the_raw_response(start_server, capsys) -> None:
    server = start_server(args=["--dev"])
    assert main(["call", "--json", server.url + SERVICE_PATH, str(SACRO)]) == 0
    out, err = capsys.readouterr()
    response = json.loads(out)
    assert response["cards"][0]["suggestions"] and response["systemActions"]
    assert "conforms" in err


# ----- against a test server that answers what we tell it to ------------------------------------------

def test_call_names_each_problem_of_a_malformed_card(httpserver, capsys) -> None:
    bad = {"cards": [{"summary": "x" * 150, "indicator": "urgent", "source": {},
                      "suggestions": [{"label": "Fix it", "actions": [{"type": "remove"}]}]}]}
    httpserver.expect_request("/cds-services/other", method="POST").respond_with_json(bad)
    code = main(["call", httpserver.url_for("/cds-services/other"), str(SACRO)])
    out, err = capsys.readouterr()
    assert code == 1
    for named in ("cards[0].summary: is 150 characters", "cards[0].source: is {}",
                  "cards[0].indicator: \"urgent\" is not one of", "cards[0].source.label: is required",
                  "cards[0].selectionBehavior: is required",
                  "cards[0].suggestions[0].actions[0].type", "cards[0].suggestions[0].actions[0].description"):
        assert named in err, named
    assert "does not conform to CDS Hooks 2.0 (7 problems)" in err
    assert "[URGENT] " + "x" * 150 in out  # still shown, so the integrator sees what came back


def test_call_sends_the_file_as_json(httpserver, capsys) -> None:
    httpserver.expect_request("/cds-services/other", method="POST").respond_with_json({"cards": []})
    assert main(["call", httpserver.url_for("/cds-services/other"), str(SACRO)]) == 0
    request, _ = httpserver.log[0]
    assert request.headers["Content-Type"] == "application/json"
    assert "Authorization" not in request.headers
    assert json.loads(request.get_data()) == load_fixture(SACRO.name)
    assert "0 cards" in capsys.readouterr().out


@pytest.mark.parametrize("status, body", [(500, "oops"), (404, {"error": "unknown_service", "message": "no such"})])
def test_call_a_service_that_fails_exits_1(httpserver, capsys, status: int, body) -> None:
    handler = httpserver.expect_request("/cds-services/other", method="POST")
    if isinstance(body, dict):
        handler.respond_with_json(body, status=status)
    else:
        handler.respond_with_data(body, status=status)
    assert main(["call", httpserver.url_for("/cds-services/other"), str(SACRO)]) == 1
    out, err = capsys.readouterr()
    assert f"HTTP {status}" in out and f"did not answer 200 OK (HTTP {status})" in err
    assert (body["message"] if isinstance(body, dict) else body) in out


def test_call_a_response_that_is_not_json_exits_1(httpserver, capsys) -> None:
    httpserver.expect_request("/cds-services/other", method="POST").respond_with_data("<html>hi</html>")
    assert main(["call", httpserver.url_for("/cds-services/other"), str(SACRO)]) == 1
    assert "response: is not JSON" in capsys.readouterr().err


# ----- usage errors: exit 2 with one line -------------------------------------------------------------

def usage_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_usage_errors_exit_2_with_one_line(tmp_path: Path, capsys, httpserver) -> None:
    url = httpserver.url_for("/cds-services/other")
    assert "cannot read" in usage_error(capsys, ["call", url, str(tmp_path / "missing.json")])
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    assert "not valid JSON" in usage_error(capsys, ["call", url, str(broken)])
    listing = tmp_path / "list.json"
    listing.write_text("[]")
    assert "JSON object" in usage_error(capsys, ["call", url, str(listing)])
    assert "http(s)" in usage_error(capsys, ["call", "ftp://host/cds-services/x", str(SACRO)])
    assert "http(s)" in usage_error(capsys, ["call", "cds-services/x", str(SACRO)])
    assert "--iss" in usage_error(capsys, ["call", url, str(SACRO), "--key", str(SACRO)])
    assert "only used with --key" in usage_error(capsys, ["call", url, str(SACRO), "--iss", "me"])
    assert "not a PEM private key" in usage_error(capsys, ["call", url, str(SACRO), "--key", str(SACRO),
                                                           "--iss", "me"])
    assert httpserver.log == []  # nothing was sent


def test_connection_refused_exits_2(capsys) -> None:
    port = free_port()  # nothing listens there
    err = usage_error(capsys, ["call", f"http://127.0.0.1:{port}/cds-services/x", str(SACRO)])
    assert "cannot reach" in err and "connection refused" in err


def test_a_key_of_the_wrong_kind_is_refused(tmp_path: Path, capsys) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    p256 = tmp_path / "p256.pem"
    p256.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    url = f"http://127.0.0.1:{free_port()}/cds-services/x"
    assert "P-384" in usage_error(capsys, ["call", url, str(SACRO), "--key", str(p256), "--iss", "me"])
    es = tmp_path / "es.pem"
    assert main(["keys", "--out", str(es)]) == 0
    capsys.readouterr()
    assert "does not match" in usage_error(capsys, ["call", url, str(SACRO), "--key", str(es), "--iss", "me",
                                                    "--alg", "RS384"])


# ----- keys and signed calls --------------------------------------------------------------------------

def make_keys(tmp_path: Path, capsys, *extra: str, name: str = "client.pem") -> tuple[Path, dict[str, Any]]:
    pem = tmp_path / name
    assert main(["keys", "--out", str(pem), *extra]) == 0
    out, err = capsys.readouterr()
    assert str(pem) in err
    return pem, json.loads(out)


@pytest.mark.parametrize("alg", ["ES384", "RS384"])
def test_keys_writes_a_private_pem_and_prints_the_public_jwks(tmp_path: Path, capsys, alg: str) -> None:
    pem, jwks = make_keys(tmp_path, capsys, "--alg", alg)
    assert stat.S_IMODE(os.stat(pem).st_mode) == 0o600
    assert b"PRIVATE KEY" in pem.read_bytes()
    [jwk] = jwks["keys"]
    assert jwk["alg"] == alg and jwk["use"] == "sig"
    assert jwk["kty"] == ("EC" if alg == "ES384" else "RSA")
    assert not {"d", "p", "q", "dp", "dq", "qi"} & set(jwk)  # public only
    assert jwk["kid"] == thumbprint(jwk)


def test_keys_never_overwrites(tmp_path: Path, capsys) -> None:
    pem, _ = make_keys(tmp_path, capsys, "--kid", "first")
    before = pem.read_bytes()
    assert "already exists" in usage_error(capsys, ["keys", "--out", str(pem)])
    assert pem.read_bytes() == before


def public_key(jwk: dict[str, Any]):
    algorithm = ECAlgorithm if jwk["kty"] == "EC" else RSAAlgorithm
    return algorithm.from_jwk(json.dumps(jwk))


@pytest.mark.parametrize("alg", ["ES384", "RS384"])
def test_call_with_a_key_signs_a_fresh_jwt_for_this_url(tmp_path: Path, capsys, httpserver, alg: str) -> None:
    pem, jwks = make_keys(tmp_path, capsys, "--alg", alg, "--kid", "my-key-1")
    [jwk] = jwks["keys"]
    httpserver.expect_request("/cds-services/other", method="POST").respond_with_json({"cards": []})
    url = httpserver.url_for("/cds-services/other")
    for _ in range(2):
        assert main(["call", url, str(SACRO), "--key", str(pem), "--iss", "https://ehr.example.org",
                     "--kid", "my-key-1"]) == 0
    tokens = [r.headers["Authorization"].removeprefix("Bearer ") for r, _ in httpserver.log]
    claims = [jwt.decode(t, public_key(jwk), algorithms=[alg], audience=url, issuer="https://ehr.example.org")
              for t in tokens]
    for token, claim in zip(tokens, claims, strict=True):
        assert jwt.get_unverified_header(token) == {"alg": alg, "kid": "my-key-1", "typ": "JWT"}
        assert claim["aud"] == url
        assert claim["exp"] - claim["iat"] == 300
        assert set(claim) == {"iss", "aud", "exp", "iat", "jti"}
    assert claims[0]["jti"] != claims[1]["jti"]


def test_the_default_kid_is_the_one_keys_printed(tmp_path: Path, capsys, httpserver) -> None:
    pem, jwks = make_keys(tmp_path, capsys)
    httpserver.expect_request("/cds-services/other", method="POST").respond_with_json({"cards": []})
    assert main(["call", httpserver.url_for("/cds-services/other"), str(SACRO), "--key", str(pem),
                 "--iss", "me"]) == 0
    token = httpserver.log[0][0].headers["Authorization"].removeprefix("Bearer ")
    assert jwt.get_unverified_header(token)["kid"] == jwks["keys"][0]["kid"]


def test_the_service_with_auth_on_accepts_a_signed_call(tmp_path: Path, capsys, start_server) -> None:
    """Needs cds_service/auth.py (clients file + public URL). The aud a client signs must equal the URL the
    service believes it has, so the port is chosen before the server starts."""
    pem, jwks = make_keys(tmp_path, capsys, "--alg", "ES384")
    stranger, _ = make_keys(tmp_path, capsys, name="stranger.pem")
    clients = tmp_path / "clients.json"
    clients.write_text(json.dumps({"clients": [{"iss": "https://ehr.example.org", "jwks": jwks}]}))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = start_server(env={"CDS_CLIENTS_FILE": str(clients), "CDS_PUBLIC_URL": base}, args=[], port=port)
    assert server.url == base
    url = base + SERVICE_PATH

    assert main(["call", url, str(SACRO), "--key", str(pem), "--iss", "https://ehr.example.org"]) == 0
    assert "The response conforms" in capsys.readouterr().out

    assert main(["call", url, str(SACRO)]) == 1  # no token
    assert "HTTP 401" in capsys.readouterr().out
    assert main(["call", url, str(SACRO), "--key", str(stranger), "--iss", "https://ehr.example.org"]) == 1
    assert "HTTP 401" in capsys.readouterr().out  # a key the service does not know


# ----- a hostile service cannot act on the terminal (issue 13, finding 6) -----------------------------------

TERMINAL_CONTROL = "[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]"  # all but line feed


def hostile_response() -> dict[str, Any]:
    response = valid_response()
    title, clear, csi = "\x1b]0;owned\x07", "\x1b[2J\x1b[H", "\x9b31m"
    card(response).update(summary=f"Sum{title}mary{clear}", detail=f"line one{csi}\nline two\r\nfake: conforms",
                          indicator="warning")
    card(response)["source"]["label"] = "Policy\u202eevil"
    card(response)["suggestions"][0]["label"] = "Do\rThe response conforms to CDS Hooks 2.0."
    card(response)["suggestions"][0]["actions"][1]["description"] = "Add\x08\x08\x08 an order\x7f"
    card(response)["overrideReasons"][0]["display"] = "Reason\x1b[1A"
    card(response)["links"][0]["label"] = "More\u2028trailing"
    card(response)[f"x-key{title}"] = ""  # a key: named in a conformance problem
    return response


def test_call_escapes_control_characters_from_the_other_service(httpserver, capsys) -> None:
    httpserver.expect_request("/cds-services/other", method="POST").respond_with_json(hostile_response())
    code = main(["call", httpserver.url_for("/cds-services/other"), str(SACRO)])
    out, err = capsys.readouterr()
    assert code == 1  # the empty extra key does not conform
    for stream in (out, err):
        assert not re.search(TERMINAL_CONTROL, stream), repr(stream)
    assert "Sum\\u001b]0;owned\\u0007mary" in out  # shown, as visible escapes
    assert "    line one\\u009b31m" in out and "    line two" in out  # the detail keeps its own lines
    assert "x-key\\u001b]0;owned\\u0007: is" in err
    assert not any(line.startswith("The response conforms") for line in (out + err).splitlines())


def test_call_json_escapes_control_characters_and_stays_json(httpserver, capsys) -> None:
    body = hostile_response()
    body["cards"][0]["detail"] += "\x85\x9b"  # C1 controls are allowed raw in a JSON string
    raw = json.dumps(body, ensure_ascii=False).replace("\\u009b", "\x9b").replace("\\u0085", "\x85")
    httpserver.expect_request("/cds-services/other", method="POST").respond_with_data(
        raw, content_type="application/json")
    main(["call", "--json", httpserver.url_for("/cds-services/other"), str(SACRO)])
    out, err = capsys.readouterr()
    assert "\x9b" in raw and not re.search(TERMINAL_CONTROL, out + err)
    assert json.loads(out) == body  # escaped inside the strings, so the same JSON
