"""Settings, read from environment variables with defaults that work on a fresh machine."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

PACKAGE_DIR = Path(__file__).resolve().parent


def _default_cards_dir() -> Path:
    # An installed wheel carries cards/ inside the package; a source checkout has it at the top.
    bundled = PACKAGE_DIR / "_cards"
    return bundled if bundled.is_dir() else PACKAGE_DIR.parent / "cards"


def _default_fixtures_dir() -> Path:
    bundled = PACKAGE_DIR / "_fixtures"
    return bundled if bundled.is_dir() else PACKAGE_DIR.parent / "fixtures"


def _flag(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def _origins(value: str | None) -> tuple[str, ...]:
    return tuple(o.strip().rstrip("/") for o in (value or "").split(",") if o.strip())


class ConfigError(ValueError):
    """Settings the service refuses to start with; the message says what to set."""


@dataclass(frozen=True)
class Settings:
    """Everything the service can be configured with. See README.md, "Configuration"."""

    dev: bool = False
    clients_file: str | None = None
    public_url: str | None = None
    database_url: str = "sqlite:///" + str(Path.cwd() / "cds-service.sqlite3")
    fhir_allowed_origins: tuple[str, ...] = ()
    fhir_timeout: float = 0.8
    cors_origins: tuple[str, ...] | str = "*"
    max_body_bytes: int = 2 * 1024 * 1024
    request_read_seconds: float = 30.0
    max_draft_orders: int = 200
    max_json_depth: int = 64
    cards_dir: Path = field(default_factory=_default_cards_dir)
    fixtures_dir: Path = field(default_factory=_default_fixtures_dir)
    log_level: str = "INFO"
    audit_retention_days: int = 2555  # CDS_AUDIT_RETENTION_DAYS (about 7 years): older invocation log rows pruned
    # Operations (docs/operations.md): /metrics off unless asked for; the readiness thresholds; log format.
    metrics: bool = False
    metrics_token: str | None = None
    log_format: str = "text"
    ready_db_seconds: float = 1.0
    ready_max_queue: int = 5000

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        defaults = cls()
        cors = env.get("CDS_CORS_ORIGINS", "*").strip()
        return cls(
            dev=_flag(env.get("CDS_DEV")),
            clients_file=env.get("CDS_CLIENTS_FILE") or None,
            public_url=(env.get("CDS_PUBLIC_URL") or "").rstrip("/") or None,
            database_url=env.get("CDS_DATABASE_URL") or defaults.database_url,
            fhir_allowed_origins=_origins(env.get("CDS_FHIR_ALLOWED_ORIGINS")),
            fhir_timeout=float(env.get("CDS_FHIR_TIMEOUT") or defaults.fhir_timeout),
            cors_origins="*" if cors in ("", "*") else _origins(cors),
            max_body_bytes=int(env.get("CDS_MAX_BODY_BYTES") or defaults.max_body_bytes),
            request_read_seconds=float(env.get("CDS_REQUEST_READ_SECONDS") or defaults.request_read_seconds),
            max_draft_orders=int(env.get("CDS_MAX_DRAFT_ORDERS") or defaults.max_draft_orders),
            max_json_depth=int(env.get("CDS_MAX_JSON_DEPTH") or defaults.max_json_depth),
            cards_dir=Path(env["CDS_CARDS_DIR"]) if env.get("CDS_CARDS_DIR") else defaults.cards_dir,
            fixtures_dir=Path(env["CDS_FIXTURES_DIR"]) if env.get("CDS_FIXTURES_DIR") else defaults.fixtures_dir,
            log_level=env.get("CDS_LOG_LEVEL") or defaults.log_level,
            audit_retention_days=int(env.get("CDS_AUDIT_RETENTION_DAYS") or defaults.audit_retention_days),
            metrics=_flag(env.get("CDS_METRICS")),
            metrics_token=env.get("CDS_METRICS_TOKEN") or None,
            log_format=(env.get("CDS_LOG_FORMAT") or defaults.log_format).strip().lower(),
            ready_db_seconds=float(env.get("CDS_READY_DB_SECONDS") or defaults.ready_db_seconds),
            ready_max_queue=int(env.get("CDS_READY_MAX_QUEUE") or defaults.ready_max_queue),
        )

    def production_problem(self) -> str | None:
        """Why these settings cannot serve in production mode, or None. Dev mode has no such demands.

        CDS_PUBLIC_URL is required: it is the audience every client token must name. Taken from each
        request's Host instead, a token minted for another service (another host) would be accepted when
        sent with that Host (issue 13, finding 9).
        """
        if self.dev:
            return None
        if not self.public_url:
            return ("CDS_PUBLIC_URL is not set: in production it must be the URL clients call this service at "
                    "(for example https://cds.example.org); client tokens must name it as their audience. "
                    "Set it, or run with --dev on a trusted machine")
        try:
            parts = urlsplit(self.public_url)
            host = parts.hostname
        except ValueError:
            host = None
        if parts.scheme not in ("http", "https") or not host or parts.query or parts.fragment:
            return f"CDS_PUBLIC_URL must be an http(s) URL such as https://cds.example.org, not {self.public_url!r}"
        return None

    def with_overrides(self, **changes: Any) -> Settings:
        return replace(self, **changes)
