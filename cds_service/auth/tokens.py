"""Who may call a hook: the CDS client's signed JWT (CDS Hooks 2.0, "Trusting CDS Clients").

Every hook and feedback call carries `Authorization: Bearer <JWT>`, signed with ES384 or RS384 by a client named
in the clients file (CDS_CLIENTS_FILE). The signature is checked by PyJWT against the client's JSON Web Key Set:
inline in the clients file, fetched from its `jwks_url`, or from the token's `jku` header when that URL is on the
client's allow-list (a `jku` not on it is refused and never fetched). `aud` must be this service's endpoint,
`exp`, `iat` and `jti` are required, and a `jti` is accepted once: seen ids live in the database, so a replay is
caught by every worker and every instance.

A refused token gets 401 with a JSON error and `WWW-Authenticate`, and the same words whatever the reason; the
reason category goes to the log, the token never does.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

import jwt
import requests

from cds_service.config import ConfigError, Settings
from cds_service.errors import ApiError
from cds_service.storage.store import Store, StoreUnavailable

log = logging.getLogger(__name__)

ALGORITHMS = ("ES384", "RS384")  # the two the spec recommends; never "none", never HMAC
LEEWAY_SECONDS = 30  # clock skew allowed on exp / iat
MAX_LIFETIME_SECONDS = 3600  # a token may not expire more than an hour from now (spec best practice)
MAX_TOKEN_CHARS = 4096  # CDS Hooks tokens are well under 2 kB
MAX_JTI_CHARS = 255
MAX_JWKS_BYTES = 256 * 1024
JWKS_FETCH_TIMEOUT = 2.0  # seconds, connect + whole body: a slow key server stalls only calls that need it
JWKS_MAX_AGE = 300.0  # after this a cached key set is refreshed in the background, still served meanwhile
JWKS_MIN_REFRESH = 2.0  # at most one fetch per URL (per process) in this many seconds for unknown kids
LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "::1"}
PRIVATE_JWK_FIELDS = {"d", "p", "q", "dp", "dq", "qi", "oth", "k"}
CLIENT_FIELDS = {"iss", "jwks_url", "jwks", "jku", "tenant"}


class ClientsFileError(Exception):
    """The clients file is missing or malformed: the service must not start."""


class KeySetError(Exception):
    """A key set could not be fetched or read."""


class _Refused(Exception):
    """Internal: the token is not accepted; `reason` is a short category for the log."""

    def __init__(self, reason: str, iss: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.iss = iss


@dataclass(frozen=True)
class Client:
    """The authenticated caller of one request."""

    iss: str
    tenant: str | None = None


@dataclass(frozen=True)
class TrustedClient:
    """One entry of the clients file."""

    iss: str
    jwks_url: str | None = None
    jku: frozenset[str] = frozenset()
    keys: Mapping[str, dict[str, Any]] | None = None  # inline key set: kid → public JWK
    tenants: frozenset[str] = frozenset()  # empty: any tenant (or none)

    def allows_jku(self, url: str) -> bool:
        return url in self.jku or url == self.jwks_url


# --- the clients file --------------------------------------------------------------------------------------


def _check_url(value: Any, where: str) -> str:
    """A key-set URL: https, or http on a loopback host (tests, a local key server)."""
    if not isinstance(value, str) or not value:
        raise ClientsFileError(f"{where} must be a URL string")
    parts = urlsplit(value)
    loopback = parts.scheme == "http" and (parts.hostname or "") in LOOPBACK_HOSTS
    if not parts.hostname or (parts.scheme != "https" and not loopback):
        raise ClientsFileError(f"{where} must be an https:// URL (http:// only on localhost), not {value!r}")
    if parts.username or parts.password or parts.fragment:
        raise ClientsFileError(f"{where} must not carry credentials or a #fragment")
    return value


def public_jwks(data: Any) -> dict[str, dict[str, Any]]:
    """kid → public JWK for the usable signing keys (EC or RSA, with a kid) of a JWK Set document.

    Private members are dropped, so a key set that wrongly includes them still only verifies."""
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise KeySetError("not a JWK Set (an object with a 'keys' list)")
    keys: dict[str, dict[str, Any]] = {}
    for jwk in data["keys"]:
        if not isinstance(jwk, dict) or not isinstance(jwk.get("kid"), str) or not jwk["kid"]:
            continue
        if jwk.get("kty") not in ("EC", "RSA") or jwk.get("use", "sig") != "sig":
            continue
        keys.setdefault(jwk["kid"], {k: v for k, v in jwk.items() if k not in PRIVATE_JWK_FIELDS})
    return keys


def _inline_keys(value: Any, where: str) -> dict[str, dict[str, Any]]:
    try:
        keys = public_jwks(value)
    except KeySetError as exc:
        raise ClientsFileError(f"{where} is {exc}") from None
    raw = value["keys"]
    if any(isinstance(k, dict) and PRIVATE_JWK_FIELDS & set(k) for k in raw):
        raise ClientsFileError(f"{where} holds a private key; put only public keys in the clients file")
    if len(keys) != len(raw):
        raise ClientsFileError(f"{where}: every key needs a unique 'kid', 'kty' EC or RSA, and 'use' sig if set")
    for kid, jwk in keys.items():
        try:
            jwt.PyJWK(jwk, algorithm="ES384" if jwk["kty"] == "EC" else "RS384")
        except Exception as exc:  # noqa: BLE001 - any unreadable key is a configuration error
            raise ClientsFileError(f"{where}: key {kid!r} is not a usable ES384 / RS384 public key "
                                   f"({type(exc).__name__})") from None
    return keys


def _client(entry: Any, where: str) -> TrustedClient:
    if not isinstance(entry, dict):
        raise ClientsFileError(f"{where} must be an object")
    unknown = sorted(set(entry) - CLIENT_FIELDS)
    if unknown:
        raise ClientsFileError(f"{where} has unknown field(s) {', '.join(unknown)}; "
                               f"allowed: {', '.join(sorted(CLIENT_FIELDS))}")
    iss = entry.get("iss")
    if not isinstance(iss, str) or not iss.strip():
        raise ClientsFileError(f"{where}.iss must be a non-empty string")
    jwks_url = _check_url(entry["jwks_url"], f"{where}.jwks_url") if entry.get("jwks_url") is not None else None
    keys = _inline_keys(entry["jwks"], f"{where}.jwks") if entry.get("jwks") is not None else None
    jku = entry.get("jku", [])
    if not isinstance(jku, list):
        raise ClientsFileError(f"{where}.jku must be a list of URLs")
    jku_urls = frozenset(_check_url(u, f"{where}.jku[{i}]") for i, u in enumerate(jku))
    if jwks_url and keys is not None:
        raise ClientsFileError(f"{where} has both jwks_url and jwks; give one")
    if not jwks_url and keys is None and not jku_urls:
        raise ClientsFileError(f"{where} needs a key set: jwks_url, jwks, or a jku allow-list")
    tenant = entry.get("tenant")
    tenants = [tenant] if isinstance(tenant, str) else tenant if tenant is not None else []
    if not isinstance(tenants, list) or not all(isinstance(t, str) and t for t in tenants):
        raise ClientsFileError(f"{where}.tenant must be a string or a list of strings")
    return TrustedClient(iss=iss, jwks_url=jwks_url, jku=jku_urls, keys=keys, tenants=frozenset(tenants))


def load_clients(path: str | Path) -> dict[str, TrustedClient]:
    """Read and check the clients file; raise ClientsFileError with a message that names the problem."""
    name = f"CDS_CLIENTS_FILE {path}"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ClientsFileError(f"{name}: cannot read it ({getattr(exc, 'strerror', None) or exc})") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ClientsFileError(f"{name}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("clients"), list) or not data["clients"]:
        raise ClientsFileError(f'{name}: expected {{"clients": [{{"iss": ..., "jwks_url": ...}}, ...]}} '
                               "with at least one client")
    clients: dict[str, TrustedClient] = {}
    for index, entry in enumerate(data["clients"]):
        client = _client(entry, f"{name}: clients[{index}]")
        if client.iss in clients:
            raise ClientsFileError(f"{name}: clients[{index}].iss {client.iss!r} is listed twice")
        clients[client.iss] = client
    return clients


# --- fetched key sets --------------------------------------------------------------------------------------


def fetch_jwks(url: str, timeout: float = JWKS_FETCH_TIMEOUT) -> dict[str, dict[str, Any]]:
    """GET a JWK Set: no redirects (only configured URLs are ever contacted), a size cap, and a deadline
    on the whole exchange, not just each socket read."""
    deadline = time.monotonic() + timeout
    try:
        with requests.get(url, timeout=timeout, allow_redirects=False, stream=True,
                          headers={"Accept": "application/json"}) as response:
            if response.status_code != 200:
                raise KeySetError(f"HTTP {response.status_code}")
            body = bytearray()
            for chunk in response.iter_content(16384):
                body.extend(chunk)
                if len(body) > MAX_JWKS_BYTES:
                    raise KeySetError("key set too large")
                if time.monotonic() > deadline:
                    raise KeySetError("key server too slow")
    except requests.RequestException as exc:
        raise KeySetError(type(exc).__name__) from None
    try:
        return public_jwks(json.loads(bytes(body)))
    except ValueError:
        raise KeySetError("not JSON") from None


@dataclass
class _Entry:
    keys: dict[str, dict[str, Any]] | None = None
    fetched_at: float = float("-inf")
    attempted_at: float = float("-inf")
    lock: threading.Lock = field(default_factory=threading.Lock)


def _in_thread(job: Callable[[], None]) -> None:
    threading.Thread(target=job, name="jwks-refresh", daemon=True).start()


class KeySetCache:
    """Key sets per URL. A known kid is answered from the cache at once, and a set older than `max_age` is
    refreshed in the background. An unknown kid triggers one fetch per URL at a time, at most one per
    `min_refresh` seconds, so random kids cannot turn the service into a key-server hammer. Only the first
    fetch for a URL is waited for by other calls; once a set is cached, a call with an unknown kid never waits
    for someone else's fetch, so a slow key server holds at most one thread per URL."""

    def __init__(self, fetch: Callable[[str], dict[str, dict[str, Any]]] = fetch_jwks,
                 clock: Callable[[], float] = time.monotonic, max_age: float = JWKS_MAX_AGE,
                 min_refresh: float = JWKS_MIN_REFRESH,
                 spawn: Callable[[Callable[[], None]], None] = _in_thread,
                 wait: float = 3 * JWKS_FETCH_TIMEOUT) -> None:
        self._fetch = fetch
        self._wait = wait
        self._clock = clock
        self._max_age = max_age
        self._min_refresh = min_refresh
        self._spawn = spawn
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()

    def _entry(self, url: str) -> _Entry:
        with self._lock:
            return self._entries.setdefault(url, _Entry())

    def _refresh(self, url: str, entry: _Entry) -> None:
        """Fetch now (caller holds entry.lock); on failure keep what was cached."""
        entry.attempted_at = self._clock()
        try:
            entry.keys = self._fetch(url)
            entry.fetched_at = self._clock()
        except Exception as exc:  # noqa: BLE001 - whatever a key server sends, keep the old set, fail closed
            reason = exc if isinstance(exc, KeySetError) else type(exc).__name__
            log.warning("key set fetch failed: url=%s reason=%s", url, reason)
        finally:
            entry.attempted_at = self._clock()  # the pause between fetches counts from the end of this one

    def _refresh_in_background(self, url: str, entry: _Entry) -> None:
        if self._clock() - entry.attempted_at < self._min_refresh or not entry.lock.acquire(blocking=False):
            return
        entry.attempted_at = self._clock()  # claimed: other calls do not start a second refresh

        def job() -> None:
            try:
                self._refresh(url, entry)
            finally:
                entry.lock.release()

        try:
            self._spawn(job)
        except Exception:  # noqa: BLE001 - cannot start a thread: stay on the cached set
            entry.lock.release()

    def key(self, url: str, kid: str) -> dict[str, Any] | None:
        """The public JWK with this kid at `url`, or None."""
        entry = self._entry(url)
        keys = entry.keys
        if keys is not None and kid in keys:
            if self._clock() - entry.fetched_at > self._max_age:
                self._refresh_in_background(url, entry)
            return keys[kid]
        got_lock = entry.lock.acquire(timeout=self._wait) if keys is None else entry.lock.acquire(blocking=False)
        if not got_lock:  # a fetch is under way (and a set is cached, or it is taking too long)
            return None
        try:  # one fetch per URL at a time; a caller that waited sees its result
            keys = entry.keys
            if (keys is None or kid not in keys) and self._clock() - entry.attempted_at >= self._min_refresh:
                self._refresh(url, entry)
                keys = entry.keys
        finally:
            entry.lock.release()
        return keys.get(kid) if keys is not None else None


