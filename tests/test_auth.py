"""Client authentication (issue 3): signed JWTs, trusted issuers, audience, replay, key sets, fail-fast config.

Keys are generated here; key sets are served by real HTTP servers on 127.0.0.1; the end-to-end tests run the
real `cds-service serve` with two workers.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests
from conftest import free_port, load_fixture
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from cds_service import create_app
from cds_service.auth import Authenticator
from cds_service.auth.clients import ClientsFileError, load_clients
from cds_service.auth.keysets import JWKS_MIN_REFRESH, KeySetCache, KeySetError, fetch_jwks
from cds_service.config import ConfigError, Settings
from cds_service.errors import ApiError
from cds_service.storage.store import Store

PUBLIC = "https://cds.example.test"
ISS = "https://ehr.example.org"
ISS_INLINE = "https://ehr-inline.example.org"
HOOK = "sacroplasty-order-select"
FIXTURE = "order-select-sacroplasty-cpt.json"


# --- keys and tokens -------------------------------------------------------------------------------------


class Key:
    """A generated key pair with its kid and JWS algorithm."""

    def __init__(self, private: Any, kid: str, alg: str) -> None:
        self.private, self.kid, self.alg = private, kid, alg

    def jwk(self) -> dict[str, Any]:
        algorithm = jwt.algorithms.ECAlgorithm if self.alg.startswith("ES") else jwt.algorithms.RSAAlgorithm
        data = json.loads(algorithm.to_jwk(self.private.public_key()))
        return {**data, "kid": self.kid, "use": "sig", "alg": self.alg}

    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(serialization.Encoding.PEM,
                                                      serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.fixture(scope="module")
def keys() -> dict[str, Key]:
    return {
        "ec": Key(ec.generate_private_key(ec.SECP384R1()), "ec-1", "ES384"),
        "rsa": Key(rsa.generate_private_key(public_exponent=65537, key_size=2048), "rsa-1", "RS384"),
        "ec2": Key(ec.generate_private_key(ec.SECP384R1()), "ec-2", "ES384"),  # rotated in later
        "other": Key(ec.generate_private_key(ec.SECP384R1()), "ec-1", "ES384"),  # same kid, not published
        "p256": Key(ec.generate_private_key(ec.SECP256R1()), "p256-1", "ES256"),
        "inline": Key(rsa.generate_private_key(public_exponent=65537, key_size=2048), "inline-1", "RS384"),
    }


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(iss: str = ISS, aud: Any = f"{PUBLIC}/cds-services/{HOOK}", lifetime: int = 300,
           **extra: Any) -> dict[str, Any]:
    now = int(time.time())
    body = {"iss": iss, "aud": aud, "iat": now, "exp": now + lifetime, "jti": str(uuid.uuid4()), **extra}
    return {k: v for k, v in body.items() if v is not None}


def sign(key: Key, payload: dict[str, Any] | None = None, alg: str | None = None, **headers: Any) -> str:
    head = {"kid": key.kid, "typ": "JWT", **headers}
    return jwt.encode(payload or claims(), key.private, algorithm=alg or key.alg,
                      headers={k: v for k, v in head.items() if v is not None})


def hs256_with_public_key(key: Key, payload: dict[str, Any]) -> str:
    """The classic algorithm-confusion attack: HMAC over the token, keyed with the published public key."""
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": key.kid}).encode())
    signing_input = f"{head}.{b64(json.dumps(payload).encode())}"
    return f"{signing_input}.{b64(hmac.new(key.public_pem(), signing_input.encode(), hashlib.sha256).digest())}"


def unsigned(key: Key, payload: dict[str, Any]) -> str:
    return jwt.encode(payload, None, algorithm="none", headers={"kid": key.kid})


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# --- key servers -----------------------------------------------------------------------------------------


class KeyServer:
    """A JWKS endpoint on 127.0.0.1 whose key set the test can change; it records every request."""

    def __init__(self) -> None:
        self.server = HTTPServer(host="127.0.0.1", port=0)
        self.sets: dict[str, dict[str, Any]] = {}
        self.server.expect_request(re.compile("^/"), method="GET").respond_with_handler(self._serve)
        self.server.start()

    def _serve(self, req: Request) -> Response:
        if req.path not in self.sets:
            return Response("not found", status=404)
        return Response(json.dumps(self.sets[req.path]), content_type="application/json")

    def publish(self, path: str, *keys: Key) -> str:
        self.sets[path] = {"keys": [k.jwk() for k in keys]}
        return self.url(path)

    def url(self, path: str) -> str:
        return self.server.url_for(path)

    def hits(self, path: str | None = None) -> int:
        return sum(1 for req, _ in self.server.log if path is None or req.path == path)

    def stop(self) -> None:
        if self.server.is_running():
            self.server.stop()


@pytest.fixture
def key_server() -> Iterator[KeyServer]:
    server = KeyServer()
    yield server
    server.stop()


@pytest.fixture
def evil_server() -> Iterator[KeyServer]:
    """A key server no client configuration names: nothing may ever contact it."""
    server = KeyServer()
    yield server
    server.stop()


def write_clients(path: Path, clients: list[dict[str, Any]]) -> str:
    path.write_text(json.dumps({"clients": clients}), encoding="utf-8")
    return str(path)


@pytest.fixture
def clients_file(tmp_path: Path, keys: dict[str, Key], key_server: KeyServer) -> str:
    jwks_url = key_server.publish("/jwks.json", keys["ec"], keys["rsa"])
    rotated = key_server.publish("/rotated.json", keys["ec2"])
    return write_clients(tmp_path / "clients.json", [
        {"iss": ISS, "jwks_url": jwks_url, "jku": [rotated]},
        {"iss": ISS_INLINE, "jwks": {"keys": [keys["inline"].jwk()]}, "tenant": "hosp-1"},
    ])


def auth_app(tmp_path: Path, clients_file: str | None, public_url: str | None = PUBLIC,
             database_url: str | None = None):
    return create_app(Settings(dev=False, clients_file=clients_file, public_url=public_url,
                               database_url=database_url or f"sqlite:///{tmp_path / 'auth.sqlite3'}"))


@pytest.fixture
def client(tmp_path: Path, clients_file: str):
    return auth_app(tmp_path, clients_file).test_client()


def hook(client, token: str | None, service: str = HOOK, path: str = "", body: Any = None):
    headers = bearer(token) if token is not None else {}
    return client.post(f"/cds-services/{service}{path}", json=body if body is not None else load_fixture(FIXTURE),
                       headers=headers)


REFUSED_BODY = {"error": "invalid_token", "message": "the bearer token was not accepted"}


def assert_refused(response) -> None:
    """401, a JSON error that says nothing about why, and a Bearer challenge naming invalid_token."""
    assert response.status_code == 401, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    assert response.get_json() == REFUSED_BODY
    assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]
    assert response.headers["WWW-Authenticate"].startswith("Bearer ")


# --- in-process: accepted tokens --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ec", "rsa"])
def test_valid_token_accepted(client, keys, name: str) -> None:
    response = hook(client, sign(keys[name]))
    assert response.status_code == 200, response.get_data(as_text=True)
    assert len(response.get_json()["cards"]) == 1


def test_aud_as_array_and_inline_key_set_with_tenant(client, keys) -> None:
    payload = claims(iss=ISS_INLINE, aud=[f"{PUBLIC}/cds-services/{HOOK}"], tenant="hosp-1")
    assert hook(client, sign(keys["inline"], payload)).status_code == 200


def test_jku_on_allow_list_is_fetched_and_used(client, keys, key_server) -> None:
    token = sign(keys["ec2"], jku=key_server.url("/rotated.json"))
    assert hook(client, token).status_code == 200
    assert key_server.hits("/rotated.json") == 1


def test_feedback_accepts_service_or_feedback_audience(client, keys) -> None:
    endpoint = f"{PUBLIC}/cds-services/{HOOK}"
    for aud in (endpoint, endpoint + "/feedback"):
        response = hook(client, sign(keys["ec"], claims(aud=aud)), path="/feedback", body={"feedback": []})
        assert response.status_code != 401, aud  # authenticated; what feedback answers is its own business
    assert_refused(hook(client, sign(keys["ec"], claims(aud=endpoint + "/feedback"))))  # not for a hook call


def test_production_without_public_url_refuses_to_start(tmp_path, clients_file) -> None:
    """Issue 13, finding 9: the audience is never taken from the request's Host."""
    with pytest.raises(ConfigError, match="CDS_PUBLIC_URL"):
        auth_app(tmp_path, clients_file, public_url=None)
    with pytest.raises(ConfigError, match="CDS_PUBLIC_URL"):
        Authenticator(Settings(clients_file=clients_file), Store(f"sqlite:///{tmp_path / 'x.sqlite3'}"))
    with pytest.raises(ConfigError, match="http"):
        auth_app(tmp_path, clients_file, public_url="cds.example.org")
    assert create_app(Settings(dev=True, database_url=f"sqlite:///{tmp_path / 'dev.sqlite3'}"))  # dev: unchanged


