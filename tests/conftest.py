"""Shared test fixtures: an app on a fresh SQLite file, its client, fixture loading, a real server."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from cds_service import create_app
from cds_service.config import Settings
from cds_service.tools.localserver import free_port, serve_command

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"


def load_fixture(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / name).read_text(encoding="utf-8"))


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(dev=True, database_url=f"sqlite:///{tmp_path / 'cds.sqlite3'}")


@pytest.fixture
def app(settings: Settings):
    return create_app(settings)


@pytest.fixture
def client(app):
    return app.test_client()


class RunningServer:
    """`cds-service serve` in a subprocess on a free loopback port."""

    def __init__(self, env: dict[str, str], args: list[str], workers: int = 2, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = serve_command(self.port, workers, args=args)
        self.log_path = Path(env.get("CDS_TEST_LOG", os.devnull))
        self._log = open(self.log_path, "ab") if env.get("CDS_TEST_LOG") else subprocess.DEVNULL
        self.process = subprocess.Popen(command, env={**os.environ, **env}, stdout=self._log, stderr=self._log)
        try:
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}")
            try:
                requests.get(self.url + "/cds-services", timeout=2)
                return
            except (requests.ConnectionError, requests.Timeout):
                time.sleep(0.1)
        raise RuntimeError("server did not start within 60 s")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        if self._log is not subprocess.DEVNULL:
            self._log.close()


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Any]:
    """Factory: start_server(env=..., args=[...], workers=2, port=None) → RunningServer; all stopped at teardown."""
    servers: list[RunningServer] = []

    def start(env: dict[str, str] | None = None, args: list[str] | None = None, workers: int = 2,
              port: int | None = None) -> RunningServer:
        full_env = {"CDS_DATABASE_URL": f"sqlite:///{tmp_path / 'server.sqlite3'}", **(env or {})}
        server = RunningServer(full_env, args if args is not None else ["--dev"], workers, port)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
