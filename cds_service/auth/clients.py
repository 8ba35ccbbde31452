"""The trusted-clients file (CDS_CLIENTS_FILE): which CDS clients may call, and where their keys are.

Read once at start; a missing or malformed file stops the service with a message naming the problem.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jwt

from cds_service.auth.keysets import PRIVATE_JWK_FIELDS, KeySetError, public_jwks

LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "::1"}
CLIENT_FIELDS = {"iss", "jwks_url", "jwks", "jku", "tenant"}


class ClientsFileError(Exception):
    """The clients file is missing or malformed: the service must not start."""


@dataclass(frozen=True)
class TrustedClient:
    """One entry of the clients file."""

    iss: str
    jwks_url: str | None = None
    jku: frozenset[str] = frozenset()
    keys: Mapping[str, dict[str, Any]] | None = None  # inline key set: kid → public JWK
    tenants: frozenset[str] = frozenset()  # empty: any tenant (or none)

    def allows_jku(self, url: str) -> bool:
        """The token's `jku` header may name only the client's own key-set URL or one on its allow-list."""
        return url in self.jku or url == self.jwks_url


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