def test_token_for_another_host_is_refused_even_with_that_host(client, keys) -> None:
    other = f"http://other-cds.example/cds-services/{HOOK}"
    assert_refused(client.post(f"/cds-services/{HOOK}", json=load_fixture(FIXTURE),
                               headers={**bearer(sign(keys["ec"], claims(aud=other))), "Host": "other-cds.example"}))
    assert hook(client, sign(keys["ec"])).status_code == 200


def test_serve_without_public_url_exits_with_the_reason(tmp_path, clients_file) -> None:
    env = {**os.environ, "CDS_CLIENTS_FILE": clients_file, "CDS_PUBLIC_URL": "", "CDS_DEV": "",
           "CDS_DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}"}
    done = subprocess.run([sys.executable, "-m", "cds_service.cli", "serve", "--host", "127.0.0.1",
                           "--port", str(free_port()), "--workers", "1"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.startswith("error: CDS_PUBLIC_URL is not set") and "Traceback" not in done.stderr


# --- in-process: refused tokens ---------------------------------------------------------------------------


def _refusals(keys: dict[str, Key], evil: KeyServer) -> dict[str, tuple[str, str]]:
    """name → (reason category the log must give, token)."""
    ec_key, now = keys["ec"], int(time.time())
    evil_url = evil.publish("/jwks.json", keys["other"])
    valid = sign(ec_key).split(".")
    without = {name: {k: v for k, v in claims().items() if k != name} for name in ("exp", "iat", "aud")}
    return {
        "expired": ("expired", sign(ec_key, claims(lifetime=-120))),
        "wrong_audience": ("audience", sign(ec_key, claims(aud=f"{PUBLIC}/cds-services/sacroplasty-order-sign"))),
        "other_host_audience": ("audience", sign(ec_key, claims(aud=f"https://elsewhere.example/cds-services/{HOOK}"))),
        "unknown_issuer": ("unknown_issuer", sign(ec_key, claims(iss="https://stranger.example.org"))),
        "bad_signature": ("signature", sign(keys["other"])),
        "tampered_payload": ("signature", ".".join([valid[0], b64(json.dumps(claims()).encode()), valid[2]])),
        "alg_none": ("algorithm", unsigned(ec_key, claims())),
        "hs256_public_key_as_secret": ("algorithm", hs256_with_public_key(ec_key, claims())),
        "missing_jti": ("missing_claim", sign(ec_key, claims(jti=None))),
        "missing_exp": ("missing_claim", sign(ec_key, without["exp"])),
        "missing_iat": ("missing_claim", sign(ec_key, without["iat"])),
        "missing_aud": ("missing_claim", sign(ec_key, without["aud"])),
        "iat_in_future": ("not_yet_valid", sign(ec_key, claims(iat=now + 600, exp=now + 900))),
        "lifetime_over_an_hour": ("lifetime", sign(ec_key, claims(lifetime=3 * 3600))),
        "missing_kid": ("header", sign(ec_key, kid=None)),
        "unknown_kid": ("unknown_kid", sign(ec_key, kid="no-such-kid")),
        "wrong_typ": ("header", sign(ec_key, typ="at+jwt")),
        "rs256_not_allowed": ("algorithm", sign(keys["rsa"], alg="RS256")),
        "ps384_not_allowed": ("algorithm", sign(keys["rsa"], alg="PS384")),
        "es256_not_allowed": ("algorithm", sign(keys["p256"], alg="ES256", kid="ec-1")),
        "es384_token_naming_rsa_key": ("key_algorithm", sign(ec_key, kid="rsa-1")),
        "jku_not_on_allow_list": ("jku_not_allowed", sign(keys["other"], jku=evil_url)),
        "wrong_tenant": ("tenant", sign(keys["inline"], claims(iss=ISS_INLINE, tenant="other-hospital"))),
        "no_tenant_when_required": ("tenant", sign(keys["inline"], claims(iss=ISS_INLINE))),
        "tenant_not_a_string": ("tenant", sign(keys["inline"], claims(iss=ISS_INLINE, tenant=["hosp-1"]))),
        "jti_with_control_character": ("jti", sign(ec_key, claims(jti="abc\x00def"))),
        "long_jti": ("jti", sign(ec_key, claims(jti="j" * 300))),
        "non_string_jti": ("invalid", sign(ec_key, claims(jti=12345))),
        "not_a_jwt": ("malformed", "not-a-jwt"),
        "two_segments": ("malformed", "abc.def"),
        "garbage_segments": ("malformed", "%%%.%%%.%%%"),
        "huge_token": ("malformed", "a" * 5000 + ".b.c"),
    }


@pytest.fixture
def refusals(keys, evil_server) -> dict[str, tuple[str, str]]:
    return _refusals(keys, evil_server)


def test_every_bad_token_refused_without_detail(client, refusals, evil_server, caplog) -> None:
    caplog.set_level("WARNING", logger="cds_service")
    failures = []
    for name, (reason, token) in refusals.items():
        caplog.clear()
        response = hook(client, token)
        try:
            assert_refused(response)
            assert f"reason={reason} " in caplog.text, caplog.text
        except AssertionError as exc:
            failures.append(f"{name}: {exc}")
        assert not [part for part in token.split(".") if len(part) >= 20 and part in caplog.text], name
    assert not failures, "\n".join(failures)
    assert evil_server.hits() == 0, "a jku not on the allow-list was contacted"


def test_other_authorization_schemes_refused(client, keys) -> None:
    token = sign(keys["ec"])
    for header in (f"Basic {token}", token, "Bearer", "Bearer ", f"Bearer  {token}x"):
        assert_refused(client.post(f"/cds-services/{HOOK}", json=load_fixture(FIXTURE),
                                   headers={"Authorization": header}))


def test_missing_token_gets_bearer_challenge(client) -> None:
    response = hook(client, None)
    assert response.status_code == 401
    assert response.get_json()["error"] == "unauthorized"
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert "error=" not in response.headers["WWW-Authenticate"]  # RFC 6750 §3.1: no error code here


def test_feedback_needs_a_token_too(client) -> None:
    response = client.post(f"/cds-services/{HOOK}/feedback", json={"feedback": []})
    assert response.status_code == 401


def test_replayed_jti_refused(client, keys) -> None:
    token = sign(keys["ec"])
    assert hook(client, token).status_code == 200
    assert_refused(hook(client, token))


def test_replay_refused_by_another_instance_sharing_the_database(tmp_path, clients_file, keys) -> None:
    """Two app instances (as two workers or two machines) on one database: a jti used at one is spent at both."""
    first, second = (auth_app(tmp_path, clients_file).test_client() for _ in range(2))
    token = sign(keys["rsa"])
    assert hook(first, token).status_code == 200
    assert_refused(hook(second, token))
    assert_refused(hook(first, token))


def test_same_jti_from_another_issuer_is_not_a_replay(client, keys) -> None:
    jti = str(uuid.uuid4())
    assert hook(client, sign(keys["ec"], claims(jti=jti))).status_code == 200
    assert hook(client, sign(keys["inline"], claims(iss=ISS_INLINE, jti=jti, tenant="hosp-1"))).status_code == 200


def test_database_unavailable_is_503(tmp_path, clients_file, keys, caplog) -> None:
    app = auth_app(tmp_path, clients_file, database_url=f"sqlite:///{tmp_path / 'missing-dir' / 'db.sqlite3'}")
    caplog.set_level("ERROR", logger="cds_service")
    response = hook(app.test_client(), sign(keys["ec"]))
    assert response.status_code == 503
    assert response.get_json()["error"] == "service_unavailable"
    assert "database unavailable" in caplog.text


def test_without_clients_file_every_hook_call_refused_discovery_public(tmp_path, keys, caplog) -> None:
    caplog.set_level("WARNING", logger="cds_service")
    client = auth_app(tmp_path, None).test_client()
    assert "no CDS_CLIENTS_FILE" in caplog.text
    assert_refused(hook(client, sign(keys["ec"])))
    assert hook(client, None).status_code == 401
    assert client.get("/cds-services").status_code == 200


def test_dev_mode_needs_no_token(tmp_path) -> None:
    app = create_app(Settings(dev=True, database_url=f"sqlite:///{tmp_path / 'dev.sqlite3'}"))
    assert app.extensions["cds_auth"] is None
    assert hook(app.test_client(), None).status_code == 200


# --- fuzzing the Authorization header ---------------------------------------------------------------------


header_text = st.text(st.characters(min_codepoint=32, max_codepoint=255), max_size=300)
B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_."


@hypothesis_settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=st.one_of(header_text, header_text.map(lambda t: "Bearer " + t),
                        st.lists(header_text, min_size=3, max_size=3).map(lambda p: "Bearer " + ".".join(p))))
def test_random_authorization_headers_refused(client, header: str) -> None:
    response = hook(client, None) if not header.strip() else client.post(
        f"/cds-services/{HOOK}", json=load_fixture(FIXTURE), headers={"Authorization": header})
    assert response.status_code == 401 and response.is_json


def _segments(token: str) -> list[bytes] | None:
    try:
        return [base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)) for part in token.split(".")]
    except ValueError:
        return None


