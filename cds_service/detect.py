"""Is this order a sacroplasty? Rules come from cards/<policy>/detection.json.

Works on the raw JSON of a ServiceRequest (dicts and lists as the client sent them), so that imperfect FHIR
never raises: anything of the wrong shape is simply not evidence.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable

from .policy import Policy


@dataclass(frozen=True)
class Match:
    """Why an order was judged a sacroplasty."""

    rule: str  # "code", "text" or "vertebral-augmentation-site"
    evidence: str  # the code (system|code) or the pattern that matched; never patient data
    laterality: str | None = None


def _dicts(value: Any) -> list[dict[str, Any]]:
    """A FHIR list as sent: a list, or (from imperfect clients) a single object."""
    if isinstance(value, dict):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, dict)]
    return []


def _codings(concept: Any) -> list[dict[str, Any]]:
    return [c for concept_ in _dicts(concept) for c in _dicts(concept_.get("coding"))]


def _texts(concept: Any) -> Iterable[str]:
    for concept_ in _dicts(concept):
        if isinstance(concept_.get("text"), str):
            yield concept_["text"]
        for coding in _dicts(concept_.get("coding")):
            if isinstance(coding.get("display"), str):
                yield coding["display"]


def _compile(patterns: Iterable[str]) -> re.Pattern[str] | None:
    patterns = list(patterns)
    return re.compile("|".join(f"(?:{p})" for p in patterns), re.IGNORECASE) if patterns else None


class Detector:
    """Compiled detection rules of one policy. Build once; `match` is cheap and never raises."""

    def __init__(self, policy: Policy) -> None:
        data = policy.detection
        self._aliases: dict[str, str] = dict(data.get("system_aliases", {}))
        self._codes = {
            (c["system"], c["code"].upper()): c.get("laterality") for c in data.get("codes", [])
        }
        self._text = _compile(data.get("text_patterns", []))
        va = data.get("vertebral_augmentation", {})
        self._va_codes = {(c["system"], c["code"].upper()) for c in va.get("codes", [])}
        self._va_text = _compile(va.get("text_patterns", []))
        self._sacral_text = _compile(va.get("sacral_site_patterns", []))
        self._sacral_codes = {(c["system"], c["code"].upper()) for c in va.get("sacral_site_codes", [])}
        self._bilateral = re.compile(r"\bbilateral\b", re.IGNORECASE)
        # Most orders are not sacroplasties: one that has none of these strings in its texts (and no code of
        # the policy, nor a sacral bodySite code) cannot match any pattern, so the patterns are not run.
        self._screen = tuple(s.casefold() for s in data.get("screen", []))

    def _key(self, coding: dict[str, Any]) -> tuple[str, str] | None:
        system, code = coding.get("system"), coding.get("code")
        if not isinstance(system, str) or not isinstance(code, str):
            return None
        return self._aliases.get(system, system), code.strip().upper()

    def match(self, order: dict[str, Any]) -> Match | None:
        """Judge one ServiceRequest (raw JSON). None when it is not a sacroplasty."""
        code = order.get("code")
        keys: list[tuple[str, str]] = []
        texts: list[str] = []  # as _texts(code) gives them, gathered in the same pass as the codes
        for concept in _dicts(code):
            if isinstance(concept.get("text"), str):
                texts.append(concept["text"])
            for coding in _dicts(concept.get("coding")):
                key = self._key(coding)
                if key is not None:
                    if key in self._codes:  # a code of the policy decides at once
                        return Match("code", "|".join(key), self._codes[key])
                    keys.append(key)
                if isinstance(coding.get("display"), str):
                    texts.append(coding["display"])
        site = order.get("bodySite")
        site_texts = list(_texts(site)) if site is not None else []
        if self._screen and not self._passes_screen(keys, texts, site_texts, order):
            return None
        if any(key in self._va_codes for key in keys) or any(self._va_text and self._va_text.search(t) for t in texts):
            if self._is_sacral(order, texts, site_texts):
                va = next(("|".join(k) for k in keys if k in self._va_codes), "text")
                return Match("vertebral-augmentation-site", va, self._laterality(texts))
        if self._text:
            for text in texts:
                found = self._text.search(text)
                if found:
                    return Match("text", found.group(0).lower(), self._laterality(texts))
        return None

    def _passes_screen(self, keys: list[tuple[str, str]], texts: list[str], site_texts: list[str],
                       order: dict[str, Any]) -> bool:
        if any(key in self._va_codes for key in keys):
            return True
        folded = "\n".join(texts + site_texts).casefold()  # casefold: as re.IGNORECASE compares
        if any(s in folded for s in self._screen):
            return True
        return self._has_sacral_site_code(order)

    def _has_sacral_site_code(self, order: dict[str, Any]) -> bool:
        return any(self._key(coding) in self._sacral_codes for coding in _codings(order.get("bodySite")))

    def _is_sacral(self, order: dict[str, Any], texts: list[str], site_texts: list[str]) -> bool:
        if self._has_sacral_site_code(order):
            return True
        # The code's own display ("lumbosacral") is not a site; the clinician's text and the bodySite are.
        code = order.get("code")
        own_text = [code["text"]] if isinstance(code, dict) and isinstance(code.get("text"), str) else []
        return bool(self._sacral_text) and any(self._sacral_text.search(t) for t in own_text + site_texts)

    def _laterality(self, texts: list[str]) -> str | None:
        return "bilateral" if any(self._bilateral.search(t) for t in texts) else None
