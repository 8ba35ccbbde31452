"""The application factory: settings → store, evaluator, authenticator → a Flask app with every blueprint."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from flask import Flask
from flask_cors import CORS

from cds_service.config import ConfigError, Settings
from cds_service.web.jsonio import FastJSONProvider


def create_app(config: Settings | Mapping[str, Any] | None = None) -> Flask:
    """Application factory. `config` is a Settings, a mapping of Settings fields, or None (environment).

    Raises ConfigError for settings that cannot serve (production mode without CDS_PUBLIC_URL)."""
    if isinstance(config, Settings):
        settings = config
    else:
        settings = Settings.from_env().with_overrides(**dict(config or {}))

    problem = settings.production_problem()
    if problem:
        raise ConfigError(problem)

    from cds_service.auth.tokens import Authenticator
    from cds_service.fhir import FhirReader
    from cds_service.pipeline.evaluate import Evaluator
    from cds_service.pipeline.policy import load_catalogue
    from cds_service.storage.store import Store, StoreUnavailable
    from cds_service.web import api, ops, policy_page, viewer

    app = Flask(__name__, static_folder=None)
    app.config["CDS_SETTINGS"] = settings
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json = FastJSONProvider(app)  # compact, card fields in spec order

    logging.getLogger("cds_service").setLevel(settings.log_level)
    store = Store(settings.database_url)
    try:
        store.ensure_schema()
    except StoreUnavailable as exc:
        logging.getLogger(__name__).error("database unavailable at start (%s); will retry on use", exc)
    app.extensions["cds_store"] = store
    app.extensions["cds_evaluator"] = Evaluator(load_catalogue(settings.cards_dir), settings.max_draft_orders,
                                                settings.public_url, FhirReader.from_settings(settings))
    app.extensions["cds_auth"] = None if settings.dev else Authenticator(settings, store)
    if settings.dev:
        logging.getLogger(__name__).warning(
            "DEV MODE: hook and feedback calls are NOT authenticated. Use only on a trusted machine.")

    # always_send=False: a call without an Origin header (an EHR's server, not a browser) is not a CORS
    # request and gets no CORS headers, so the common hook call skips that work.
    CORS(app, origins=settings.cors_origins, allow_headers=["Authorization", "Content-Type"],
         methods=["GET", "POST", "OPTIONS"], max_age=600, always_send=False)
    api.register_errors(app)
    ops.register_request_id(app)  # before the request log, which logs the id
    api.register_request_log(app)
    app.register_blueprint(api.bp)
    app.register_blueprint(viewer.bp)
    app.register_blueprint(policy_page.bp)
    app.register_blueprint(ops.bp)  # /health, /ready, /metrics (docs/operations.md)
    return app