@hypothesis_settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_tokens_refused(client, keys, data: st.DataObject) -> None:
    token = sign(keys[data.draw(st.sampled_from(["ec", "rsa"]))])
    chars = list(token)
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(chars) - 1))
        if data.draw(st.booleans()):
            chars[at] = data.draw(st.sampled_from(B64URL))
        else:
            del chars[at]
    mutated = "".join(chars)
    response = hook(client, mutated)
    assert response.status_code in (200, 401), response.get_data(as_text=True)
    if response.status_code == 200:  # only when the change decodes to the very same bytes (base64 slack bits)
        assert _segments(mutated) == _segments(token)


# --- the clients file -------------------------------------------------------------------------------------


GOOD_URL = "https://ehr.example.org/jwks.json"


@pytest.mark.parametrize("content, message", [
    ("not json", "not valid JSON"),
    ('{"clients": []}', "at least one client"),
    ('{"client": [{"iss": "x", "jwks_url": "%s"}]}' % GOOD_URL, "at least one client"),
    ('{"clients": ["x"]}', "clients[0] must be an object"),
    ('{"clients": [{"jwks_url": "%s"}]}' % GOOD_URL, "clients[0].iss"),
    ('{"clients": [{"iss": "a"}]}', "needs a key set"),
    ('{"clients": [{"iss": "a", "jwks_uri": "%s"}]}' % GOOD_URL, "unknown field(s) jwks_uri"),
    ('{"clients": [{"iss": "a", "jwks_url": "http://ehr.example.org/jwks.json"}]}', "https://"),
    ('{"clients": [{"iss": "a", "jwks_url": "%s", "jku": "%s"}]}' % (GOOD_URL, GOOD_URL), "jku must be a list"),
    ('{"clients": [{"iss": "a", "jwks_url": "%s", "jku": ["ftp://x/y"]}]}' % GOOD_URL, "jku[0]"),
    ('{"clients": [{"iss": "a", "jwks_url": "%s"}, {"iss": "a", "jwks_url": "%s"}]}' % (GOOD_URL, GOOD_URL),
     "listed twice"),
    ('{"clients": [{"iss": "a", "jwks": {"keys": [{"kty": "oct", "kid": "k", "k": "c2VjcmV0"}]}}]}',
     "private key"),
    ('{"clients": [{"iss": "a", "jwks": {"keys": [{"kty": "EC", "kid": "k", "crv": "P-384", "x": "AA", '
     '"y": "AA"}]}}]}', "not a usable"),
    ('{"clients": [{"iss": "a", "jwks": {"nokeys": 1}}]}', "not a JWK Set"),
    ('{"clients": [{"iss": "a", "jwks_url": "%s", "tenant": 5}]}' % GOOD_URL, "tenant"),
])
def test_malformed_clients_file_fails_at_start(tmp_path, content: str, message: str) -> None:
    path = tmp_path / "clients.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ClientsFileError) as error:
        auth_app(tmp_path, str(path))
    assert message in str(error.value)
    assert str(path) in str(error.value)


