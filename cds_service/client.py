"""`cds-service call` and `cds-service keys` (issue #8 fills this in)."""

from __future__ import annotations

import argparse


def configure_call_parser(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(func=lambda args: 1)


def configure_keys_parser(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(func=lambda args: 1)
