"""The command line: `evaluate` prints exactly what the API answers; `serve` runs the real server."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import requests
from conftest import FIXTURES, load_fixture
from test_api import SERVICE, flagged_orders


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cds_service.cli", *args], capture_output=True, text=True,
                          timeout=60)


def _strip_ids(value):
    """Responses differ only in generated uuids and timestamps."""
    if isinstance(value, dict):
        return {k: _strip_ids(v) for k, v in value.items() if k not in ("uuid", "id", "authoredOn", "valueDate",
                                                                        "valueString")}
    if isinstance(value, list):
        return [_strip_ids(v) for v in value]
    return value


@pytest.mark.parametrize("name", ["order-select-sacroplasty-cpt.json", "order-sign-mixed.json",
                                  "sandbox-pama-order-select-ct.json"])
def test_evaluate_prints_the_api_response(client, name: str) -> None:
    result = run_cli("evaluate", str(FIXTURES / name))
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    request = load_fixture(name)
    # evaluate links the policy page at serve's default address, as a served call at that address does
    answered = client.post(f"/cds-services/{SERVICE[request['hook']]}", json=request,
                           base_url="http://127.0.0.1:8080").get_json()
    assert _strip_ids(printed) == _strip_ids(answered)


@pytest.mark.parametrize("content", ["{broken", "[]", '{"hook": "patient-view"}',
                                     '{"hook": "order-select", "hookInstance": "x", "context": {}}'])
def test_evaluate_invalid_file_exits_2_with_one_line(tmp_path, content: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    result = run_cli("evaluate", str(path))
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error:")


def test_evaluate_missing_file_exits_2(tmp_path) -> None:
    result = run_cli("evaluate", str(tmp_path / "absent.json"))
    assert result.returncode == 2 and "error:" in result.stderr


def test_real_server_answers_hooks(start_server) -> None:
    server = start_server(args=["--dev"], workers=2)
    discovery = requests.get(server.url + "/cds-services", timeout=5)
    assert discovery.status_code == 200
    assert {s["id"] for s in discovery.json()["services"]} == set(SERVICE.values()) | {
        "coverage-order-dispatch", "coverage-appointment-book"}
    for name, expected in [("order-select-sacroplasty-cpt.json", ["ServiceRequest/sr-sacro-1"]),
                           ("order-sign-mixed.json", ["ServiceRequest/sr-sacro-2"]),
                           ("sandbox-pama-order-select-ct.json", [])]:
        request = load_fixture(name)
        response = requests.post(f"{server.url}/cds-services/{SERVICE[request['hook']]}", json=request, timeout=5)
        assert response.status_code == 200
        assert response.headers["Content-Type"].startswith("application/json")
        assert flagged_orders(response.json()) == expected
    bad = requests.post(f"{server.url}/cds-services/sacroplasty-order-select", data="{oops",
                        headers={"Content-Type": "application/json"}, timeout=5)
    assert bad.status_code == 400 and bad.json()["error"] == "invalid_request"
