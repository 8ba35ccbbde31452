"""Prometheus metrics: the metric objects, the per-run multiprocess directory, and what a dead worker lost.

Under `cds-service serve` gunicorn runs several worker processes; prometheus-client's multiprocess mode has
each process write its values to memory-mapped files in one directory (PROMETHEUS_MULTIPROC_DIR) and merges
them when /metrics is scraped, so one scrape shows every worker's counts. The master makes that directory
at start (a fresh temporary one, or empties the one the operator named) and removes the one it made at exit.
The environment variable is set by `serve` (cli.py) through cds_service.serving.metricsdir, which also moves
the metrics made before it was set to multiprocess values.

Labels are bounded sets only: service ids and hook names of the loaded packs, HTTP status codes, pack ids and
versions, fixed outcome words. Never patient data, never a client's free text.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

log = logging.getLogger(__name__)

ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

HOOK_CALLS = Counter("cds_hook_calls_total", "Hook calls answered, by service, hook and HTTP status",
                     ["service", "hook", "status"])
HOOK_SECONDS = Histogram("cds_hook_duration_seconds", "Time to answer a hook call, by service", ["service"],
                         buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0))
CARDS = Counter("cds_cards_issued_total", "Cards issued, by policy pack and version", ["pack", "version"])
COVERAGE = Counter("cds_coverage_decisions_total", "Coverage-information actions returned, by covered value",
                   ["covered"])
FEEDBACK = Counter("cds_feedback_total", "Feedback entries received in accepted calls, by outcome", ["outcome"])
FHIR_FETCHES = Counter("cds_fhir_fetches_total", "FHIR prefetch queries, by outcome "
                       "(ok, timeout, refused_origin, error)", ["outcome"])
AUTH_REFUSALS = Counter("cds_auth_refusals_total", "Hook and feedback calls refused by authentication, by reason "
                        "category", ["reason"])
IN_PROGRESS = Gauge("cds_requests_in_progress", "Requests being answered", multiprocess_mode="livesum")
WRITER_DEPTH = Gauge("cds_writer_queue_depth", "Card records (and token ids) waiting for the database writer",
                     multiprocess_mode="livesum")
RECORDS_DROPPED = Counter("cds_records_dropped_total", "Card records not stored, by reason (invalid: the database "
                          "can never hold it; overflow: dropped while the database was down)", ["reason"])
DB_ERRORS = Counter("cds_database_errors_total", "Database writer batches that failed or were put off")
STOPPED_CLEANLY = Gauge("cds_worker_stopped_cleanly", "1 once a worker has flushed its writer at a graceful stop",
                        multiprocess_mode="livesum")
WORKERS_DIED = Counter("cds_workers_died_total", "Workers that exited without a clean stop (killed, crashed)")
WORKER_LOSSES = Counter("cds_worker_lost_total", "What workers that died without a clean stop lost: calls in "
                        "flight and card records not yet written", ["what"])

FEEDBACK_OUTCOMES = frozenset({"accepted", "overridden"})
COVERED_VALUES = frozenset({"covered", "not-covered", "conditional"})
FETCH_OUTCOMES = frozenset({"ok", "timeout", "refused_origin", "error"})


def remake_unlabelled() -> None:
    """Give the unlabelled metrics new values of prometheus-client's current value class (serving/metricsdir)."""
    for metric in (IN_PROGRESS, WRITER_DEPTH, DB_ERRORS, STOPPED_CLEANLY, WORKERS_DIED):
        metric._metric_init()


def multiprocess() -> bool:
    return bool(os.environ.get(ENV))


# --- a dead worker's losses, in the gunicorn master ---------------------------------------------------------

def _live_value(path: str, metric: str) -> float:
    """The value of `metric` in one dead process's gauge file (0 when absent)."""
    from prometheus_client.mmap_dict import MmapedDict

    if not os.path.exists(path):
        return 0.0
    total = 0.0
    for key, value, _timestamp, _pos in MmapedDict.read_all_values_from_file(path):
        if json.loads(key)[0] == metric:
            total += value
    return total


def stopped_cleanly() -> None:
    """gunicorn's worker_exit, in the worker, after its writer is flushed: tells the master the stop was clean."""
    STOPPED_CLEANLY.set(1)


def worker_exited(pid: int) -> tuple[bool, int, int]:
    """gunicorn's child_exit, in the master: whether the worker `pid` stopped cleanly, and what it left
    unfinished (calls its application was answering, card records not yet written), read from its gauge file.
    An unclean exit (SIGKILL, a crash) is counted and logged with its losses; then its live gauges retire."""
    path = os.environ.get(ENV)
    if not path:
        return True, 0, 0
    from prometheus_client import multiprocess as mp

    gauge_file = os.path.join(path, f"gauge_livesum_{pid}.db")
    clean = _live_value(gauge_file, STOPPED_CLEANLY._name) >= 1
    calls = int(_live_value(gauge_file, IN_PROGRESS._name))
    records = int(_live_value(gauge_file, WRITER_DEPTH._name))
    if not clean or calls or records:
        WORKER_LOSSES.labels("calls").inc(calls)
        WORKER_LOSSES.labels("records").inc(records)
    if not clean:
        WORKERS_DIED.inc()
        log.error("worker %d exited without a clean stop: lost %d call(s) in flight and %d card record(s) not "
                  "yet written", pid, calls, records)
    elif calls or records:
        log.error("worker %d stopped with %d call(s) in flight and %d card record(s) not written", pid, calls,
                  records)
    mp.mark_process_dead(pid, path)
    return clean, calls, records


# --- the scrape ---------------------------------------------------------------------------------------------

def render() -> bytes:
    """The text exposition of every process's metrics (one process's outside gunicorn)."""
    from prometheus_client import REGISTRY, generate_latest

    if multiprocess():
        from prometheus_client import multiprocess as mp

        registry = CollectorRegistry()
        mp.MultiProcessCollector(registry)
        return generate_latest(registry)
    return generate_latest(REGISTRY)


# --- helpers the request path calls -------------------------------------------------------------------------

def fetch_outcome(reason: str | None) -> str:
    """A FHIR fetch failure's category from its reason text (fhir.py)."""
    if reason is None:
        return "ok"
    text = reason.lower()
    return "timeout" if ("timed out" in text or "budget" in text) else "error"


def auth_reason(reason: str | None) -> str:
    """A refusal's category: tokens.py's short reason words; `unreadable:<Type>` counted as unreadable."""
    return (reason or "no_token").split(":", 1)[0][:40]


def coverage_values(response: dict[str, Any]) -> list[str]:
    """The `covered` codes of the coverage-information extensions in a hook response's systemActions."""
    found: list[str] = []
    for action in response.get("systemActions") or ():
        resource = action.get("resource") if isinstance(action, dict) else None
        for ext in (resource or {}).get("extension") or ():
            if not isinstance(ext, dict) or not str(ext.get("url", "")).endswith("coverage-information"):
                continue
            for sub in ext.get("extension") or ():
                if isinstance(sub, dict) and sub.get("url") == "covered":
                    value = sub.get("valueCode")
                    found.append(value if value in COVERED_VALUES else "other")
    return found
