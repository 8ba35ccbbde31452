"""The real server under slow clients (issue 13, findings 3 and 11): a client that trickles its request body
must cost a socket, never a worker thread, in production and dev mode alike.
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from conftest import load_fixture
from test_auth import PUBLIC, bearer, clients_file, key_server, keys, sign  # noqa: F401  (fixtures)
from test_store import count

from cds_service.storage.store import cards_issued

HOOK = "sacroplasty-order-select"
FIXTURE = "order-select-sacroplasty-cpt.json"
WORKERS, THREADS = 2, 2
SLOW_CLIENTS = 3 * WORKERS * THREADS  # more than every thread of every worker


class SlowClients:
    """`count` connections that each announce a 1,000-byte body and send one byte of it every 0.2 s."""

    def __init__(self, port: int, count: int, path: str, token: str | None = None) -> None:
        self._stop = threading.Event()
        self.sockets: list[socket.socket] = []
        auth = f"Authorization: Bearer {token}\r\n" if token else ""
        head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
                f"{auth}Content-Length: 1000\r\n\r\n").encode()
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(head + b"{")
            self.sockets.append(sock)
        self._thread = threading.Thread(target=self._trickle, daemon=True)
        self._thread.start()

    def _trickle(self) -> None:
        while not self._stop.wait(0.2):
            for sock in self.sockets:
                try:
                    sock.send(b" ")
                except OSError:
                    pass  # the server closed it: fine, it holds nothing then

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for sock in self.sockets:
            sock.close()


@pytest.fixture
def slow_clients() -> Iterator:
    opened: list[SlowClients] = []

    def open_(port: int, count: int, path: str, token: str | None = None) -> SlowClients:
        clients = SlowClients(port, count, path, token)
        opened.append(clients)
        return clients

    yield open_
    for clients in opened:
        clients.close()


def assert_still_answers(url: str, headers: dict[str, str] | None = None) -> None:
    """Discovery and a hook call answer while the slow clients trickle (generous time-outs: no timing test)."""
    time.sleep(1.0)  # every slow connection has been accepted and has sent part of its body
    for _ in range(3):
        assert requests.get(f"{url}/cds-services", timeout=5).status_code == 200
        response = requests.post(f"{url}/cds-services/{HOOK}", json=load_fixture(FIXTURE),
                                 headers=headers() if callable(headers) else headers, timeout=5)
        assert response.status_code == 200, response.text[:300]
        assert len(response.json()["cards"]) == 1


def test_slow_bodies_hold_no_thread_in_dev_mode(start_server, slow_clients) -> None:
    server = start_server(args=["--dev", "--threads", str(THREADS)], workers=WORKERS)
    slow_clients(server.port, SLOW_CLIENTS, f"/cds-services/{HOOK}")
    assert_still_answers(server.url)


def test_slow_bodies_hold_no_thread_in_production(start_server, slow_clients, tmp_path: Path, clients_file,
                                                  keys) -> None:
    server = start_server(env={"CDS_PUBLIC_URL": PUBLIC, "CDS_CLIENTS_FILE": clients_file, "CDS_DEV": ""},
                          args=["--threads", str(THREADS)], workers=WORKERS)
    path = f"/cds-services/{HOOK}"
    # Half without a token (refused with 401 once read), half with a valid one.
    slow_clients(server.port, SLOW_CLIENTS // 2, path)
    slow_clients(server.port, SLOW_CLIENTS // 2, path, token=sign(keys["ec"]))
    assert_still_answers(server.url, headers=lambda: bearer(sign(keys["ec"])))


def test_body_over_the_cap_is_refused_before_it_is_read(start_server) -> None:
    """A Content-Length over CDS_MAX_BODY_BYTES gets a JSON 413 without the body being sent at all."""
    server = start_server(env={"CDS_MAX_BODY_BYTES": "20000"}, args=["--dev"], workers=1)
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(f"POST /cds-services/{HOOK} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     "Content-Length: 50000000\r\n\r\n".encode())
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), head
    assert b"application/json" in head and b'"error"' in body


def test_no_control_socket(start_server, tmp_path: Path) -> None:
    """gunicorn 25.1+ opens ~/.gunicorn/gunicorn.ctl (or $XDG_RUNTIME_DIR/gunicorn.ctl) unless told not to;
    the instance started last took it over (issue 13, finding 11)."""
    home = tmp_path / "home"
    home.mkdir()
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    server = start_server(env={"HOME": str(home), "XDG_RUNTIME_DIR": str(runtime)}, args=["--dev"], workers=1)
    assert requests.get(f"{server.url}/cds-services", timeout=5).status_code == 200
    time.sleep(0.5)  # the control socket is opened as the master starts
    made = [p for p in [*home.rglob("*"), *runtime.rglob("*")] if "ctl" in p.name or p.is_socket()]
    assert made == []


def test_clean_stop_writes_every_card_record(start_server, tmp_path: Path) -> None:
    """The card writer of each worker is flushed when gunicorn stops the worker (worker_exit)."""
    database = f"sqlite:///{tmp_path / 'stop.sqlite3'}"
    server = start_server(env={"CDS_DATABASE_URL": database}, args=["--dev"], workers=2)
    calls = 20
    with requests.Session() as session:
        for _ in range(calls):
            response = session.post(f"{server.url}/cds-services/{HOOK}", json=load_fixture(FIXTURE), timeout=10)
            assert response.status_code == 200 and len(response.json()["cards"]) == 1
    server.stop()  # SIGTERM at once: the last records may still be queued in the workers
    assert server.process.returncode == 0
    assert count(database, cards_issued) == calls


def test_make_install_installs_the_postgres_extra() -> None:
    """README: `make` installs PostgreSQL's driver too (issue 13, finding 11)."""
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(["make", "-n", "-B", "install"], cwd=root, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    installs = [line for line in done.stdout.splitlines() if "pip install" in line and " -e " in line]
    assert installs and all("[postgres]" in line or "postgres]" in line for line in installs), installs


def _raw(port: int, data: bytes) -> bytes:
    """Send `data` on a fresh connection; all the server answers before it closes the connection."""
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def test_malformed_and_oversized_requests_get_json_errors(start_server) -> None:
    """What the server refuses itself, before the app, is a JSON error with the right status when the request is
    HTTP; what is not HTTP/1.1 at all gets the HTTP layer's bare 400 or 431. Never a 500, never a stack trace."""
    server = start_server(env={"CDS_MAX_BODY_BYTES": "20000"}, args=["--dev"], workers=1)
    huge = requests.get(f"{server.url}/cds-services", headers={"X-Pad": "x" * 100_000}, timeout=10)
    assert huge.status_code == 431
    assert huge.headers["Content-Type"] == "application/json" and huge.json()["error"]

    chunked_over_cap = _raw(server.port, f"POST /cds-services/{HOOK} HTTP/1.1\r\nHost: x\r\nContent-Type: "
                            "application/json\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
                            + b"7530\r\n" + b" " * 0x7530 + b"\r\n0\r\n\r\n")  # one chunk of 30,000 bytes
    head, _, body = chunked_over_cap.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413") and b"application/json" in head and b'"error"' in body

    for not_http in (b"POST /cds-services HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
                     b"GARBAGE\r\n\r\n",
                     b"GET /cds-services HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"x" * 500_000 + b"\r\n\r\n"):
        answer = _raw(server.port, not_http)
        assert answer.startswith((b"HTTP/1.1 400", b"HTTP/1.1 431")), answer[:100]
        assert b"Traceback" not in answer and b" 500 " not in answer
    assert requests.get(f"{server.url}/cds-services", timeout=5).status_code == 200


def test_a_request_still_arriving_after_the_read_deadline_is_cut(start_server) -> None:
    """A trickling client holds no thread, but it holds a connection: CDS_REQUEST_READ_SECONDS ends it."""
    server = start_server(env={"CDS_REQUEST_READ_SECONDS": "1"}, args=["--dev"], workers=1)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(f"POST /cds-services/{HOOK} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     "Content-Length: 1000\r\n\r\n{".encode())
        closed = False
        for _ in range(40):  # up to 20 s of trickling; the server should hang up after about 1-2 s
            try:
                sock.send(b" ")
                sock.settimeout(0.5)
                closed = sock.recv(1) == b""
            except TimeoutError:
                continue
            except OSError:
                closed = True
            if closed:
                break
        assert closed, "the server kept reading a request for 20 s"
    assert requests.get(f"{server.url}/cds-services", timeout=5).status_code == 200