def test_private_key_in_clients_file_refused(tmp_path, keys) -> None:
    private = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(keys["ec"].private))
    path = write_clients(tmp_path / "c.json", [{"iss": "a", "jwks": {"keys": [{**private, "kid": "k"}]}}])
    with pytest.raises(ClientsFileError, match="private key"):
        load_clients(path)


def test_missing_clients_file_fails_at_start(tmp_path) -> None:
    with pytest.raises(ClientsFileError, match="cannot read"):
        auth_app(tmp_path, str(tmp_path / "nope.json"))


def test_clients_file_shape_read(tmp_path, keys) -> None:
    path = write_clients(tmp_path / "c.json", [
        {"iss": ISS, "jwks_url": GOOD_URL, "jku": ["https://ehr.example.org/other.json"], "tenant": "t1"},
        {"iss": ISS_INLINE, "jwks": {"keys": [keys["ec"].jwk(), keys["rsa"].jwk()]}},
    ])
    clients = load_clients(path)
    assert clients[ISS].jwks_url == GOOD_URL and clients[ISS].tenants == {"t1"}
    assert clients[ISS].allows_jku("https://ehr.example.org/other.json") and clients[ISS].allows_jku(GOOD_URL)
    assert not clients[ISS].allows_jku("https://ehr.example.org/other.json/")
    assert set(clients[ISS_INLINE].keys) == {"ec-1", "rsa-1"}


