"""Key sets of trusted clients: fetched (no redirects, size cap, deadline), cached per URL and refreshed,
and the choice of which key set a token's key comes from (inline, `jwks_url`, or an allowed `jku`).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import requests

if TYPE_CHECKING:
    from cds_service.auth.clients import TrustedClient

log = logging.getLogger(__name__)

ALGORITHMS = ("ES384", "RS384")  # the two CDS Hooks 2.0 recommends; never "none", never HMAC
MAX_JWKS_BYTES = 256 * 1024
JWKS_FETCH_TIMEOUT = 2.0  # seconds, connect + whole body: a slow key server stalls only calls that need it
JWKS_MAX_AGE = 300.0  # after this a cached key set is refreshed in the background, still served meanwhile
JWKS_MIN_REFRESH = 2.0  # at most one fetch per URL (per process) in this many seconds for unknown kids
PRIVATE_JWK_FIELDS = {"d", "p", "q", "dp", "dq", "qi", "oth", "k"}


class KeySetError(Exception):
    """A key set could not be fetched or read."""


class KeyNotFound(Exception):
    """No usable key for a token; `reason` is a short category for the log."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


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


def key_for(client: TrustedClient, kid: str, jku: Any, cache: KeySetCache) -> dict[str, Any]:
    """The public JWK a token of `client` with header `kid` / `jku` is checked against. A `jku` not on the
    client's allow-list is refused and never fetched. Raises KeyNotFound."""
    if jku is not None:
        if not isinstance(jku, str) or not client.allows_jku(jku):
            raise KeyNotFound("jku_not_allowed")
        jwk = cache.key(jku, kid)
    elif client.keys is not None:
        jwk = client.keys.get(kid)
    elif client.jwks_url:
        jwk = cache.key(client.jwks_url, kid)
    else:
        raise KeyNotFound("no_key_source")
    if jwk is None:
        raise KeyNotFound("unknown_kid")
    return jwk
