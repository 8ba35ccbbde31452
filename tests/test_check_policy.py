"""`cds-service check-policy [DIR]`: validates packs for an analyst and runs each pack's example table
(examples.json) through the Evaluator. Exit 0 all good, 1 an example failed, 2 a pack is malformed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from test_schema import CARDS, PACK, ROOT, cards, edit_json  # noqa: F401  (cards is a fixture)

from cds_service import cli


def check(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[str]]:
    code = cli.main(["check-policy", *args])
    return code, capsys.readouterr().out.splitlines()


def test_ccp1247_example_table_passes(capsys: pytest.CaptureFixture[str]) -> None:
    code, lines = check(capsys, str(CARDS / PACK))
    cases = json.loads((CARDS / PACK / "examples.json").read_text(encoding="utf-8"))["cases"]
    assert code == 0, "\n".join(lines)
    assert len(cases) >= 15
    passed = [line for line in lines if line.strip().startswith("PASS")]
    assert len(passed) == len(cases)
    assert not [line for line in lines if "FAIL" in line or "MALFORMED" in line]
    assert lines[-1] == f"summary: 1 of 1 pack(s) valid; examples: {len(cases)} passed, 0 failed"


def test_the_example_table_covers_the_policy_s_answers() -> None:
    cases = json.loads((CARDS / PACK / "examples.json").read_text(encoding="utf-8"))["cases"]
    expected = [c["expected"] for c in cases]
    assert any(e["card"] for e in expected) and any(not e["card"] for e in expected)
    assert any("chiropractic-manipulation" in (e.get("offered") or []) for e in expected)
    assert any("chiropractic-manipulation" in e.get("not_offered", []) for e in expected)
    assert any(e.get("offered") == [] for e in expected)  # nothing offered as one click
    assert {e.get("rule") for e in expected} >= {"code", "text", "vertebral-augmentation-site"}
    assert {c["hook"] for c in cases} == {"order-select", "order-sign"}


def test_the_default_folder_is_the_configured_cards(capsys: pytest.CaptureFixture[str]) -> None:
    code, lines = check(capsys)
    assert code == 0
    assert lines[0] == f"{CARDS / 'services.json'}: valid"
    assert any(line.startswith(f"{CARDS / PACK}: Sandhills Center CCP.1247 version") for line in lines)


def test_a_wrong_expectation_fails_with_exit_1(cards: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def flip(data: dict[str, Any]) -> None:
        data["cases"][0]["expected"]["offered"] = ["facet-joint-injection"]
        data["cases"][4]["expected"]["card"] = True  # CT status post sacroplasty: no card in truth

    edit_json(cards / PACK / "examples.json", flip)
    code, lines = check(capsys, str(cards))
    assert code == 1
    failed = [line.strip() for line in lines if line.strip().startswith("FAIL")]
    assert len(failed) == 2
    assert failed[0].startswith("FAIL  0200T, plan member, recent low back pain: expected offered "
                                "['facet-joint-injection'], got ['chiropractic-manipulation', ")
    assert "expected a card, got none" in failed[1]
    assert lines[-1].endswith("passed, 2 failed")


def test_a_policy_edit_that_breaks_an_example_is_caught(cards: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # an analyst widens the chiropractic window to a year: the "back pain for four months" example now fails
    edit_json(cards / PACK / "conditions.json", lambda d: d.update(onset_window_days=365))
    code, lines = check(capsys, str(cards / PACK))
    assert code == 1
    assert any(line.strip().startswith("FAIL  low back pain for four months: expected offered") for line in lines)


@pytest.mark.parametrize("file, change, expected", [
    ("alternatives.json", lambda d: d["orderable"][1].update(rule="chiro"), "orderable[1].rule: unknown rule"),
    ("examples.json", lambda d: d["cases"][0]["expected"].update(offered=["chiropractic"]),
     "examples.json: cases[0].expected.offered: 'chiropractic' is no orderable alternative"),
    ("examples.json", lambda d: d["cases"][1].update(hook="order-dispatch"), "examples.json: cases[1].hook: "),
    ("examples.json", lambda d: d["cases"][2]["expected"].pop("card"),
     "examples.json: cases[2].expected.card: missing"),
    ("examples.json", lambda d: d["cases"][3].update(expect={}), "examples.json: cases[3].expect: unknown key"),
])
def test_a_malformed_pack_or_table_exits_2_naming_file_and_field(cards: Path, capsys: pytest.CaptureFixture[str],
                                                                 file: str, change: Callable[[Any], None],
                                                                 expected: str) -> None:
    edit_json(cards / PACK / file, change)
    code, lines = check(capsys, str(cards))
    assert code == 2
    malformed = [line for line in lines if line.startswith("MALFORMED")]
    assert malformed and str(cards / PACK / file) in malformed[0] and expected in malformed[0]
    assert lines[-1].startswith("summary: 0 of 1 pack(s) valid")


def test_a_malformed_services_file_exits_2(cards: Path, capsys: pytest.CaptureFixture[str]) -> None:
    edit_json(cards / "services.json", lambda d: d["services"][0].update(hooks="order-select"))
    code, lines = check(capsys, str(cards))
    assert code == 2
    assert lines[0] == f"MALFORMED  {cards / 'services.json'}: services[0].hooks: unknown key (a typo? comments " \
                       "start with '_')"
    assert "services.json malformed" in lines[-1]


def test_a_pack_without_examples_is_validated_only(cards: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (cards / PACK / "examples.json").unlink()
    code, lines = check(capsys, str(cards / PACK))
    assert code == 0
    assert any("no examples.json" in line for line in lines)


def test_a_folder_without_packs_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["check-policy", str(tmp_path)]) == 2
    assert "no policy pack" in capsys.readouterr().err


def test_the_command_line_exit_codes(cards: Path) -> None:
    """The installed entry point, in a subprocess: the same three exit codes."""
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cds_service.cli", "check-policy", *args], capture_output=True,
                              text=True, timeout=120, cwd=ROOT, env={**os.environ, "CDS_CARDS_DIR": str(cards)})

    assert run().returncode == 0
    edit_json(cards / PACK / "examples.json", lambda d: d["cases"][0]["expected"].update(card=False))
    failing = run()
    assert failing.returncode == 1 and "FAIL" in failing.stdout
    edit_json(cards / PACK / "detection.json", lambda d: d["code_formats"].update(CPT="(["))
    broken = run(str(cards / PACK))
    assert broken.returncode == 2
    assert f"{cards / PACK / 'detection.json'}: code_formats.CPT: regular expression" in broken.stdout
    assert "Traceback" not in broken.stderr