# --- verification ------------------------------------------------------------------------------------------


@lru_cache(maxsize=64)
def _public_key(alg: str, jwk_json: str) -> jwt.PyJWK:
    """The key object for a JWK, built once per key rather than on every call (loading an EC point costs
    about as much as the rest of the token checks). Also checks kty and, for ES384, the P-384 curve."""
    return jwt.PyJWK(json.loads(jwk_json), algorithm=alg)


def _unauthorized(reason: str | None) -> ApiError:
    if reason is None:
        return ApiError(401, "unauthorized", "this service requires an Authorization: Bearer JWT",
                        headers={"WWW-Authenticate": 'Bearer realm="cds-services"'})
    return ApiError(401, "invalid_token", "the bearer token was not accepted",
                    headers={"WWW-Authenticate": 'Bearer realm="cds-services", error="invalid_token"'})


_REASONS: tuple[tuple[type[Exception], str], ...] = (
    (jwt.ExpiredSignatureError, "expired"),
    (jwt.ImmatureSignatureError, "not_yet_valid"),
    (jwt.InvalidAudienceError, "audience"),
    (jwt.InvalidIssuerError, "issuer"),
    (jwt.MissingRequiredClaimError, "missing_claim"),
    (jwt.InvalidSignatureError, "signature"),
    (jwt.InvalidAlgorithmError, "algorithm"),
    (jwt.InvalidKeyError, "key"),
)


