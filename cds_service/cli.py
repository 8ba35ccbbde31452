"""`cds-service` command line: serve, evaluate, check-policy, report, audit, call, keys."""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import orjson

from cds_service.config import Settings


def _write_queued_records(_server: Any, worker: Any) -> None:
    """gunicorn's worker_exit hook: card records still queued in this worker are written before it goes."""
    app = getattr(worker, "wsgi", None)
    store = app.extensions.get("cds_store") if app is not None else None
    if store is not None:
        store.close()
    from cds_service import metrics

    metrics.stopped_cleanly()


def _worker_gone(_server: Any, worker: Any) -> None:
    """gunicorn's child_exit hook, in the master: count and log what a worker left unwritten (cds_service.metrics:
    nothing after a clean stop; after SIGKILL, its calls in flight and queued card records)."""
    from cds_service import metrics

    metrics.worker_exited(worker.pid)


def _serve(args: argparse.Namespace) -> int:
    from gunicorn.app.base import BaseApplication

    from cds_service.serving.metricsdir import prepare_multiprocess_dir, remove_multiprocess_dir

    prepare_multiprocess_dir()  # before prometheus_client is imported: every worker's metrics in one scrape
    from cds_service import create_app
    from cds_service.pipeline import evaluate  # noqa: F401  (imported before the fork: workers share the pages)
    from cds_service.serving.logs import gunicorn_logger_class
    from cds_service.serving.server import GranianWorker

    if args.dev:
        os.environ["CDS_DEV"] = "1"
    settings = Settings.from_env()
    problem = settings.production_problem()
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    from cds_service.serving.logs import FORMATS

    if settings.log_format not in FORMATS:
        print(f"error: CDS_LOG_FORMAT must be one of {', '.join(FORMATS)}, not {settings.log_format!r}",
              file=sys.stderr)
        return 2
    if not settings.dev and settings.clients_file:
        from cds_service.auth.tokens import ClientsFileError, load_clients

        try:
            load_clients(settings.clients_file)
        except ClientsFileError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2

    from cds_service.pipeline.policy import PolicyError, load_catalogue

    try:  # before any worker starts: a malformed pack stops the service with one line naming file and field
        load_catalogue(settings.cards_dir)
    except PolicyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    GranianWorker.max_body_bytes = settings.max_body_bytes
    GranianWorker.request_read_seconds = settings.request_read_seconds

    class Server(BaseApplication):  # gunicorn's documented way to embed it
        def load_config(self) -> None:
            self.cfg.set("bind", f"{args.host}:{args.port}")
            self.cfg.set("workers", args.workers)
            # Each worker serves with granian, reading whole requests before a thread sees them: a slow
            # client never holds a thread (see serving/server.py).
            self.cfg.set("worker_class", "cds_service.serving.server.GranianWorker")
            self.cfg.set("threads", args.threads)
            self.cfg.set("timeout", 30)
            if "control_socket_disable" in self.cfg.settings:
                # gunicorn 25.1+ opens a control socket (~/.gunicorn/gunicorn.ctl) by default, and the
                # instance started last takes it over: this service has no use for it.
                self.cfg.set("control_socket_disable", True)
            self.cfg.set("accesslog", None)
            self.cfg.set("errorlog", "-")
            self.cfg.set("loglevel", "info")
            self.cfg.set("worker_exit", _write_queued_records)
            self.cfg.set("child_exit", _worker_gone)
            self.cfg.set("on_exit", lambda _server: remove_multiprocess_dir())
            self.cfg.set("logger_class", gunicorn_logger_class(settings.log_format))
            # Worker recycling: a worker stops gracefully after about this many requests (0: never).
            self.cfg.set("max_requests", args.max_requests)
            self.cfg.set("max_requests_jitter", args.max_requests_jitter)

        def load(self) -> Any:
            app = create_app(settings)
            # The app's long-lived objects (FHIR models, policy data) never become garbage: keep them out of
            # the collector's full scans, which would otherwise walk them on every hook call's allocations.
            gc.freeze()
            return app

    if settings.dev:
        logging.getLogger("cds_service").warning(
            "DEV MODE: starting WITHOUT client authentication on %s:%s", args.host, args.port)
    try:
        Server().run()
    finally:
        remove_multiprocess_dir()
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from cds_service.errors import ApiError
    from cds_service.pipeline.evaluate import Evaluator
    from cds_service.pipeline.policy import PolicyError, load_catalogue

    try:
        with open(args.file, "rb") as handle:
            body = orjson.loads(handle.read())  # as the HTTP API reads it
    except (OSError, ValueError) as exc:
        print(f"error: cannot read {args.file}: {exc}", file=sys.stderr)
        return 2
    settings = Settings.from_env()
    try:
        evaluator = Evaluator(load_catalogue(settings.cards_dir), settings.max_draft_orders, settings.public_url)
    except PolicyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    hook = body.get("hook") if isinstance(body, dict) else None
    service = next((s for s in evaluator.services.values() if s.hook == hook), None)
    if service is None:
        print(f"error: {args.file}: 'hook' must be one of "
              + ", ".join(s.hook for s in evaluator.services.values()), file=sys.stderr)
        return 2
    try:
        response = evaluator.evaluate(service, body).response
    except ApiError as exc:
        where = f" ({exc.field})" if exc.field else ""
        print(f"error: {args.file}: {exc.message}{where}", file=sys.stderr)
        return 2
    print(json.dumps(response, indent=2))
    return 0


