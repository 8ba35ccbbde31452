"""Outbound FHIR reads against the CDS client's `fhirServer`, for prefetch keys the client did not send.

`fhirServer` comes from the request, so it is hostile input (server-side request forgery): only origins the
operator lists in CDS_FHIR_ALLOWED_ORIGINS are ever contacted, every request stays under the base URL (the
built query, next links and redirects; a path that some server could resolve above the base, such as
`%2e%2e`, `%2f..`, a backslash or `..;/`, is refused, not sent), responses are size-capped, and all fetches
of one hook call share one time budget (CDS_FHIR_TIMEOUT) that bounds every socket read and write too, so a
server that trickles its answer cannot hold a fetch thread past the budget. Failures never raise: the key
is reported as failed and a warning is logged, naming the key and the reason only — never a URL (it carries
the patient id), a token or a resource.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from http.cookiejar import DefaultCookiePolicy
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from cds_service import metrics
from cds_service.pipeline.fhirjson import bundle_entries

log = logging.getLogger(__name__)

ACCEPT = "application/fhir+json"
MAX_PAGES = 3  # Bundle pages followed per key (the first page included)
MAX_REDIRECTS = 2  # same-base redirects followed per request; any other redirect is refused
MAX_RESPONSE_BYTES = 2 * 1024 * 1024  # per response, after decompression
FETCH_THREADS = 16  # per worker process, shared by all hook calls
# RFC 6750 b64token: what a bearer token may contain (also keeps CR/LF out of the header).
BEARER_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
DEFAULT_PORTS = {"http": 80, "https": 443}


class FetchError(Exception):
    """Why a key could not be fetched. The message is logged: no URL, no patient data in it."""


def _origin(scheme: str, host: str, port: int | None) -> str:
    host = f"[{host}]" if ":" in host else host  # IPv6 literal
    return f"{scheme}://{host}" if port in (None, DEFAULT_PORTS[scheme]) else f"{scheme}://{host}:{port}"


def normalize_origin(value: str) -> str | None:
    """`scheme://host[:port]` in canonical form (lower case, default port dropped), or None if it is not one."""
    base = FhirBase.parse(value)
    return base.origin if base and base.path == "" else None


def _decoded(path: str, rounds: int = 3) -> str:
    """`path` percent-decoded until it no longer changes (double encoding too), backslashes as slashes."""
    for _ in range(rounds):
        decoded = unquote(path)
        if decoded == path:
            break
        path = decoded
    return path.replace("\\", "/")


def _escapes(path: str) -> bool:
    """True when some server could read `path` as climbing: a segment that, decoded and without its `;`
    parameters, is only dots (`..`, `%2e%2e`, `..;/`, `.%2e`) or a segment separator in disguise (`%2f..`,
    `\\..`), or a control character. FHIR paths have none of these, so refusing them costs nothing."""
    decoded = _decoded(path)
    if any(ord(c) < 32 or ord(c) == 127 for c in decoded):
        return True
    for segment in decoded.split("/"):
        core = segment.split(";", 1)[0].strip()
        if segment and not core.strip("."):
            return True
    return False


@dataclass(frozen=True)
class FhirBase:
    """A FHIR server base URL: its origin and the path every request must stay under."""

    origin: str
    path: str  # no trailing slash; "" for a server at the root

    @property
    def url(self) -> str:
        return self.origin + self.path

    @classmethod
    def parse(cls, value: str) -> FhirBase | None:
        try:
            parts = urlsplit(value.strip())
            scheme, host, port = parts.scheme.lower(), parts.hostname, parts.port
        except ValueError:
            return None
        if scheme not in DEFAULT_PORTS or not host or parts.username is not None or parts.password is not None:
            return None
        if parts.query or parts.fragment or _escapes(parts.path):
            return None
        return cls(_origin(scheme, host, port), parts.path.rstrip("/"))

    def contains(self, url: str) -> bool:
        """True when `url` is on the same origin and under the base path (no dot segments to climb out)."""
        target = FhirBase.parse(urlsplit(url)._replace(query="", fragment="").geturl())
        if target is None or target.origin != self.origin:
            return False
        return all(not self.path or path == self.path or path.startswith(self.path + "/")
                   for path in (target.path, _decoded(target.path)))


@dataclass(frozen=True)
class FetchOutcome:
    """`values`: key → the fetched resource (a searchset Bundle with every page's entries for a search).
    `failed`: keys that were tried and could not be had. `attempted`: False when no call was made at all
    (no fhirServer, or one the operator has not allowed) — then the data is simply unknown."""

    values: dict[str, Any] = field(default_factory=dict)
    failed: frozenset[str] = frozenset()
    attempted: bool = False


class _PerProcess:
    """One requests.Session and one fetch thread pool per worker process, made on first use.

    Built lazily and re-built after a fork, so a process that never meets a sacroplasty order never opens
    a pool, and pooled sockets are never shared between processes.
    """

    def __init__(self, threads: int) -> None:
        self._threads = threads
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._session: requests.Session | None = None
        self._executor: ThreadPoolExecutor | None = None

    def get(self) -> tuple[requests.Session, ThreadPoolExecutor]:
        with self._lock:
            if self._pid != os.getpid() or self._session is None or self._executor is None:
                self._pid = os.getpid()
                self._session = _new_session(self._threads)
                self._executor = ThreadPoolExecutor(self._threads, thread_name_prefix="fhir-fetch")
            return self._session, self._executor


# -- a deadline on every socket operation -------------------------------------------------------------------
#
# requests' read time-out bounds each recv(), not the call: a server that sends a header line every 0.1 s
# never trips it and held a fetch thread for as long as it liked, starving the pool for later hook calls
# (issue 13, finding 8). Each fetch thread sets its call's deadline here; every read and write on the
# connection may then wait only until that deadline, and the connect (TLS handshake included) is cut at it.

_DEADLINE = threading.local()


def _deadline() -> float | None:
    return getattr(_DEADLINE, "value", None)


class _DeadlineSocket:
    """A connected socket whose reads and writes wait at most until the current fetch's deadline."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)

    def _arm(self) -> None:
        deadline = _deadline()
        if deadline is None:
            return
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the fetch's time budget is spent")
        self._sock.settimeout(left)

    def recv(self, *args: Any) -> bytes:
        self._arm()
        return self._sock.recv(*args)

    def recv_into(self, *args: Any) -> int:
        self._arm()
        return self._sock.recv_into(*args)

    def send(self, *args: Any) -> int:
        self._arm()
        return self._sock.send(*args)

    def sendall(self, data: Any, *args: Any) -> None:
        view = memoryview(data).cast("B")
        while view:  # one send at a time, so the deadline holds between the pieces too
            sent = self.send(view, *args)
            view = view[sent:]

    def makefile(self, mode: str = "r", buffering: int | None = None, **_: Any) -> Any:
        """What http.client reads the response through: a buffered reader over this object's recv_into."""
        if mode != "rb":
            raise ValueError(f"unsupported mode {mode!r}")
        # As socket.makefile does: the descriptor stays open until this reader is closed too, even when the
        # connection closes the socket first (http.client does on a `Connection: close` answer).
        self._sock._io_refs += 1  # type: ignore[attr-defined]  # socket's own counter, not in the stubs
        return io.BufferedReader(socket.SocketIO(self, "rb"), io.DEFAULT_BUFFER_SIZE)  # type: ignore[arg-type]


class _DeadlineConnectionMixin:
    sock: Any

    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()  # type: ignore[misc]
        self._raw_sock = sock
        return sock

    def connect(self) -> None:
        deadline = _deadline()
        timer = None
        if deadline is not None:
            timer = threading.Timer(max(0.0, deadline - time.monotonic()), self._cut)
            timer.daemon = True
            timer.start()
        try:
            super().connect()  # type: ignore[misc]
        finally:
            if timer is not None:
                timer.cancel()
        self.sock = _DeadlineSocket(self.sock)

    def _cut(self) -> None:
        """The deadline passed while connecting (a trickled TLS handshake): unblock the thread."""
        sock = getattr(self, "_raw_sock", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _DeadlineHTTPConnection(_DeadlineConnectionMixin, HTTPConnection):
    pass


class _DeadlineHTTPSConnection(_DeadlineConnectionMixin, HTTPSConnection):
    pass


class _DeadlineHTTPPool(HTTPConnectionPool):
    ConnectionCls = _DeadlineHTTPConnection


class _DeadlineHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _DeadlineHTTPSConnection


class _DeadlineAdapter(HTTPAdapter):
    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _DeadlineHTTPPool, "https": _DeadlineHTTPSPool}


def _new_session(pool_size: int) -> requests.Session:
    session = requests.Session()
    session.trust_env = False  # no proxy variables, no ~/.netrc credentials: only what this module sends
    session.cookies.set_policy(DefaultCookiePolicy(allowed_domains=[]))  # no state carried between hook calls
    adapter = _DeadlineAdapter(pool_connections=8, pool_maxsize=pool_size, max_retries=0)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    return session


def bearer_token(authorization: dict[str, Any] | None) -> tuple[bool, str | None]:
    """(usable, token) from a CDS Hooks `fhirAuthorization`; only `access_token` is required of it.

    No fhirAuthorization at all → (True, None): an allowed, open FHIR server is read without a token.
    """
    if authorization is None:
        return True, None
    token_type = authorization.get("token_type")
    if token_type is not None and (not isinstance(token_type, str) or token_type.lower() != "bearer"):
        return False, None
    token = authorization.get("access_token")
    if not isinstance(token, str) or not BEARER_TOKEN.fullmatch(token):
        return False, None
    return True, token


class FhirReader:
    """Reads FHIR queries relative to a client's fhirServer within one time budget per hook call."""

    def __init__(self, allowed_origins: Iterable[str], budget: float, *, max_pages: int = MAX_PAGES,
                 max_bytes: int = MAX_RESPONSE_BYTES, threads: int = FETCH_THREADS) -> None:
        origins = set()
        for value in allowed_origins:
            origin = normalize_origin(value)
            if origin is None:
                log.warning("CDS_FHIR_ALLOWED_ORIGINS entry %r is not scheme://host[:port]; ignored", value)
            else:
                origins.add(origin)
        self.allowed_origins = frozenset(origins)
        self.budget = budget
        self.max_pages = max_pages
        self.max_bytes = max_bytes
        self._per_process = _PerProcess(threads)
        # urllib3 logs every request line (with its query: the patient id) at DEBUG; keep that out of any log.
        urllib3_log = logging.getLogger("urllib3.connectionpool")
        if urllib3_log.getEffectiveLevel() < logging.INFO:
            urllib3_log.setLevel(logging.INFO)

    @classmethod
    def from_settings(cls, settings: Any) -> FhirReader:
        return cls(settings.fhir_allowed_origins, settings.fhir_timeout)

    def allows(self, base: FhirBase) -> bool:
        return base.origin in self.allowed_origins

    def fetch(self, fhir_server: str | None, authorization: dict[str, Any] | None, queries: dict[str, str],
              hook_instance: str) -> FetchOutcome:
        """Fetch each key's query (relative to fhirServer, already rendered) concurrently within the budget."""
        hook = repr(hook_instance[:80])
        if not queries or not fhir_server:
            return FetchOutcome()
        base = FhirBase.parse(fhir_server)
        if base is None:
            log.warning("hookInstance=%s: fhirServer is not an http(s) base URL; ignored, deciding without %s",
                        hook, ", ".join(queries))
            return FetchOutcome()
        if not self.allows(base):
            log.warning("hookInstance=%s: fhirServer origin %r is not in CDS_FHIR_ALLOWED_ORIGINS; ignored "
                        "(no call made), deciding without %s", hook, base.origin, ", ".join(queries))
            metrics.FHIR_FETCHES.labels("refused_origin").inc(len(queries))
            return FetchOutcome()
        usable, token = bearer_token(authorization)
        if not usable or self.budget <= 0:
            why = "fhirAuthorization has no usable bearer access_token" if not usable else "no time budget"
            log.warning("hookInstance=%s: not fetching %s from %s: %s", hook, ", ".join(queries), base.origin, why)
            metrics.FHIR_FETCHES.labels("error").inc(len(queries))
            return FetchOutcome(failed=frozenset(queries), attempted=True)

        started = time.monotonic()
        deadline = started + self.budget
        session, executor = self._per_process.get()
        futures: dict[str, Future[Any]] = {
            key: executor.submit(self._get, session, base, query, token, deadline) for key, query in queries.items()
        }
        wait(futures.values(), timeout=max(0.0, deadline - time.monotonic()))
        values: dict[str, Any] = {}
        failed = set()
        for key, future in futures.items():
            timed_out = not future.done()
            if timed_out:
                future.cancel()
                reason: str | None = f"no answer within the {self.budget:g} s budget"
            else:
                error = future.exception()
                reason = str(error) if isinstance(error, FetchError) else (
                    f"unexpected {type(error).__name__}" if error else None)
            metrics.FHIR_FETCHES.labels("timeout" if timed_out else metrics.fetch_outcome(reason)).inc()
            if reason is None:
                values[key] = future.result()
            else:
                failed.add(key)
                log.warning("hookInstance=%s: FHIR fetch of %s from %s failed: %s; deciding without it",
                            hook, key, base.origin, reason)
        log.info("hookInstance=%s: FHIR fetch from %s: ok=%s failed=%s ms=%.0f", hook, base.origin,
                 ",".join(sorted(values)) or "-", ",".join(sorted(failed)) or "-",
                 (time.monotonic() - started) * 1000)
        return FetchOutcome(values, frozenset(failed), attempted=True)

    # -- runs on a fetch thread ---------------------------------------------------------------------------

    def _get(self, session: requests.Session, base: FhirBase, query: str, token: str | None,
             deadline: float) -> dict[str, Any]:
        """A read (`Type/id`) returns that resource; a search returns one searchset Bundle of all pages read."""
        _DEADLINE.value = deadline
        try:
            return self._get_within(session, base, query, token, deadline)
        finally:
            _DEADLINE.value = None

    def _get_within(self, session: requests.Session, base: FhirBase, query: str, token: str | None,
                    deadline: float) -> dict[str, Any]:
        url = f"{base.url}/{query.lstrip('/')}"
        if not base.contains(url):
            raise FetchError("the query would leave the fhirServer base; not sent")
        path = query.split("?", 1)[0].strip("/")
        if "/" in path:
            resource = self._get_json(session, base, url, token, deadline)
            if resource.get("resourceType") != path.split("/", 1)[0]:
                raise FetchError(f"expected a {path.split('/', 1)[0]}, got {_kind(resource)}")
            return resource
        entries: list[dict[str, Any]] = []
        for _ in range(self.max_pages):
            bundle = self._get_json(session, base, url, token, deadline)
            if bundle.get("resourceType") != "Bundle":
                raise FetchError(f"expected a Bundle, got {_kind(bundle)}")
            page = bundle_entries(bundle)
            if page is None:
                raise FetchError("Bundle.entry is not a list")
            entries.extend(e for e in page if isinstance(e, dict))
            next_url = _next_link(bundle)
            if next_url is None:
                return {"resourceType": "Bundle", "type": "searchset", "entry": entries}
            url = urljoin(base.url + "/", next_url)
            if not base.contains(url):
                raise FetchError("Bundle next link leaves the fhirServer base; not followed")
        raise FetchError(f"more than {self.max_pages} pages of results; the list is incomplete")

    def _get_json(self, session: requests.Session, base: FhirBase, url: str, token: str | None,
                  deadline: float) -> dict[str, Any]:
        headers = {"Accept": ACCEPT}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        for _ in range(MAX_REDIRECTS + 1):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise FetchError("time budget spent")
            try:
                with session.get(url, headers=headers, timeout=(remaining, remaining), stream=True,
                                 allow_redirects=False) as response:
                    if response.is_redirect:
                        target = urljoin(url, response.headers["Location"])
                        if not base.contains(target):
                            raise FetchError(f"HTTP {response.status_code} redirect away from the fhirServer "
                                             "base refused")
                        url = target
                        continue
                    if response.status_code != 200:
                        raise FetchError(f"HTTP {response.status_code}")
                    body = self._read(response, deadline)
            except requests.Timeout:
                raise FetchError("timed out") from None
            except requests.RequestException as exc:
                raise FetchError(f"connection failed ({type(exc).__name__})") from None
            try:
                data = json.loads(body)
            except (ValueError, RecursionError):
                raise FetchError("response is not valid JSON") from None
            if not isinstance(data, dict):
                raise FetchError("response is not a JSON object")
            return data
        raise FetchError("too many redirects")

    def _read(self, response: requests.Response, deadline: float) -> bytes:
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            raise FetchError(f"response larger than {self.max_bytes} bytes")
        chunks, size = [], 0
        for chunk in response.iter_content(chunk_size=64 * 1024):
            size += len(chunk)
            if size > self.max_bytes:
                raise FetchError(f"response larger than {self.max_bytes} bytes")
            if time.monotonic() > deadline:
                raise FetchError("time budget spent while reading")
            chunks.append(chunk)
        return b"".join(chunks)


def _kind(resource: dict[str, Any]) -> str:
    kind = resource.get("resourceType")
    return repr(kind[:40]) if isinstance(kind, str) else "no resourceType"


def _next_link(bundle: dict[str, Any]) -> str | None:
    links = bundle.get("link")
    for link in links if isinstance(links, list) else []:
        if isinstance(link, dict) and link.get("relation") == "next" and isinstance(link.get("url"), str):
            return link["url"]
    return None
