"""The cost model of one hook call: every cap on what a call may carry, in one place, and the one-pass walk
that measures a JSON value against them.

A CDS service shares its workers with every clinician of the hospital, so one call's cost must be bounded
whatever its content. Each cap has a big margin over real EHR data (a real ServiceRequest has tens to a few
hundred JSON values, one to a few codings per concept, one payor per Coverage). Beyond a cap:
- draft orders (hooks.py): the call is refused, 413 naming the field (400 for an identifier too long to be one);
  orders are what the call is about, and judging a silently truncated order could miss the sacroplasty;
- prefetch and FHIR data (patient.py): that key is treated as unavailable and logged without patient data; the
  card then says what it could not check (never a card lost: unavailable coverage still gets a card);
- text the service echoes into a card (cards.py): cut to MAX_ECHOED_TEXT characters.

Each cap can be changed with the environment variable of the same name prefixed with CDS_ (read once at
start; a value that is not a positive integer stops the service from starting).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


def _cap(name: str, default: int, environ: Mapping[str, str] | None = None) -> int:
    raw = (os.environ if environ is None else environ).get(f"CDS_{name}", "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise ValueError(f"CDS_{name} must be a positive integer, not {raw[:20]!r}")
    return value


# -- draft orders (context.draftOrders): beyond a cap the call gets 413 naming the field --------------------
MAX_ORDER_ELEMENTS = _cap("MAX_ORDER_ELEMENTS", 2_000)  # JSON values (objects, arrays, scalars) per order
MAX_DRAFT_ELEMENTS = _cap("MAX_DRAFT_ELEMENTS", 20_000)  # JSON values over all orders of one call
MAX_CODINGS = _cap("MAX_CODINGS", 50)  # codings per CodeableConcept (an order's code and reasons; any in prefetch)
MAX_REASONS = _cap("MAX_REASONS", 50)  # entries of reasonCode, and of reasonReference
MAX_CONTAINED = _cap("MAX_CONTAINED", 50)  # contained resources per resource
MAX_STRING_LENGTH = _cap("MAX_STRING_LENGTH", 10_000)  # characters of any one string
# Bytes (as compact JSON) of the elements a card copies from the order into each created order (one per
# suggestion, eight of them): what keeps a reason's text from being multiplied into a huge answer.
MAX_COPIED_BYTES = _cap("MAX_COPIED_BYTES", 8_192)
# -- context ids: an id longer than this is malformed (400): FHIR ids have at most 64 characters -------------
MAX_ID_LENGTH = _cap("MAX_ID_LENGTH", 256)  # context.userId, patientId, encounterId
# -- prefetch and FHIR data, per key: beyond a cap the key is treated as unavailable -------------------------
MAX_BUNDLE_ENTRIES = _cap("MAX_BUNDLE_ENTRIES", 1_000)  # entries of one key's Bundle (Conditions considered)
MAX_PREFETCH_ELEMENTS = _cap("MAX_PREFETCH_ELEMENTS", 50_000)  # JSON values of one key's data
MAX_PAYORS = _cap("MAX_PAYORS", 50)  # payor references per Coverage
# -- applied by cards.py and evaluate.py ------------------------------------------------------------------------
# The order's name in the card detail and delete description: short, the card is read at the order.
MAX_ECHOED_TEXT = _cap("MAX_ECHOED_TEXT", 60)
MAX_SACROPLASTY_ORDERS = _cap("MAX_SACROPLASTY_ORDERS", 10)  # orders judged sacroplasty in one call (413 beyond)

# What cards.py copies from the draft into every created order (its CARRIED_OVER, plus reasonCode and intent);
# tests/test_cost.py checks that the two agree.
COPIED_ELEMENTS = ("subject", "encounter", "requester", "authoredOn", "priority", "insurance",
                   "reasonCode", "intent")

# The byte-level shortcuts that spare walking a small value (hooks.py, patient.py) only ever say "surely
# within the caps"; turned off, every value is walked exactly (tests measure the work of that, the worst case).
SHORTCUTS = True

# Arrays with a cap of their own, by key. Draft orders: the order's reasonCode, reasonReference and contained,
# the codings of its code and reasons (hooks.py).
ORDER_ARRAYS: dict[str, int] = {
    "coding": MAX_CODINGS,
    "reasonCode": MAX_REASONS,
    "reasonReference": MAX_REASONS,
    "contained": MAX_CONTAINED,
}
# Prefetch and FHIR data: wherever they occur.
PREFETCH_ARRAYS: dict[str, int] = {**ORDER_ARRAYS, "payor": MAX_PAYORS, "entry": MAX_BUNDLE_ENTRIES}


@dataclass(frozen=True)
class Excess:
    """The first cap a value goes beyond: which (`what`), where (a path below the value), by how much."""

    what: str  # "elements", "items" or "text"
    path: tuple[str | int, ...]
    size: int
    limit: int

    def field(self, prefix: str) -> str:
        """The path as a field name below `prefix`, e.g. prefix.reasonCode[0].coding (long keys shortened)."""
        out = prefix
        for step in self.path:
            out += f"[{step}]" if isinstance(step, int) else f".{step if len(step) <= 64 else step[:60] + '...'}"
        return out


def measure(value: Any, max_elements: int, arrays: Mapping[str, int],
            max_string: int = MAX_STRING_LENGTH) -> tuple[int, Excess | None]:
    """Count the JSON values of `value` in one pass, stopping at the first cap it goes beyond.

    Returns (values counted, None) or (values counted so far, the excess). Caps: `max_elements` values in all,
    the array caps of `arrays` by key, `max_string` characters per string (keys included). Linear in the
    values visited, and never visits more than `max_elements` + one container's length of them.
    """
    count = 1
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(value, ())]
    if isinstance(value, str) and len(value) > max_string:
        return count, Excess("text", (), len(value), max_string)
    while stack:
        node, path = stack.pop()
        if isinstance(node, dict):
            count += len(node)
            if count > max_elements:
                return count, Excess("elements", (), count, max_elements)
            for key, child in node.items():
                if isinstance(child, str):
                    if len(child) > max_string:
                        return count, Excess("text", (*path, key), len(child), max_string)
                elif isinstance(child, list):
                    limit = arrays.get(key)
                    if limit is not None and len(child) > limit:
                        return count, Excess("items", (*path, key), len(child), limit)
                    if child:
                        stack.append((child, (*path, key)))
                elif isinstance(child, dict):
                    if child:
                        stack.append((child, (*path, key)))
                if len(key) > max_string:
                    return count, Excess("text", path, len(key), max_string)
        elif isinstance(node, list):
            count += len(node)
            if count > max_elements:
                return count, Excess("elements", (), count, max_elements)
            for index, child in enumerate(node):
                if isinstance(child, str):
                    if len(child) > max_string:
                        return count, Excess("text", (*path, index), len(child), max_string)
                elif isinstance(child, (dict, list)) and child:
                    stack.append((child, (*path, index)))
    return count, None


def surely_within(raw: bytes, max_elements: int, arrays: Mapping[str, int]) -> bool:
    """True when the compact JSON `raw` cannot go beyond the caps: n bytes hold at most (n + 1) / 2 values and
    no string longer than n, and an array of more than k entries needs k commas. One C-speed pass, where
    `measure` walks in Python: the common small value is never walked. False means "measure it"."""
    return (SHORTCUTS and len(raw) <= min(2 * max_elements - 1, MAX_STRING_LENGTH)
            and (not arrays or raw.count(b",") < min(arrays.values())))


def describe(excess: Excess, field: str) -> str:
    """A message naming the field and the cap, with sizes only (never the content)."""
    if excess.what == "elements":
        return f"{field} has more than {excess.limit} JSON values; at most {excess.limit} are accepted"
    if excess.what == "items":
        return f"{field} has {excess.size} entries; at most {excess.limit} are accepted"
    return f"{field} holds a text of {excess.size} characters; at most {excess.limit} are accepted"
