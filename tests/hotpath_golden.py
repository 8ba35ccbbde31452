"""Issue 17's answer recorder: every hook fixture (and variants of it) through the Flask app, every pack example
through the Evaluator, each answer written as one normalised JSON line: status, headers, body, the card and
invocation rows handed to the database writer, the log records, and the metric changes.

Ids and timestamps are the only things that may differ between two runs: each UUID is replaced by its order of
first appearance in the call (U1, U2, ...), today's date and the current time by DATE / TIME, durations dropped.
tests/golden/hotpath.json holds, per call, the SHA-256 of its record as answered by the code before issue 17's
optimisations (commit 3b56f1f); test_hotpath_golden.py checks every call still answers the same. To see what
differs, write the full records before and after and compare them:
    .venv/bin/python tests/hotpath_golden.py --full > /tmp/after.jsonl
After a deliberate change of answer, rewrite the digests:
    .venv/bin/python tests/hotpath_golden.py > tests/golden/hotpath.json
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import re
import sys
import tempfile
import threading
from collections.abc import Iterator
from datetime import datetime, time, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
CARDS = ROOT / "cards"

# The hook calls are answered as at this instant (the chiropractic window runs from "today"), so that the record
# holds whatever the date the test runs.
FIXED_NOW = datetime(2026, 11, 30, 12, 0, 0, tzinfo=timezone.utc)
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
SERVICES = {"order-select": "sacroplasty-order-select", "order-sign": "sacroplasty-order-sign",
            "order-dispatch": "sacroplasty-order-dispatch", "appointment-book": "sacroplasty-appointment-book"}


class Normaliser:
    """Replaces what changes from run to run (ids, today's date and time) by stable placeholders."""

    def __init__(self) -> None:
        self.ids: dict[str, str] = {}
        self.today = FIXED_NOW.date().isoformat()

    def _uuid(self, match: re.Match[str]) -> str:
        return self.ids.setdefault(match.group(0), f"U{len(self.ids) + 1}")

    def text(self, value: str) -> str:
        value = UUID.sub(self._uuid, value)
        value = re.sub(re.escape(self.today) + r"T\d\d:\d\d:\d\d(\.\d+)?(\+00:00|Z)?", "TIME", value)
        return value.replace(self.today, "DATE")

    def value(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, bytes):
            return "b:" + self.text(value.decode("utf-8", "replace"))
        if isinstance(value, datetime):
            return "DATETIME"
        if isinstance(value, dict):
            return {self.text(str(k)): self.value(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.value(v) for v in value]
        return value


class Capture(logging.Handler):
    """The log records of the calls: those of this thread (the test client answers on it), not those another
    test's database writer thread may log meanwhile."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.thread = threading.get_ident()

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.records.append(record)


_EXTRA = ("service", "hook_instance", "status", "cards")


def _log_line(record: logging.LogRecord) -> dict[str, Any]:
    message = re.sub(r" ms=[0-9.]+", " ms=-", record.getMessage())
    return {"logger": record.name, "level": record.levelname, "message": message,
            **{k: getattr(record, k) for k in _EXTRA if hasattr(record, k)},
            "has_duration": hasattr(record, "duration_ms")}


# Set by database writer threads (other tests' too), whenever they run: no part of a call's answer.
_BACKGROUND = ("cds_writer_queue_depth", "cds_database_errors", "cds_records_dropped", "cds_worker")


def _metrics() -> dict[str, float]:
    from prometheus_client import REGISTRY

    values = {}
    for family in REGISTRY.collect():
        if not family.name.startswith("cds_") or family.name.startswith(_BACKGROUND):
            continue
        for sample in family.samples:
            if sample.name.endswith(("_created", "_sum")) or "_bucket" in sample.name:
                continue  # timestamps and durations
            values[sample.name + json.dumps(sample.labels, sort_keys=True)] = sample.value
    return values


def _delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in sorted(after.items()) if v != before.get(k, 0.0)}


def _fixtures() -> Iterator[tuple[str, dict[str, Any]]]:
    for path in sorted(FIXTURES.glob("*.json")):
        body = json.loads(path.read_text(encoding="utf-8"))
        yield path.name, body.get("request", body)


def _orders(body: dict[str, Any]) -> list[dict[str, Any]]:
    bundle = body.get("context", {}).get("draftOrders") or {}
    return [e["resource"] for e in bundle.get("entry", []) if isinstance(e, dict) and "resource" in e]


def _variants(name: str, body: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """The fixture as sent, and edits of it that take other branches of the hit path."""
    yield name, body
    if not _orders(body):
        return
    configs = {"no-coverage-info": {"coverage-info": False}, "no-alternatives": {"alternatives": False},
               "max-cards-0": {"max-cards": 0}}
    for label, config in configs.items():
        edited = copy.deepcopy(body)
        edited.setdefault("extension", {})["davinci-crd.configuration"] = config
        yield f"{name}#{label}", edited
    mutations = {
        "bad-authoredOn": lambda o: o.__setitem__("authoredOn", "last tuesday"),
        "no-id": lambda o: o.pop("id", None),
        "bad-status": lambda o: o.__setitem__("status", 7),
        "unknown-element": lambda o: o.__setitem__("colour", "blue"),
        "extension-not-list": lambda o: o.__setitem__("extension", {"url": "x"}),
        "empty-extension": lambda o: o.__setitem__("extension", []),
        "bad-subject": lambda o: o.__setitem__("subject", {"reference": 5}),
        "reason-fracture": lambda o: o.__setitem__("reasonCode", [{"coding": [
            {"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "S32.10XA"}], "text": "sacral fracture"}]),
        "reason-radiculopathy": lambda o: o.__setitem__("reasonCode", [{"coding": [
            {"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "M54.16"}]}]),
        "reason-lbp": lambda o: o.__setitem__("reasonCode", [{"coding": [
            {"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "M54.50", "display": "Low back pain"}],
            "text": "low back pain"}]),
        "name-markup": lambda o: o.__setitem__("code", {**(o.get("code") or {}), "text": "Sacroplasty *[x]* `y`"}),
        "many-reasons": lambda o: o.__setitem__("reasonCode", [
            {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": code, "display": f"d{n}"},
                        {"system": "http://snomed.info/sct", "code": "279039007"},
                        {"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "M54 .5"}],
             "text": "x" * (150 + 20 * n)}
            for n, code in enumerate(["M54.50", "M54.16", "M54.5", "G8929", "M54.50", "S32.10XA", "M54.50"])]),
        "reason-reference": lambda o: o.update({"reasonReference": [{"reference": "#c1"}],
                                                "contained": [{"resourceType": "Condition", "id": "c1", "code": {
                                                    "coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm",
                                                                "code": "M54.16"}]}}]}),
        "reason-words": lambda o: o.__setitem__("reasonCode", [{"text": "metastatic cancer; osteomyelitis"}]),
        "null-priority": lambda o: o.__setitem__("priority", None),
        "insurance": lambda o: o.__setitem__("insurance", [{"reference": "Coverage/cov-1"}, {"display": "x"}]),
        "coverage-ext": lambda o: o.__setitem__("extension", [{
            "url": "http://hl7.org/fhir/us/davinci-crd/StructureDefinition/ext-coverage-information",
            "extension": [{"url": "coverage", "valueReference": {"reference": "Coverage/cov-sh-1001"}},
                          {"url": "covered", "valueCode": "covered"}]}]),
    }
    for label, mutate in mutations.items():
        edited = copy.deepcopy(body)
        for order in _orders(edited):
            mutate(order)
        yield f"{name}#{label}", edited


def _bad_requests() -> Iterator[tuple[str, str, bytes, str]]:
    """(name, service, body, content type) of requests that must be refused."""
    body = json.loads((FIXTURES / "order-select-sacroplasty-cpt.json").read_text(encoding="utf-8"))
    raw = json.dumps(body).encode()
    yield "bad:not-json", "sacroplasty-order-select", b"{", "application/json"
    yield "bad:text-plain", "sacroplasty-order-select", raw, "text/plain"
    yield "bad:unknown-service", "no-such-service", raw, "application/json"
    yield "bad:deep", "sacroplasty-order-select", b"[" * 300 + b"]" * 300, "application/json"
    yield "bad:array", "sacroplasty-order-select", b"[]", "application/json"
    yield "bad:wrong-hook", "sacroplasty-order-sign", raw, "application/json"
    no_patient = copy.deepcopy(body)
    del no_patient["context"]["patientId"]
    yield "bad:no-patient", "sacroplasty-order-select", json.dumps(no_patient).encode(), "application/json"
    version = copy.deepcopy(body)
    version["extension"] = {"davinci-crd.requestedVersion": "0.1"}
    yield "bad:version", "sacroplasty-order-select", json.dumps(version).encode(), "application/json"


def _row(row: Any) -> dict[str, Any]:
    """A row handed to the writer; its JSON text columns checked for canonical form (sorted keys), then parsed:
    the order of keys that are random ids would differ from run to run."""
    row = dict(row)
    for key in ("suggestions", "decisions"):
        if isinstance(row.get(key), str):
            parsed = json.loads(row[key])
            row[key] = {"canonical": json.dumps(parsed, sort_keys=True) == row[key], "value": parsed}
    return row


class _FixedClock(datetime):
    """datetime, with now() at FIXED_NOW: what evaluate.py reads the time of the call from."""

    @classmethod
    def now(cls, tz: Any = None) -> datetime:  # type: ignore[override]
        return FIXED_NOW if tz is None else FIXED_NOW.astimezone(tz)


def app_records() -> Iterator[dict[str, Any]]:
    """Every fixture variant and bad request through a fresh dev-mode app, its clock at FIXED_NOW."""
    from cds_service import create_app
    from cds_service.pipeline import evaluate

    real = evaluate.datetime
    evaluate.datetime = _FixedClock  # type: ignore[misc]
    try:
        yield from _app_records(create_app)
    finally:
        evaluate.datetime = real  # type: ignore[misc]


def _app_records(create_app: Any) -> Iterator[dict[str, Any]]:

    directory = tempfile.mkdtemp()
    app = create_app({"dev": True, "database_url": f"sqlite:///{directory}/golden.sqlite3"})
    store = app.extensions["cds_store"]
    submitted: list[Any] = []
    store._writer.submit = lambda payload, waited=False: submitted.append(payload)  # no database write
    capture = Capture()
    root = logging.getLogger("cds_service")
    root.addHandler(capture)
    client = app.test_client()
    calls: list[tuple[str, str, bytes, str]] = []
    for name, body in _fixtures():
        for label, variant in _variants(name, body):
            calls.append((label, SERVICES.get(str(variant.get("hook")), "x"), json.dumps(variant).encode(),
                          "application/json"))
    calls += list(_bad_requests())
    try:
        for index, (label, service, raw, content_type) in enumerate(calls):
            submitted.clear()
            capture.records.clear()
            before = _metrics()
            headers = {"X-Request-ID": f"golden-{index}"} if index % 2 else {}
            response = client.post(f"/cds-services/{service}", data=raw, content_type=content_type,
                                   headers=headers)
            norm = Normaliser()
            yield norm.value({
                "call": label,
                "status": response.status_code,
                "headers": sorted((k, v) for k, v in response.headers.items() if k != "X-Request-ID"),
                "request_id_kept": response.headers.get("X-Request-ID") == headers.get("X-Request-ID",
                                                                                        response.headers.get(
                                                                                            "X-Request-ID")),
                "body": response.get_data(as_text=True),
                "stored": [[_row(row) for row in payload] for payload in submitted],
                "logs": [_log_line(r) for r in capture.records],
                "metrics": _delta(before, _metrics()),
            })
    finally:
        root.removeHandler(capture)


def example_records() -> Iterator[dict[str, Any]]:
    """Every pack example through the Evaluator (as check-policy runs them), at the example's own date."""
    import orjson

    from cds_service.errors import ApiError
    from cds_service.pipeline import schema
    from cds_service.pipeline.evaluate import Evaluator
    from cds_service.pipeline.examples import example_request
    from cds_service.pipeline.policy import load_catalogue

    catalogue = load_catalogue(CARDS)
    evaluator = Evaluator(catalogue, max_draft_orders=100)
    by_hook = {s.hook: s for s in evaluator.services.values()}
    for policy in catalogue.packs:
        path = CARDS / policy.id / "examples.json"
        if not path.exists():
            path = next(CARDS.glob("*/examples.json"))
        table = schema.parse(schema.ExamplesFile, path)
        for number, case in enumerate(table.cases, start=1):
            today = datetime.strptime(case.today or table.today, "%Y-%m-%d").date()
            now = datetime.combine(today, time(12), timezone.utc)
            norm = Normaliser()
            try:
                evaluation = evaluator.evaluate(by_hook[case.hook], example_request(case, number), now=now)
                answer: Any = {"response": orjson.dumps(evaluation.response).decode(),
                               "decisions": list(evaluation.decisions),
                               "suggestions": [i.suggestions for i in evaluation.issued]}
            except ApiError as exc:
                answer = {"error": exc.status, "body": exc.body()}
            yield norm.value({"example": f"{policy.id}:{number}:{case.name}", **answer})


def records() -> Iterator[dict[str, Any]]:
    yield from app_records()
    yield from example_records()


def line(record: dict[str, Any]) -> str:
    return json.dumps(record, sort_keys=True)


def name(record: dict[str, Any]) -> str:
    return str(record.get("call") or record.get("example"))


def digests() -> dict[str, str]:
    """Each call's name → the SHA-256 of its normalised record."""
    found: dict[str, str] = {}
    for record in records():
        assert name(record) not in found, f"two calls named {name(record)}"
        found[name(record)] = hashlib.sha256(line(record).encode()).hexdigest()
    return found


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    if "--full" in sys.argv:
        for record in records():
            sys.stdout.write(line(record) + "\n")
    else:
        sys.stdout.write(json.dumps(digests(), indent=1) + "\n")
