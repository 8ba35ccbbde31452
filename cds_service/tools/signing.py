"""Client keys and signed JWTs, as a CDS client authenticates to a CDS service (CDS Hooks 2.0 security)."""

from __future__ import annotations

import base64
import hashlib
import json
import time
import uuid
from typing import Any

import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from cds_service.auth.keysets import ALGORITHMS  # one list for both sides of the handshake

TOKEN_LIFETIME = 300  # seconds, as the CDS Hooks Sandbox does
RSA_BITS = 3072


class UsageError(Exception):
    """Something the caller must fix before a call can be made (exit code 2)."""


SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def generate_key(alg: str) -> SigningKey:
    if alg == "ES384":
        return ec.generate_private_key(ec.SECP384R1())
    if alg == "RS384":
        return rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    raise UsageError(f"--alg must be one of {', '.join(ALGORITHMS)}")


def algorithm_for(key: Any, requested: str | None = None) -> str:
    """The JWS algorithm a private key signs with: ES384 for a P-384 EC key, RS384 for RSA."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if not isinstance(key.curve, ec.SECP384R1):
            raise UsageError(f"ES384 needs an EC key on curve P-384; this key is on {key.curve.name}")
        alg = "ES384"
    elif isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < 2048:
            raise UsageError(f"RS384 needs an RSA key of at least 2048 bits; this one has {key.key_size}")
        alg = "RS384"
    else:
        raise UsageError("the key must be an EC P-384 (ES384) or RSA (RS384) private key")
    if requested and requested != alg:
        raise UsageError(f"--alg {requested} does not match the key, which signs with {alg}")
    return alg


def read_file(path: str, what: str = "") -> bytes:
    """The bytes of a file the user named; UsageError saying which file and why when it cannot be read."""
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise UsageError(f"cannot read {what}{path}: {exc.strerror or exc}") from None


def load_private_key(path: str) -> SigningKey:
    data = read_file(path, "key ")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise UsageError(f"key {path} is password-protected; give an unencrypted PEM private key") from None
    except (ValueError, UnsupportedAlgorithm):
        raise UsageError(f"{path} is not a PEM private key") from None
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        raise UsageError("the key must be an EC P-384 (ES384) or RSA (RS384) private key")
    return key


def public_jwk(key: SigningKey, alg: str, kid: str | None = None) -> dict[str, Any]:
    """The public half as a JWK, with kid (default: its RFC 7638 thumbprint), alg and use."""
    public = key.public_key()
    if isinstance(public, ec.EllipticCurvePublicKey):
        jwk = dict(ECAlgorithm.to_jwk(public, as_dict=True))
    else:
        jwk = dict(RSAAlgorithm.to_jwk(public, as_dict=True))
    jwk.pop("key_ops", None)
    return {**jwk, "kid": kid or thumbprint(jwk), "alg": alg, "use": "sig"}


def thumbprint(jwk: dict[str, Any]) -> str:
    """RFC 7638 JWK thumbprint (SHA-256): a stable key id both `keys` and `call` can derive."""
    members = ("crv", "kty", "x", "y") if jwk["kty"] == "EC" else ("e", "kty", "n")
    canonical = json.dumps({m: jwk[m] for m in members}, separators=(",", ":"), sort_keys=True)
    return base64.urlsafe_b64encode(hashlib.sha256(canonical.encode()).digest()).rstrip(b"=").decode()


def make_token(key: SigningKey, alg: str, iss: str, aud: str, kid: str, now: float | None = None) -> str:
    """A fresh CDS Hooks client JWT: aud is the exact endpoint URL, a new jti every time."""
    issued = int(now if now is not None else time.time())
    claims = {"iss": iss, "aud": aud, "exp": issued + TOKEN_LIFETIME, "iat": issued, "jti": str(uuid.uuid4())}
    return jwt.encode(claims, key, algorithm=alg, headers={"kid": kid, "typ": "JWT"})