# --- the key-set cache ------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class CountingFetch:
    def __init__(self, sets: list[dict[str, Any]]) -> None:
        self.sets, self.calls = sets, 0

    def __call__(self, url: str) -> dict[str, Any]:
        self.calls += 1
        current = self.sets[min(self.calls, len(self.sets)) - 1]
        if current is None:
            raise KeySetError("down")
        return current


def make_cache(fetch: Callable[[str], Any], clock: FakeClock) -> KeySetCache:
    return KeySetCache(fetch=fetch, clock=clock, max_age=300, min_refresh=10, spawn=lambda job: job())


def test_cache_serves_known_kid_without_fetching() -> None:
    clock, fetch = FakeClock(), CountingFetch([{"a": {"kid": "a"}}])
    cache = make_cache(fetch, clock)
    assert cache.key("u", "a") == {"kid": "a"}
    clock.now += 5
    assert cache.key("u", "a") == {"kid": "a"}
    assert fetch.calls == 1


def test_unknown_kid_refreshes_but_rate_limited() -> None:
    clock, fetch = FakeClock(), CountingFetch([{"a": {}}, {"a": {}, "b": {"kid": "b"}}])
    cache = make_cache(fetch, clock)
    cache.key("u", "a")
    assert cache.key("u", "b") is None  # fetched just now: no second fetch yet
    assert fetch.calls == 1
    clock.now += 11
    assert cache.key("u", "b") == {"kid": "b"}  # unknown kid → one refresh
    assert fetch.calls == 2
    for _ in range(5):
        assert cache.key("u", "random-kid") is None
    assert fetch.calls == 2  # random kids cannot make us hammer the key server


