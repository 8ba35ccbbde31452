"""Payer coverage CDS Hooks service: policy packs in cards/ (first: Sandhills Center CCP.1247, sacroplasty)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from flask import Flask


def create_app(config: Any = None) -> Flask:
    """The application factory (cds_service/web/app.py), importable as `cds_service.create_app`."""
    from cds_service.web.app import create_app as factory

    return factory(config)