# --- check-policy -------------------------------------------------------------------------------------------------

def _run_examples(folder: Any, policy: Any, services: tuple[Any, ...], crd_config: dict[str, Any]) \
        -> tuple[int, int]:
    """Run `folder`/examples.json with this pack alone; print one line per case. Returns (passed, failed);
    raises PolicyError for a malformed table."""
    from cds_service.pipeline.examples import run_examples

    path = folder / "examples.json"
    if not path.is_file():
        print(f"  no examples.json: {policy.id} is validated, but no example proves what it answers")
        return 0, 0
    results = run_examples(path, policy, services, crd_config)
    for result in results:
        if result.problem is None:
            print(f"  PASS  {result.name} — {result.why}")
        else:
            print(f"  FAIL  {result.name}: {result.problem} — {result.why}")
    failed = sum(1 for r in results if r.problem is not None)
    return len(results) - failed, failed


def _check_policy(args: argparse.Namespace) -> int:
    """Validate one pack or every pack of a cards/ folder, then run each pack's example table."""
    from pathlib import Path

    from cds_service.pipeline import schema
    from cds_service.pipeline.policy import PolicyError, ServiceConfig, load_policy

    root = Path(args.dir) if args.dir else Settings.from_env().cards_dir
    if (root / "policy.json").is_file():
        folders, services_file = [root], None
    elif root.is_dir():
        folders, services_file = sorted(p.parent for p in root.glob("*/policy.json")), root / "services.json"
    else:
        print(f"error: {root}: no such folder", file=sys.stderr)
        return 2
    if not folders:
        print(f"error: {root}: no policy pack (a folder holding a policy.json)", file=sys.stderr)
        return 2
    malformed = bad_packs = passed = failed = 0
    services: tuple[ServiceConfig, ...] = tuple(ServiceConfig(h, f"check-{h}", h, h) for h in schema.HOOKS)
    crd_config: dict[str, Any] = {"versions": ["2.2"], "options": []}
    if services_file is not None:
        try:
            meta = schema.validate_services(services_file) if services_file.is_file() else None
            if meta is None:
                raise PolicyError(f"{services_file}: missing file (it names the CDS services)")
            services = tuple(ServiceConfig(s.hook, s.id, s.title, s.description) for s in meta.services)
            crd_config = {"versions": list(meta.crd.versions), "options": [o.model_dump() for o in meta.crd.options]}
            print(f"{services_file}: valid")
        except PolicyError as exc:
            malformed += 1
            for problem in exc.problems:
                print(f"MALFORMED  {problem}")
    ids: dict[str, Path] = {}
    for folder in folders:
        try:
            policy = load_policy(folder)
        except PolicyError as exc:
            malformed, bad_packs = malformed + 1, bad_packs + 1
            for problem in exc.problems:
                print(f"MALFORMED  {problem}")
            continue
        if policy.id in ids:
            malformed, bad_packs = malformed + 1, bad_packs + 1
            print(f"MALFORMED  {folder / 'policy.json'}: id: {policy.id!r} is also the id of {ids[policy.id]}")
            continue
        ids[policy.id] = folder
        print(f"{folder}: {policy.label} version {policy.version} is valid")
        try:
            ok, bad = _run_examples(folder, policy, services, crd_config)
        except PolicyError as exc:
            malformed, bad_packs = malformed + 1, bad_packs + 1
            for problem in exc.problems:
                print(f"MALFORMED  {problem}")
            continue
        passed, failed = passed + ok, failed + bad
    print(f"summary: {len(folders) - bad_packs} of {len(folders)} pack(s) valid"
          f"{'' if services_file is None or malformed == bad_packs else ', services.json malformed'}; "
          f"examples: {passed} passed, {failed} failed")
    return 2 if malformed else 1 if failed else 0