def test_stale_set_served_while_refreshing_and_kept_on_failure() -> None:
    clock, fetch = FakeClock(), CountingFetch([{"a": {"v": 1}}, None, {"a": {"v": 2}}])
    cache = make_cache(fetch, clock)
    assert cache.key("u", "a") == {"v": 1}
    clock.now += 301
    assert cache.key("u", "a") == {"v": 1}  # served from cache; the refresh failed and kept the old set
    assert fetch.calls == 2
    clock.now += 11
    cache.key("u", "a")  # still stale: refreshed again in the background
    assert fetch.calls == 3
    assert cache.key("u", "a") == {"v": 2}


def test_slow_fetch_holds_only_its_own_call() -> None:
    """While one call waits on a hanging key server, calls with a cached kid, and calls with an unknown kid
    once a set is cached, answer without waiting for it."""
    clock, release, started = FakeClock(), threading.Event(), threading.Event()
    calls: list[str] = []
    order: list[str] = []

    def fetch(url: str) -> dict[str, Any]:
        calls.append(url)
        if len(calls) > 1:
            started.set()
            release.wait(10)  # a safety net only: the answers below must come before this returns
            order.append("fetch finished")
        return {"a": {"kid": "a"}}

    cache = KeySetCache(fetch=fetch, clock=clock, max_age=300, min_refresh=10, spawn=lambda job: job(), wait=60)
    cache.key("u", "a")
    clock.now += 11
    slow = threading.Thread(target=cache.key, args=("u", "new-kid"))
    slow.start()
    assert started.wait(30)
    answers = [cache.key("u", "a"), cache.key("u", "another-new-kid")]
    order.append("answered")
    release.set()
    slow.join(30)
    assert order == ["answered", "fetch finished"]
    assert answers == [{"kid": "a"}, None]
    assert len(calls) == 2


def test_cache_is_per_url() -> None:
    clock = FakeClock()
    cache = make_cache(lambda url: {"k": {"url": url}}, clock)
    assert cache.key("u1", "k") == {"url": "u1"} and cache.key("u2", "k") == {"url": "u2"}


def test_fetch_follows_no_redirect(key_server, evil_server, keys) -> None:
    target = evil_server.publish("/jwks.json", keys["ec"])
    key_server.server.clear_all_handlers()
    key_server.server.expect_request("/jwks.json").respond_with_response(
        Response(status=302, headers={"Location": target}))
    with pytest.raises(KeySetError):
        fetch_jwks(key_server.url("/jwks.json"))
    assert evil_server.hits() == 0


