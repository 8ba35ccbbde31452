"""`cds-service` command line: serve, evaluate, report, call, keys."""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
from typing import Any, Sequence

import orjson

from cds_service.config import Settings


def _write_queued_records(_server: Any, worker: Any) -> None:
    """gunicorn's worker_exit hook: card records still queued in this worker are written before it goes."""
    app = getattr(worker, "wsgi", None)
    store = app.extensions.get("cds_store") if app is not None else None
    if store is not None:
        store.close()


def _serve(args: argparse.Namespace) -> int:
    from gunicorn.app.base import BaseApplication

    from cds_service import create_app
    from cds_service.pipeline import evaluate  # noqa: F401  (imported before the fork: workers share the pages)
    from cds_service.serving.server import WaitressWorker

    if args.dev:
        os.environ["CDS_DEV"] = "1"
    settings = Settings.from_env()
    problem = settings.production_problem()
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if not settings.dev and settings.clients_file:
        from cds_service.auth.tokens import ClientsFileError, load_clients

        try:
            load_clients(settings.clients_file)
        except ClientsFileError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2

    WaitressWorker.max_body_bytes = settings.max_body_bytes
    WaitressWorker.request_read_seconds = settings.request_read_seconds

    class Server(BaseApplication):  # gunicorn's documented way to embed it
        def load_config(self) -> None:
            self.cfg.set("bind", f"{args.host}:{args.port}")
            self.cfg.set("workers", args.workers)
            # Each worker serves with waitress, which reads whole requests before a thread sees them: a
            # slow client never holds a thread (see serving.py).
            self.cfg.set("worker_class", "cds_service.serving.server.WaitressWorker")
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

        def load(self) -> Any:
            app = create_app(settings)
            # The app's long-lived objects (FHIR models, policy data) never become garbage: keep them out of
            # the collector's full scans, which would otherwise walk them on every hook call's allocations.
            gc.freeze()
            return app

    if settings.dev:
        logging.getLogger("cds_service").warning(
            "DEV MODE: starting WITHOUT client authentication on %s:%s", args.host, args.port)
    Server().run()
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from cds_service.errors import ApiError
    from cds_service.pipeline.evaluate import Evaluator
    from cds_service.pipeline.policy import load_catalogue

    try:
        with open(args.file, "rb") as handle:
            body = orjson.loads(handle.read())  # as the HTTP API reads it
    except (OSError, ValueError) as exc:
        print(f"error: cannot read {args.file}: {exc}", file=sys.stderr)
        return 2
    settings = Settings.from_env()
    evaluator = Evaluator(load_catalogue(settings.cards_dir), settings.max_draft_orders, settings.public_url)
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


def build_parser() -> argparse.ArgumentParser:
    from cds_service.tools import call as client
    from cds_service.report import render as report

    parser = argparse.ArgumentParser(prog="cds-service", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the service (gunicorn workers serving with waitress)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--workers", type=int, default=2)
    serve.add_argument("--threads", type=int, default=4, help="threads per worker (default 4)")
    serve.add_argument("--dev", action="store_true",
                       help="local, trusted set-up: no client authentication (also CDS_DEV=1)")
    serve.set_defaults(func=_serve)

    evaluate = commands.add_parser("evaluate", help="print the response the service would give to a hook request")
    evaluate.add_argument("file")
    evaluate.set_defaults(func=_evaluate)

    report.configure_parser(commands.add_parser("report", help="how clinicians answered the cards"))
    client.configure_call_parser(commands.add_parser("call", help="fire a hook request at a CDS service"))
    client.configure_keys_parser(commands.add_parser("keys", help="make a key pair and print its JWKS"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from cds_service.serving.logs import configure

    configure()
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
