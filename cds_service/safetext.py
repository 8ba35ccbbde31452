"""Text from outside (another service's cards, stored feedback) made safe for a terminal or a spreadsheet.

- `printable`: control characters (C0, DEL, C1), line and paragraph separators and bidirectional
  overrides shown as visible escapes (`\\u001b`), so no text can move the cursor, set the terminal's title,
  clear the screen, fake a line of output or reorder what is shown.
- `csv_cell`: a text cell a spreadsheet would run as a formula (it starts with = + - @ or a control
  character) gets a leading single quote, per OWASP "CSV Injection". Numbers are left as numbers.
"""

from __future__ import annotations

import re
from typing import Any

# Cc (C0 U+0000-001F, DEL U+007F, C1 U+0080-009F), Zl/Zp (U+2028, U+2029) and the bidirectional
# formatting characters (ALM, LRM, RLM, LRE..RLO, LRI..PDI).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_FORMULA_START = re.compile("[=+\\-@\x00-\x1f\x7f-\x9f]")


def _escape(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


def printable(text: str, keep: str = "") -> str:
    """`text` with every unsafe character written as a visible escape, except the characters in `keep`
    (e.g. "\\n" for a text that is meant to span lines). Plain text comes back unchanged."""
    if keep:
        return _UNSAFE.sub(lambda m: m.group() if m.group() in keep else _escape(m), text)
    return _UNSAFE.sub(_escape, text)


def csv_cell(value: Any) -> Any:
    """A CSV cell that no spreadsheet runs as a formula: text starting with = + - @ or a control character
    gets a leading single quote. Numbers (int, float) are data, not text, and are returned as they are."""
    if isinstance(value, str) and _FORMULA_START.match(value):
        return "'" + value
    return value