def test_fetch_refuses_huge_and_bad_key_sets(key_server) -> None:
    key_server.sets["/huge.json"] = {"keys": [{"kid": str(i), "kty": "EC", "pad": "x" * 1000} for i in range(400)]}
    key_server.sets["/list.json"] = []  # type: ignore[assignment]
    with pytest.raises(KeySetError, match="too large"):
        fetch_jwks(key_server.url("/huge.json"))
    with pytest.raises(KeySetError, match="not a JWK Set"):
        fetch_jwks(key_server.url("/list.json"))
    with pytest.raises(KeySetError, match="404"):
        fetch_jwks(key_server.url("/missing.json"))


def test_hostile_key_server_answers_fail_closed(key_server, keys) -> None:
    key_server.server.clear_all_handlers()
    key_server.server.expect_request("/deep.json").respond_with_data("[" * 200_000, content_type="application/json")
    key_server.server.expect_request("/text.json").respond_with_data("\xff\xfe garbage", content_type="text/html")
    cache = KeySetCache(min_refresh=0)
    for path in ("/deep.json", "/text.json", "/nothing-here.json"):
        assert cache.key(key_server.url(path), "ec-1") is None


def test_fetch_gives_up_on_a_slow_key_server() -> None:
    server = HTTPServer(host="127.0.0.1", port=0)
    server.expect_request("/slow.json").respond_with_handler(
        lambda request: (time.sleep(1.5), Response("{}", content_type="application/json"))[1])
    server.start()
    try:
        with pytest.raises(KeySetError):
            fetch_jwks(server.url_for("/slow.json"), timeout=0.2)
    finally:
        server.stop()


