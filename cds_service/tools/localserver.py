"""`cds-service serve` on a free loopback port, as the tests (tests/conftest.py) and the benchmark start it.

The command is the one production runs (gunicorn workers serving with granian); only the host is fixed to
127.0.0.1 and the port chosen free.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (at the time of asking)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve_command(port: int | str, workers: int = 2, threads: int | None = None,
                  args: tuple[str, ...] | list[str] = ()) -> list[str]:
    """The `cds-service serve` command line on 127.0.0.1:`port`, by the installed script when there is one."""
    script = Path(sys.executable).parent / "cds-service"
    launcher = [str(script)] if script.exists() else [sys.executable, "-m", "cds_service.cli"]
    command = [*launcher, "serve", "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]
    if threads is not None:
        command += ["--threads", str(threads)]
    return [*command, *args]