class Authenticator:
    """Built once per process from the settings; `verify` is called for every hook and feedback request."""

    def __init__(self, settings: Settings, store: Store, keys: KeySetCache | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.public_url = settings.public_url.rstrip("/") if settings.public_url else None
        self.clients = load_clients(settings.clients_file) if settings.clients_file else {}
        self.keys = keys or KeySetCache()
        self._clock = clock
        if not self.clients:
            log.warning("no CDS_CLIENTS_FILE: every hook and feedback call will be refused (401); "
                        "configure trusted clients, or run with --dev on a trusted machine")
        if not self.public_url:
            # Never the request's Host: a token minted for another service would pass when sent with its Host.
            raise ConfigError("CDS_PUBLIC_URL is not set: it is the audience client tokens must name")

    def audiences(self, service_id: str, feedback: bool) -> list[str]:
        """The endpoint URLs a token's `aud` may name for this call."""
        endpoint = f"{self.public_url}/cds-services/{service_id}"
        return [endpoint, endpoint + "/feedback"] if feedback else [endpoint]

    def verify(self, header: str | None, service_id: str, feedback: bool = False) -> Client:
        """The caller, when `header` carries an acceptable token; else ApiError 401 (503 if the replay
        store is down)."""
        if not header or not header.strip():
            log.warning("refused call: service=%s reason=no_token", service_id)
            raise _unauthorized(None)
        try:
            return self._verify(header, service_id, feedback)
        except _Refused as refused:
            log.warning("refused token: service=%s reason=%s iss=%s", service_id, refused.reason,
                        refused.iss or "-")
            raise _unauthorized(refused.reason) from None

    def _verify(self, header: str, service_id: str, feedback: bool) -> Client:
        if not self.clients:
            raise _Refused("no_clients_configured")
        scheme, _, token = header.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or len(token) > MAX_TOKEN_CHARS or token.count(".") != 2:
            raise _Refused("malformed")
        try:
            parsed = jwt.decode_complete(token, options={"verify_signature": False})  # one parse for both
            head, unverified = parsed["header"], parsed["payload"]
        except jwt.PyJWTError:
            raise _Refused("malformed") from None
        alg, kid, jku, typ = head.get("alg"), head.get("kid"), head.get("jku"), head.get("typ", "JWT")
        if alg not in ALGORITHMS:
            raise _Refused("algorithm")
        if not isinstance(typ, str) or typ.upper() != "JWT" or not isinstance(kid, str) or not kid:
            raise _Refused("header")
        client = self.clients.get(unverified.get("iss")) if isinstance(unverified.get("iss"), str) else None
        if client is None:
            raise _Refused("unknown_issuer")
        jwk = self._key(client, kid, jku)
        claims = self._decode(token, client, jwk, alg, service_id, feedback)
        tenant = claims.get("tenant")
        if client.tenants and (not isinstance(tenant, str) or tenant not in client.tenants):
            raise _Refused("tenant", client.iss)
        self._remember(client, claims)
        return Client(iss=client.iss, tenant=tenant if isinstance(tenant, str) else None)

    def _key(self, client: TrustedClient, kid: str, jku: Any) -> dict[str, Any]:
        if jku is not None:
            if not isinstance(jku, str) or not client.allows_jku(jku):
                raise _Refused("jku_not_allowed", client.iss)  # and never fetched
            jwk = self.keys.key(jku, kid)
        elif client.keys is not None:
            jwk = client.keys.get(kid)
        elif client.jwks_url:
            jwk = self.keys.key(client.jwks_url, kid)
        else:
            raise _Refused("no_key_source", client.iss)
        if jwk is None:
            raise _Refused("unknown_kid", client.iss)
        return jwk

    def _decode(self, token: str, client: TrustedClient, jwk: dict[str, Any], alg: str, service_id: str,
                feedback: bool) -> dict[str, Any]:
        if jwk.get("alg", alg) != alg:
            raise _Refused("key_algorithm", client.iss)
        try:
            key = _public_key(alg, json.dumps(jwk, sort_keys=True))
            claims = jwt.decode(
                token, key=key, algorithms=[alg], audience=self.audiences(service_id, feedback),
                issuer=client.iss, leeway=LEEWAY_SECONDS,
                options={"require": ["iss", "aud", "exp", "iat", "jti"], "enforce_minimum_key_length": True},
            )
        except jwt.PyJWTError as exc:
            reason = next((r for kind, r in _REASONS if isinstance(exc, kind)), "invalid")
            raise _Refused(reason, client.iss) from None
        except Exception as exc:  # noqa: BLE001 - a hostile key or token must fail closed, never 500
            raise _Refused(f"unreadable:{type(exc).__name__}", client.iss) from None
        jti, exp = claims.get("jti"), claims.get("exp")
        if not isinstance(jti, str) or not jti or len(jti) > MAX_JTI_CHARS or not jti.isprintable():
            raise _Refused("jti", client.iss)
        if not isinstance(exp, (int, float)) or exp > self._clock() + MAX_LIFETIME_SECONDS:
            raise _Refused("lifetime", client.iss)
        return claims

    def _remember(self, client: TrustedClient, claims: dict[str, Any]) -> None:
        """Record the jti until the token can no longer be used; a second use is a replay."""
        expires_at = datetime.fromtimestamp(float(claims["exp"]) + LEEWAY_SECONDS, timezone.utc)
        try:
            first = self.store.remember_jti(client.iss, claims["jti"], expires_at)
        except StoreUnavailable as exc:
            log.error("cannot check token replay: database unavailable (%s); refusing with 503", exc)
            raise ApiError(503, "service_unavailable",
                           "the service cannot check the request's credentials right now; try again shortly",
                           headers={"Retry-After": "5"}) from None
        if not first:
            raise _Refused("replayed_jti", client.iss)
