"""What an authenticated hook call must do, done plainly, for the benchmark's authenticated baseline and peer.

Verify the bearer JWT (ES384) with PyJWT against the client's JWKS, fetched once from the URL in
BENCH_JWKS_URL and cached by PyJWKClient; check iss, aud, exp, iat; record its jti in SQLite
(BENCH_AUTH_DB: WAL, synchronous=NORMAL, as the service configures SQLite) so a replay is refused.
One connection per thread; each insert commits on its own.
"""

from __future__ import annotations

import os
import sqlite3
import threading

import jwt

ISSUER = os.environ.get("BENCH_ISS", "")
AUDIENCE_BASE = os.environ.get("BENCH_AUD_BASE", "")  # <base>/cds-services/<id> is the audience
_client = jwt.PyJWKClient(os.environ["BENCH_JWKS_URL"], cache_keys=True) if os.environ.get("BENCH_JWKS_URL") else None
_local = threading.local()


def _db() -> sqlite3.Connection:
    connection = getattr(_local, "db", None)
    if connection is None:
        connection = sqlite3.connect(os.environ["BENCH_AUTH_DB"], isolation_level=None, timeout=10)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
        connection.execute("CREATE TABLE IF NOT EXISTS seen_jti (jti TEXT PRIMARY KEY, exp INTEGER NOT NULL)")
        _local.db = connection
    return connection


def check(authorization: str | None, service_id: str) -> str | None:
    """None when the call may proceed, else why it is refused (answered 401)."""
    if _client is None:
        return "authentication is not configured"
    if not authorization or not authorization.startswith("Bearer "):
        return "no bearer token"
    token = authorization[7:]
    try:
        key = _client.get_signing_key_from_jwt(token)
        claims = jwt.decode(token, key.key, algorithms=["ES384"], issuer=ISSUER,
                            audience=f"{AUDIENCE_BASE}/cds-services/{service_id}",
                            options={"require": ["iss", "aud", "exp", "iat", "jti"]})
    except jwt.PyJWTError as exc:
        return f"invalid token: {type(exc).__name__}"
    try:
        _db().execute("INSERT INTO seen_jti (jti, exp) VALUES (?, ?)", (claims["jti"], claims["exp"]))
    except sqlite3.IntegrityError:
        return "token replayed"
    return None
