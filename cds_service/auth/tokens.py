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

import base64
import binascii
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from typing import Any

import jwt
import orjson

from cds_service import metrics
from cds_service.auth.clients import ClientsFileError, TrustedClient, load_clients
from cds_service.auth.keysets import ALGORITHMS, KeyNotFound, KeySetCache, key_for
from cds_service.config import ConfigError, Settings
from cds_service.errors import ApiError
from cds_service.storage.store import Store, StoreUnavailable

__all__ = ["Authenticator", "Client", "ClientsFileError", "load_clients"]  # cli.py imports the last two here

log = logging.getLogger(__name__)

LEEWAY_SECONDS = 30  # clock skew allowed on exp / iat
MAX_LIFETIME_SECONDS = 3600  # a token may not expire more than an hour from now (spec best practice)
MAX_TOKEN_CHARS = 4096  # CDS Hooks tokens are well under 2 kB
MAX_JTI_CHARS = 255
_SEGMENT = re.compile(r"[A-Za-z0-9_-]*")  # base64url without padding (RFC 7515, section 2)


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


def _unverified(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The header and claims of a compact JWS, read without checking anything but their form: only to learn who
    signed it and with which key. PyJWT then checks the whole token, signature and claims; reading these two
    segments here instead of through PyJWT saves a second full parse of the token on every call."""
    parts = token.split(".")
    if len(parts) != 3 or not all(_SEGMENT.fullmatch(part) for part in parts):
        raise _Refused("malformed")
    try:
        head, claims = (orjson.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))) for part in parts[:2])
    except (binascii.Error, orjson.JSONDecodeError, ValueError):
        raise _Refused("malformed") from None
    if not isinstance(head, dict) or not isinstance(claims, dict):
        raise _Refused("malformed")
    return head, claims


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
            metrics.AUTH_REFUSALS.labels("no_token").inc()
            raise _unauthorized(None)
        try:
            return self._verify(header, service_id, feedback)
        except _Refused as refused:
            log.warning("refused token: service=%s reason=%s iss=%s", service_id, refused.reason,
                        refused.iss or "-")
            metrics.AUTH_REFUSALS.labels(metrics.auth_reason(refused.reason)).inc()
            raise _unauthorized(refused.reason) from None

    def _verify(self, header: str, service_id: str, feedback: bool) -> Client:
        if not self.clients:
            raise _Refused("no_clients_configured")
        scheme, _, token = header.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or len(token) > MAX_TOKEN_CHARS or token.count(".") != 2:
            raise _Refused("malformed")
        head, unverified = _unverified(token)
        alg, kid, jku, typ = head.get("alg"), head.get("kid"), head.get("jku"), head.get("typ", "JWT")
        if alg not in ALGORITHMS:
            raise _Refused("algorithm")
        if not isinstance(typ, str) or typ.upper() != "JWT" or not isinstance(kid, str) or not kid:
            raise _Refused("header")
        iss = unverified.get("iss")
        client = self.clients.get(iss) if isinstance(iss, str) else None
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
        try:
            return key_for(client, kid, jku, self.keys)
        except KeyNotFound as missing:
            raise _Refused(missing.reason, client.iss) from None

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
