"""Checks a CDS service's response against the CDS Hooks 2.0 rules for cards, suggestions and actions."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from cds_service.safetext import printable

INDICATORS = ("info", "warning", "critical")
SELECTION_BEHAVIORS = ("at-most-one", "any")
ACTION_TYPES = ("create", "update", "delete")
LINK_TYPES = ("absolute", "smart")
SUMMARY_LIMIT = 140  # "<140-character summary"


@dataclass
class Conformance:
    """What is wrong (problems: breaks a SHALL/REQUIRED rule) and what is merely unwise (notes: SHOULD)."""

    problems: list[str] = field(default_factory=list)  # safe to print: control characters are escaped
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _is_text(value: Any) -> bool:
    return isinstance(value, str) and value.strip() != ""


def _is_absolute_url(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    parts = urlsplit(value)
    return bool(parts.scheme and (parts.netloc or parts.scheme not in ("http", "https")))


class _Checker:
    def __init__(self) -> None:
        self.result = Conformance()
        self.uuids: dict[str, str] = {}

    def problem(self, path: str, message: str) -> None:
        self.result.problems.append(printable(f"{path}: {message}"))  # a path holds the answer's own keys

    def note(self, path: str, message: str) -> None:
        self.result.notes.append(printable(f"{path}: {message}"))

    def no_empty(self, obj: dict[str, Any], path: str) -> None:
        """CDS Hooks 2.0 "Use of JSON": values SHALL NOT be null or empty; omit optional fields instead."""
        for key, value in obj.items():
            if value is None or value == "" or value == [] or value == {}:
                shown = "null" if value is None else json.dumps(value)
                self.problem(f"{path}.{key}", f"is {shown}; values must not be null or empty (omit optional ones)")

    def text(self, obj: dict[str, Any], key: str, path: str, required: bool) -> None:
        if key not in obj:
            if required:
                self.problem(f"{path}.{key}", "is required")
        elif obj[key] is not None and not isinstance(obj[key], str):  # null and "" are reported by no_empty
            self.problem(f"{path}.{key}", f"must be a string, not {type(obj[key]).__name__}")

    def one_of(self, obj: dict[str, Any], key: str, path: str, allowed: tuple[str, ...], required: bool) -> None:
        if key not in obj:
            if required:
                self.problem(f"{path}.{key}", f"is required (one of {', '.join(allowed)})")
        elif obj[key] not in allowed:
            self.problem(f"{path}.{key}", f"{json.dumps(obj[key])} is not one of {', '.join(allowed)}")

    def array(self, obj: dict[str, Any], key: str, path: str, each: Callable[[Any, str], None]) -> list[Any]:
        value = obj.get(key)
        if key not in obj or value is None or value == []:
            return []
        if not isinstance(value, list):
            self.problem(f"{path}.{key}", "must be an array")
            return []
        for index, item in enumerate(value):
            each(item, f"{path}.{key}[{index}]")
        return value

    def obj(self, value: Any, path: str) -> dict[str, Any] | None:
        if not isinstance(value, dict):
            self.problem(path, "must be a JSON object")
            return None
        self.no_empty(value, path)
        return value

    def uuid(self, obj: dict[str, Any], path: str, what: str) -> None:
        if "uuid" not in obj:
            self.note(path, f"has no uuid, so a CDS client cannot send feedback about this {what}")
            return
        value = obj["uuid"]
        if value is None:
            return  # reported by no_empty
        if not isinstance(value, str):
            self.problem(f"{path}.uuid", "must be a string")
        elif value:
            if value in self.uuids:
                self.problem(f"{path}.uuid", f"{value!r} is not unique (also {self.uuids[value]})")
            else:
                self.uuids[value] = f"{path}.uuid"

    def coding(self, value: Any, path: str, display_required: bool) -> None:
        coding = self.obj(value, path)
        if coding is None:
            return
        self.text(coding, "code", path, required=True)
        self.text(coding, "system", path, required=True)
        self.text(coding, "display", path, required=display_required)

    def response(self, data: Any) -> Conformance:
        if not isinstance(data, dict):
            self.problem("response", "must be a JSON object with a cards array")
            return self.result
        if "cards" not in data:
            self.problem("cards", "is required (an empty array when there is nothing to say)")
        elif not isinstance(data["cards"], list):  # "cards": [] is the one empty array the spec asks for
            self.problem("cards", "must be an array")
        else:
            for index, card in enumerate(data["cards"]):
                self.card(card, f"cards[{index}]")
        actions = data.get("systemActions")
        if "systemActions" not in data:
            pass
        elif actions is None or actions == []:
            self.problem("systemActions", f"is {json.dumps(actions)}; omit it when there are no system actions")
        elif not isinstance(actions, list):
            self.problem("systemActions", "must be an array")
        else:
            for index, action in enumerate(actions):
                self.action(action, f"systemActions[{index}]", system=True)
        return self.result

    def card(self, value: Any, path: str) -> None:
        card = self.obj(value, path)
        if card is None:
            return
        self.uuid(card, path, "card")
        self.text(card, "summary", path, required=True)
        summary = card.get("summary")
        if isinstance(summary, str) and len(summary) >= SUMMARY_LIMIT:
            self.problem(f"{path}.summary", f"is {len(summary)} characters; it must be under {SUMMARY_LIMIT}")
        self.text(card, "detail", path, required=False)
        self.one_of(card, "indicator", path, INDICATORS, required=True)
        if "source" not in card:
            self.problem(f"{path}.source", "is required")
        else:
            self.source(card["source"], f"{path}.source")
        suggestions = self.array(card, "suggestions", path, self.suggestion)
        if suggestions and "selectionBehavior" not in card:
            self.problem(f"{path}.selectionBehavior", "is required when suggestions are present "
                                                      f"({' or '.join(SELECTION_BEHAVIORS)})")
        elif "selectionBehavior" in card:
            self.one_of(card, "selectionBehavior", path, SELECTION_BEHAVIORS, required=False)
        recommended = [s for s in suggestions if isinstance(s, dict) and s.get("isRecommended") is True]
        if len(recommended) > 1 and card.get("selectionBehavior") == "at-most-one":
            self.note(path, "several suggestions are recommended but at most one can be chosen")
        self.array(card, "overrideReasons", path, lambda v, p: self.coding(v, p, display_required=True))
        self.array(card, "links", path, self.link)
        if "extension" in card and not isinstance(card["extension"], dict):
            self.problem(f"{path}.extension", "must be a JSON object")

    def source(self, value: Any, path: str) -> None:
        source = self.obj(value, path)
        if source is None:
            return
        self.text(source, "label", path, required=True)
        for key in ("url", "icon"):
            if key in source and source[key] and not _is_absolute_url(source[key]):
                self.problem(f"{path}.{key}", "must be an absolute URL")
        if "topic" in source and source["topic"]:
            self.coding(source["topic"], f"{path}.topic", display_required=False)

    def suggestion(self, value: Any, path: str) -> None:
        suggestion = self.obj(value, path)
        if suggestion is None:
            return
        self.text(suggestion, "label", path, required=True)
        self.uuid(suggestion, path, "suggestion")
        if "isRecommended" in suggestion and not isinstance(suggestion["isRecommended"], bool):
            self.problem(f"{path}.isRecommended", "must be true or false")
        self.array(suggestion, "actions", path, lambda v, p: self.action(v, p, system=False))

    def action(self, value: Any, path: str, system: bool) -> None:
        action = self.obj(value, path)
        if action is None:
            return
        self.one_of(action, "type", path, ACTION_TYPES, required=True)
        if "description" not in action and system:
            # REQUIRED in the Action table, yet the spec's own systemActions example leaves it out.
            self.note(f"{path}.description", "is missing (REQUIRED for actions; give one for system actions too)")
        else:
            self.text(action, "description", path, required=True)
        kind = action.get("type")
        if kind in ("create", "update"):
            resource = action.get("resource")
            if not isinstance(resource, dict):
                self.problem(f"{path}.resource", f"must be the FHIR resource to {kind} (a JSON object)")
            elif not _is_text(resource.get("resourceType")):
                self.problem(f"{path}.resource.resourceType", "is required in a FHIR resource")
        elif kind == "delete":
            if "resourceId" in action:
                if isinstance(action["resourceId"], list):
                    self.problem(f"{path}.resourceId", "must be a single string in CDS Hooks 2.0, not an array")
                elif action["resourceId"] is not None and not isinstance(action["resourceId"], str):
                    self.problem(f"{path}.resourceId", "must be a string (a relative reference)")
            elif isinstance(action.get("resource"), str):
                self.note(path, "names the resource to delete in 'resource', which is deprecated; use resourceId")
            else:
                self.note(path, "a delete action SHOULD name its resource in resourceId")

    def link(self, value: Any, path: str) -> None:
        link = self.obj(value, path)
        if link is None:
            return
        self.text(link, "label", path, required=True)
        if "url" not in link:
            self.problem(f"{path}.url", "is required")
        elif link["url"] and not _is_absolute_url(link["url"]):
            self.problem(f"{path}.url", "must be an absolute URL")
        self.one_of(link, "type", path, LINK_TYPES, required=True)
        if "appContext" in link:
            if link.get("type") != "smart":
                self.problem(f"{path}.appContext", "is only valid on links of type smart")
            self.text(link, "appContext", path, required=False)
        if "autolaunchable" in link and not isinstance(link["autolaunchable"], bool):
            self.problem(f"{path}.autolaunchable", "must be true or false")


def check_response(data: Any) -> Conformance:
    """Check a CDS service response body against the CDS Hooks 2.0 rules for cards and system actions."""
    return _Checker().response(data)