def test_fetched_set_keeps_only_public_signing_keys(key_server, keys) -> None:
    private = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(keys["ec"].private))
    key_server.sets["/mixed.json"] = {"keys": [
        {**private, "kid": "priv"}, {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
        {**keys["rsa"].jwk(), "use": "enc", "kid": "enc"}, {"kty": "EC", "crv": "P-384"}, "junk",
    ]}
    got = fetch_jwks(key_server.url("/mixed.json"))
    assert set(got) == {"priv"} and "d" not in got["priv"]


def test_authenticator_never_fetches_unlisted_jku(tmp_path, clients_file, keys, evil_server) -> None:
    fetched: list[str] = []
    auth = Authenticator(Settings(clients_file=clients_file, public_url=PUBLIC),
                         Store(f"sqlite:///{tmp_path / 'x.sqlite3'}"),
                         keys=KeySetCache(fetch=lambda url: fetched.append(url) or {}))
    with pytest.raises(ApiError) as error:
        auth.verify("Bearer " + sign(keys["ec"], jku=evil_server.url("/jwks.json")), HOOK)
    assert error.value.status == 401
    assert fetched == []


# --- the real server, two workers -------------------------------------------------------------------------


def real_server(start_server, tmp_path: Path, clients_file: str | None, **env: str):
    log = tmp_path / "server.log"
    full_env = {"CDS_PUBLIC_URL": PUBLIC, "CDS_TEST_LOG": str(log), "CDS_DEV": "", **env}
    if clients_file:
        full_env["CDS_CLIENTS_FILE"] = clients_file
    server = start_server(env=full_env, args=[], workers=2)
    return server, log


def post_real(server, token: str | None, body: Any = None) -> requests.Response:
    headers = bearer(token) if token is not None else {}
    return requests.post(f"{server.url}/cds-services/{HOOK}", json=body or load_fixture(FIXTURE),
                         headers=headers, timeout=10)


def assert_real_refused(response: requests.Response, name: str) -> None:
    assert response.status_code == 401, f"{name}: {response.status_code} {response.text[:200]}"
    assert response.headers["Content-Type"].startswith("application/json"), name
    assert response.json() == REFUSED_BODY, name
    assert 'error="invalid_token"' in response.headers.get("WWW-Authenticate", ""), name


def test_real_server_accepts_valid_and_refuses_bad_tokens(start_server, tmp_path, clients_file, keys,
                                                         key_server, evil_server, refusals) -> None:
    server, log = real_server(start_server, tmp_path, clients_file)
    assert requests.get(server.url + "/cds-services", timeout=10).status_code == 200  # discovery stays public

    accepted = {
        "ES384": sign(keys["ec"]),
        "RS384": sign(keys["rsa"]),
        "inline RS384 with tenant": sign(keys["inline"], claims(iss=ISS_INLINE, tenant="hosp-1")),
        "allowed jku": sign(keys["ec2"], jku=key_server.url("/rotated.json")),
    }
    for name, token in accepted.items():
        response = post_real(server, token)
        assert response.status_code == 200, f"{name}: {response.text[:300]}"
        assert len(response.json()["cards"]) == 1, name

    for name, (_, token) in refusals.items():
        assert_real_refused(post_real(server, token), name)
    assert_real_refused(post_real(server, accepted["ES384"]), "replayed jti")
    response = post_real(server, None)
    assert response.status_code == 401 and response.headers["WWW-Authenticate"].startswith("Bearer")

    assert evil_server.hits() == 0, "a jku not on the allow-list was contacted"
    text = log.read_text(encoding="utf-8", errors="replace")
    assert "reason=replayed_jti" in text and "reason=algorithm" in text
    for token in [*accepted.values(), *(token for _, token in refusals.values())]:
        assert not [part for part in token.split(".") if len(part) >= 20 and part in text], "a token was logged"


def test_real_server_replay_refused_by_every_worker(start_server, tmp_path, clients_file, keys) -> None:
    server, log = real_server(start_server, tmp_path, clients_file)
    token = sign(keys["ec"])
    assert post_real(server, token).status_code == 200
    for attempt in range(8):  # new connection each time: both workers get their turn
        assert_real_refused(post_real(server, token), f"replay {attempt}")
    assert log.read_text(encoding="utf-8").count("reason=replayed_jti") == 8


def test_real_server_unknown_kid_refreshes_key_set(start_server, tmp_path, keys, key_server) -> None:
    jwks_url = key_server.publish("/jwks.json", keys["ec"])
    clients = write_clients(tmp_path / "clients.json", [{"iss": ISS, "jwks_url": jwks_url}])
    server, _ = real_server(start_server, tmp_path, clients)
    for _ in range(4):
        assert post_real(server, sign(keys["ec"])).status_code == 200
    assert_real_refused(post_real(server, sign(keys["ec2"])), "kid not yet published")
    before = key_server.hits("/jwks.json")
    key_server.publish("/jwks.json", keys["ec"], keys["ec2"])  # the client rotates its keys
    time.sleep(JWKS_MIN_REFRESH + 0.5)  # past the refresh rate limit
    response = post_real(server, sign(keys["ec2"]))
    assert response.status_code == 200, response.text
    assert key_server.hits("/jwks.json") > before


def test_real_server_database_down_is_503(start_server, tmp_path, clients_file, keys) -> None:
    server, log = real_server(start_server, tmp_path, clients_file,
                              CDS_DATABASE_URL=f"sqlite:///{tmp_path / 'no-such-dir' / 'db.sqlite3'}")
    response = post_real(server, sign(keys["ec"]))
    assert response.status_code == 503
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.json()["error"] == "service_unavailable"
    assert "database unavailable" in log.read_text(encoding="utf-8")


def test_real_server_without_clients_file_refuses_hooks(start_server, tmp_path, keys) -> None:
    server, log = real_server(start_server, tmp_path, None)
    assert requests.get(server.url + "/cds-services", timeout=10).status_code == 200
    assert_real_refused(post_real(server, sign(keys["ec"])), "no clients configured")
    assert post_real(server, None).status_code == 401
    assert "no CDS_CLIENTS_FILE" in log.read_text(encoding="utf-8")


def test_serve_with_malformed_clients_file_exits_with_the_reason(tmp_path) -> None:
    bad = tmp_path / "clients.json"
    bad.write_text('{"clients": [{"iss": "a"}]}', encoding="utf-8")
    env = {**os.environ, "CDS_CLIENTS_FILE": str(bad), "CDS_PUBLIC_URL": PUBLIC, "CDS_DEV": "",
           "CDS_DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}"}
    done = subprocess.run([sys.executable, "-m", "cds_service.cli", "serve", "--host", "127.0.0.1",
                           "--port", str(free_port()), "--workers", "1"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "needs a key set" in done.stderr


def test_the_old_import_paths_still_work() -> None:
    """cli.py and web/app.py import from auth.tokens; the package exports the same objects, one ALGORITHMS."""
    from cds_service import auth
    from cds_service.auth import clients, keysets, tokens
    from cds_service.tools import signing

    assert tokens.ClientsFileError is auth.ClientsFileError is clients.ClientsFileError
    assert tokens.load_clients is auth.load_clients is clients.load_clients
    assert tokens.Authenticator is auth.Authenticator
    assert signing.ALGORITHMS is auth.ALGORITHMS is keysets.ALGORITHMS == ("ES384", "RS384")
    with pytest.raises(AttributeError):
        auth.NoSuchName  # noqa: B018