def _since(value: str) -> datetime:
    from cds_service.report.render import parse_since

    try:
        return parse_since(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _report(args: argparse.Namespace) -> int:
    from cds_service.report.render import write_report

    return write_report(args.since, args.format, args.output)


def _audit(args: argparse.Namespace) -> int:
    """Print the invocation log rows asked for, one JSON object a line (oldest first)."""
    from cds_service.storage.store import Store, StoreUnavailable

    store = Store(Settings.from_env().database_url)
    try:
        rows = store.invocations(hook_instance=args.hook_instance, since=args.since, limit=args.limit)
    except StoreUnavailable as exc:
        print(f"error: the database cannot be read: {exc}", file=sys.stderr)
        return 1
    finally:
        store.engine.dispose()
    for row in rows:
        sys.stdout.write(json.dumps(row, default=lambda v: v.isoformat() if isinstance(v, datetime) else str(v),
                                    ensure_ascii=False) + "\n")
    if not rows:
        print("no invocation found", file=sys.stderr)
    return 0


def _call(args: argparse.Namespace) -> int:
    from cds_service.tools.call import call

    return call(args.url, args.file, key=args.key, iss=args.iss, kid=args.kid, alg=args.alg,
                json_output=args.json, timeout=args.timeout)


def _keys(args: argparse.Namespace) -> int:
    from cds_service.tools.call import keys

    return keys(args.alg, args.kid, args.out)


def build_parser() -> argparse.ArgumentParser:
    from cds_service.auth.keysets import ALGORITHMS
    from cds_service.report.render import FORMATS
    from cds_service.tools.call import DEFAULT_KEY_FILE

    parser = argparse.ArgumentParser(prog="cds-service", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the service (gunicorn workers serving with granian)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--workers", type=int, default=2)
    serve.add_argument("--threads", type=int, default=4, help="threads per worker (default 4)")
    serve.add_argument("--max-requests", type=int, default=0, metavar="N",
                       help="restart each worker gracefully after about N requests (default 0: never)")
    serve.add_argument("--max-requests-jitter", type=int, default=0, metavar="N",
                       help="add up to N at random to --max-requests, so workers do not restart together")
    serve.add_argument("--dev", action="store_true",
                       help="local, trusted set-up: no client authentication (also CDS_DEV=1)")
    serve.set_defaults(func=_serve)

    evaluate = commands.add_parser("evaluate", help="print the response the service would give to a hook request")
    evaluate.add_argument("file")
    evaluate.set_defaults(func=_evaluate)

    check = commands.add_parser(
        "check-policy", help="validate policy packs and run their example tables (exit 0 good, 1 an example "
                             "failed, 2 a pack is malformed)")
    check.add_argument("dir", nargs="?", default=None,
                       help="a pack folder or a cards/ folder (default: the configured cards folder, CDS_CARDS_DIR)")
    check.set_defaults(func=_check_policy)

    report = commands.add_parser(
        "report", help="how clinicians answered the cards",
        description="How clinicians answered the cards: cards issued, feedback, acceptance and override rates, "
                    "alternatives chosen, override reasons, per policy version. Reads the database named by "
                    "CDS_DATABASE_URL.")
    report.add_argument("--since", type=_since, metavar="DATE",
                        help="only cards issued and feedback given from this UTC date (YYYY-MM-DD) on")
    report.add_argument("--format", choices=FORMATS, default="table",
                        help="table (default), csv, json, or html (one self-contained page with charts)")
    report.add_argument("--output", metavar="FILE", help="write to FILE instead of standard output")
    report.set_defaults(func=_report)

    audit = commands.add_parser(
        "audit", help="look up the CRD invocation log",
        description="The CRD invocation log (one row per hook call: hookInstance, hook, service, client, times, "
                    "status, coverage decisions, the response as sent), one JSON object a line. For authorised "
                    "staff: it reads the database named by CDS_DATABASE_URL, and responses hold patient data.")
    audit.add_argument("--hook-instance", metavar="ID", help="only the call(s) with this hookInstance")
    audit.add_argument("--since", type=_since, metavar="DATE", help="only calls received from this UTC date on")
    audit.add_argument("--limit", type=int, default=1000, help="at most this many rows (default 1000)")
    audit.set_defaults(func=_audit)

    call = commands.add_parser(
        "call", help="fire a hook request at a CDS service",
        description="POST a CDS Hooks request file to a CDS service endpoint, print the cards and the latency, "
                    "and check the response against CDS Hooks 2.0 (exit 1 when it does not conform).")
    call.add_argument("url", metavar="URL", help="the service endpoint, e.g. https://host/cds-services/<id>")
    call.add_argument("file", metavar="FILE", help="a JSON hook request file (e.g. one of fixtures/)")
    call.add_argument("--key", metavar="PEM", help="sign a fresh JWT with this private key (EC P-384 or RSA)")
    call.add_argument("--iss", help="the JWT issuer (the client id the service has registered); needs --key")
    call.add_argument("--kid", help="the key id in the JWT header (default: the key's RFC 7638 thumbprint)")
    call.add_argument("--alg", choices=ALGORITHMS, help="check the key signs with this algorithm")
    call.add_argument("--json", action="store_true", help="print the raw response body instead of the cards")
    call.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the answer (default 30)")
    call.set_defaults(func=_call)

    keys = commands.add_parser(
        "keys", help="make a key pair and print its JWKS",
        description="Make a key pair for signing CDS Hooks calls: writes the private key (PEM) and prints the "
                    "public JWKS to register with the CDS service.")
    keys.add_argument("--alg", choices=ALGORITHMS, default="ES384", help="ES384 (default) or RS384")
    keys.add_argument("--kid", help="key id (default: the key's RFC 7638 thumbprint)")
    keys.add_argument("--out", metavar="PEM", default=DEFAULT_KEY_FILE,
                      help=f"where to write the private key (default {DEFAULT_KEY_FILE}; never overwritten)")
    keys.set_defaults(func=_keys)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from cds_service.serving.logs import configure

    configure()
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
