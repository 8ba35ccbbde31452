"""Trusting CDS clients (CDS Hooks 2.0): the trusted-clients file (`clients`), their key sets (`keysets`),
and the JWT checks of every hook and feedback call (`tokens`).

The names below are loaded on first use, so a tool that needs only `keysets` (the call tool's algorithm
list) does not import the database layer that `tokens` needs for replay checks.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cds_service.auth.clients import ClientsFileError, TrustedClient, load_clients
    from cds_service.auth.keysets import ALGORITHMS, KeySetCache, KeySetError
    from cds_service.auth.tokens import Authenticator, Client

_EXPORTS = {
    "ClientsFileError": "clients", "TrustedClient": "clients", "load_clients": "clients",
    "ALGORITHMS": "keysets", "KeySetCache": "keysets", "KeySetError": "keysets",
    "Authenticator": "tokens", "Client": "tokens",
}
__all__ = ["ALGORITHMS", "Authenticator", "Client", "ClientsFileError", "KeySetCache", "KeySetError",
           "TrustedClient", "load_clients"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
