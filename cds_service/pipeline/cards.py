"""Decision → CDS Hooks 2.0 card, with one suggestion per orderable covered alternative.

Everything a card says comes from the policy data in cards/; this module only assembles it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from string import Template
from typing import Any

from cds_service.pipeline import limits
from cds_service.pipeline.decide import Decision
from cds_service.pipeline.eligibility import ValueSet
from cds_service.pipeline.hooks import HookRequest
from cds_service.pipeline.policy import Alternative, Policy
from cds_service.pipeline.validation import order_errors, surely_valid_replacement

_STAND_IN = ("\x00order-name\x00", "\x00name-of-the-order\x00")  # where the detail's order name goes
CARD_EXTENSION_POLICY = "cds-sacroplasty.policy"
CRD_ASSOCIATED_RESOURCE = "davinci-crd.associated-resource"

# Elements of the draft that every replacement order keeps: same patient, visit, orderer, date. The reason
# is not among them: a created order copies only the reasonCode concepts its alternative lists as fitting
# (alternatives.json `reasons_that_fit`), since a sacral fracture supports no facet injection (hazard H6).
CARRIED_OVER = ("subject", "encounter", "requester", "authoredOn", "priority", "insurance")
# Bounds on what a card echoes from the order (issue 13: a card's size must not grow with the order's).
MAX_ORDER_NAME = limits.MAX_ECHOED_TEXT  # characters of the order's name in the detail and the delete action
MAX_REASONS_COPIED = 3  # reasonCode concepts a created order copies
MAX_CODINGS_COPIED = 5  # codings per copied concept
MAX_REASON_TEXT = 200  # a copied concept's text is dropped beyond this


@dataclass(frozen=True)
class IssuedCard:
    """A card as returned, plus what the payer's records need about it (no patient data)."""

    card: dict[str, Any]
    suggestions: dict[str, str]  # suggestion uuid → alternative id
    decision: Decision
    policy: Policy  # the pack whose card it is


def _as_list(value: Any) -> list[dict[str, Any]]:
    if isinstance(value, dict):
        return [value]
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _reference(value: Any) -> dict[str, Any] | None:
    return value if isinstance(value, dict) and isinstance(value.get("reference"), str) else None


class CardBuilder:
    """Precomputes everything that does not depend on the request; `build` fills in the rest."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        card = policy.card
        self._source = {"label": policy.source["label"], "url": policy.source["url"], "topic": policy.source["topic"]}
        self._override_reasons = [dict(r) for r in policy.override_reasons]
        self._base = {
            "summary": card["summary"],
            "indicator": card["indicator"],
            "selectionBehavior": card["selection_behavior"],
        }
        self._also_covered = Template(card["also_covered"]).substitute(
            list="; ".join(a.card_text for a in policy.also_covered))
        self._listed = Template(card["alternatives_listed"])
        self._note = card["note_on_created_order"]
        self._delete = Template(card["delete_description"])
        self._create = Template(card["create_description"])
        self._reason_sets = {name: ValueSet(policy.conditions[name])
                             for a in policy.alternatives for name in a.reasons_that_fit}
        self._alternatives = {a.id: a for a in policy.alternatives}
        # The card detail's text around the order's name, per decision state and base URL (see _detail).
        self._detail_parts = lru_cache(maxsize=256)(self._render_parts)
        # What a suggestion says that depends only on its alternative, rendered once per pack.
        self._create_descriptions = {a.id: self._create.substitute(text=a.text) for a in policy.alternatives}

    def build(self, decision: Decision, hook_request: HookRequest, now: datetime, base_url: str,
              with_suggestions: bool = True, for_orderer: bool = True) -> IssuedCard:
        """The card for one decision. `base_url`: this service's public URL, for the policy page link.
        `for_orderer` False (order-dispatch, appointment-book): no suggestions, and the pack's `not_the_orderer`
        line, since the performer or scheduler who reads it does not change the order."""
        with_suggestions = with_suggestions and for_orderer
        policy = self.policy
        order = decision.order
        offered = [a for a in policy.alternatives if not decision.contraindications.intersection(a.withheld_when)
                   and (a.rule is None or decision.rules[a.rule].offer)]
        suggestions, suggestion_ids = [], {}
        ids = new_ids(1 + 2 * len(offered))  # the card's, and per suggestion its own and its new order's
        reference = _order_reference(order)
        name = _order_name(order, policy.card["unnamed_order"])
        # CRD Propose Alternate Request: each suggestion deletes the draft and creates the alternative, so
        # without an id to delete there are no suggestions (the card still lists the alternatives).
        if with_suggestions and reference:
            base = self.replacement_base(order, hook_request, now, decision.known_valid)
            delete = {"type": "delete",
                      "description": self._delete.substitute(order=name, number=policy.number),
                      "resourceId": reference}
            reasons = _ReasonCodings(order, self._reason_sets)
            for alternative in offered:
                suggestion = self._suggestion(alternative, decision, base, ids, delete, reasons)
                suggestions.append(suggestion)
                suggestion_ids[suggestion["uuid"]] = alternative.id
        card: dict[str, Any] = {
            "uuid": next(ids),
            **self._base,
            "detail": self._detail(decision, offered, bool(suggestions), base_url, for_orderer, name),
            "source": self._source,
            "overrideReasons": self._override_reasons,
            "extension": {CARD_EXTENSION_POLICY: policy.identity},
        }
        if reference:
            card["extension"][CRD_ASSOCIATED_RESOURCE] = [{"reference": reference}]
        if suggestions:
            card["suggestions"] = suggestions
        else:
            del card["selectionBehavior"]
        return IssuedCard(card, suggestion_ids, decision, policy)

    def _detail(self, decision: Decision, offered: list[Alternative], buttons: bool, base_url: str,
                for_orderer: bool = True, name: str | None = None) -> str:
        """The card's Markdown detail (the pack's detail.md filled in). All of it but the order's name depends
        only on the pack and the decision's state, so it is rendered once per state (`_detail_parts`, a
        bounded cache) and the name put in its place: 1/6 of a card's cost, saved."""
        if name is None:
            name = _order_name(decision.order, self.policy.card["unnamed_order"])
        keys = (decision.plan.note, *(status.note for status in decision.rules.values()))
        listed = () if buttons else tuple(a.id for a in offered)
        parts = self._detail_parts(keys, listed, buttons, base_url, for_orderer)
        order = _markdown_text(name)
        return order.join(parts) if parts is not None else self._render_detail(keys, listed, buttons, base_url,
                                                                               for_orderer, order)

    def _render_detail(self, keys: tuple[str | None, ...], listed: tuple[str, ...], buttons: bool, base_url: str,
                       for_orderer: bool, order: str) -> str:
        """The detail, rendered: `keys` the messages of the plan and the rules, `listed` the ids of the
        alternatives named in the text when there are no buttons, `order` the order's name as Markdown."""
        policy = self.policy
        messages = policy.messages
        notes = [messages[key] for key in keys if key]
        if not for_orderer and policy.card.get("not_the_orderer"):
            notes.append(policy.card["not_the_orderer"])
        return policy.detail_template.substitute(
            order=order,
            number=policy.number,
            revision_date=policy.revision_date,
            alternatives=policy.card["alternatives_offered"] if buttons else self._listed.substitute(
                list="; ".join(self._alternatives[a].card_text for a in listed)) if listed else "",
            also_covered=self._also_covered,
            notes="".join(f"\n{note}\n" for note in notes),
            policy_page_link=policy.card["policy_page_link"],
            policy_page=f"{base_url.rstrip('/')}/policies/{policy.id}",
        )

    def _render_parts(self, keys: tuple[str | None, ...], listed: tuple[str, ...], buttons: bool, base_url: str,
                      for_orderer: bool) -> tuple[str, ...] | None:
        """The detail cut where the order's name goes: rendered with two different stand-ins for the name, it
        must split the same way on each (else some other text holds a stand-in: None, render it per call)."""
        first = self._render_detail(keys, listed, buttons, base_url, for_orderer, _STAND_IN[0]).split(_STAND_IN[0])
        second = self._render_detail(keys, listed, buttons, base_url, for_orderer, _STAND_IN[1]).split(_STAND_IN[1])
        return tuple(first) if first == second else None

    def _suggestion(self, alternative: Alternative, decision: Decision, base: dict[str, Any],
                    ids: Iterator[str], delete: dict[str, Any], reasons: _ReasonCodings) -> dict[str, Any]:
        """One suggestion: delete the draft (`delete`, the same action in every suggestion of the card, as
        a copy), create the alternative."""
        label = alternative.label
        if alternative.rule is not None:
            label += decision.rules[alternative.rule].label_suffix
        actions: list[dict[str, Any]] = [dict(delete), {
            "type": "create",
            "description": self._create_descriptions[alternative.id],
            "resource": self.replacement_order(alternative, base, next(ids), reasons.fitting(alternative)),
        }]
        return {"label": label, "uuid": next(ids), "actions": actions}

    def replacement_base(self, order: dict[str, Any], hook_request: HookRequest, now: datetime,
                         order_is_valid: bool = False) -> dict[str, Any]:
        """What every replacement of `order` shares: same patient, visit, orderer and date.

        Copied from the draft where it is valid FHIR R4; validated once per order, so that each
        alternative only adds its (already validated) code.
        """
        base = self._base_order(order, hook_request, now, copy_from_draft=True)
        if order_is_valid:  # copied from a valid order: valid as it stands
            return base
        checked = {**base, "code": {"text": "check"}}
        if not surely_valid_replacement(checked) and order_errors(checked):  # the full model when in doubt
            base = self._base_order(order, hook_request, now, copy_from_draft=False)
        return base

    def _base_order(self, order: dict[str, Any], hook_request: HookRequest, now: datetime,
                    copy_from_draft: bool) -> dict[str, Any]:
        resource: dict[str, Any] = {"resourceType": "ServiceRequest", "status": "draft", "intent": "order"}
        if copy_from_draft:
            if isinstance(order.get("intent"), str):
                resource["intent"] = order["intent"]
            for key in CARRIED_OVER:
                value = order.get(key)
                if key in ("subject", "encounter", "requester"):
                    value = _reference(value)
                elif key == "insurance":
                    value = [v for v in _as_list(value) if _reference(v)] or None
                elif not isinstance(value, str):
                    value = None
                if value:
                    resource[key] = value
        resource.setdefault("subject", {"reference": f"Patient/{hook_request.patient_id}"})
        if hook_request.encounter_id:
            resource.setdefault("encounter", {"reference": f"Encounter/{hook_request.encounter_id}"})
        resource.setdefault("requester", {"reference": hook_request.user_id})
        resource.setdefault("authoredOn", now.isoformat(timespec="seconds"))
        resource["note"] = [{"text": self._note}]
        return resource

    @staticmethod
    def replacement_order(alternative: Alternative, base: dict[str, Any], resource_id: str,
                          reasons: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        resource = {
            **base,
            "id": resource_id,
            "code": {"coding": [dict(c) for c in alternative.codings], "text": alternative.text},
        }
        if reasons:
            resource["reasonCode"] = reasons
        return resource


class _ReasonCodings:
    """The draft's reasonCode codings a created order may copy, each with the names of the value sets
    (conditions.json) it is in: looked up once per card, then filtered per alternative, instead of once per
    alternative (a card has several)."""

    def __init__(self, order: dict[str, Any], sets: dict[str, ValueSet]) -> None:
        self.concepts: list[tuple[dict[str, Any], list[tuple[dict[str, Any], frozenset[str]]]]] = []
        for concept in _as_list(order.get("reasonCode"))[:MAX_REASONS_COPIED * 4]:
            codings = [(c, frozenset(name for name, s in sets.items() if s.matches({"coding": [c]})))
                       for c in _as_list(concept.get("coding"))[:MAX_CODINGS_COPIED * 4]
                       if _plain_code(c.get("code"))]
            self.concepts.append((concept, codings))

    def fitting(self, alternative: Alternative) -> list[dict[str, Any]]:
        """The order's reasonCode concepts that support `alternative` (alternatives.json `reasons_that_fit`),
        bounded in number and size, each cut to the codings that match (valid Codings by construction)."""
        wanted = frozenset(alternative.reasons_that_fit)
        reasons: list[dict[str, Any]] = []
        for concept, coded in self.concepts:
            codings = [c for c, names in coded if names & wanted]
            if not codings:
                continue
            kept: dict[str, Any] = {"coding": [{k: c[k] for k in ("system", "code", "display")
                                                if isinstance(c.get(k), str) and c[k].strip()}
                                               for c in codings[:MAX_CODINGS_COPIED]]}
            text = concept.get("text")
            if isinstance(text, str) and text.strip() and len(text) <= MAX_REASON_TEXT:
                kept["text"] = text
            reasons.append(kept)
            if len(reasons) == MAX_REASONS_COPIED:
                break
        return reasons


# Byte maps (C-speed bytes.translate, not a Python loop per id) that set a UUID's version and variant bits.
_VERSION_4 = bytes(b & 0x0F | 0x40 for b in range(256))  # version 4
_VARIANT = bytes(b & 0x3F | 0x80 for b in range(256))  # variant RFC 4122 / 9562


def new_ids(count: int) -> Iterator[str]:
    """`count` random UUIDs (RFC 9562 version 4) from one read of the OS's random source.

    Formatted here rather than through uuid.UUID: a card needs 17 of them, and building UUID objects was 6%
    of a sacroplasty call under load (measured). The layout is the standard 8-4-4-4-12 hex string with the
    version nibble 4 and the variant bits 10, exactly what str(uuid.uuid4()) gives (tests/test_cards.py).
    """
    raw = bytearray(os.urandom(16 * count))
    raw[6::16] = raw[6::16].translate(_VERSION_4)
    raw[8::16] = raw[8::16].translate(_VARIANT)
    h = raw.hex()
    return (f"{h[i:i + 8]}-{h[i + 8:i + 12]}-{h[i + 12:i + 16]}-{h[i + 16:i + 20]}-{h[i + 20:i + 32]}"
            for i in range(0, 32 * count, 32))


def _plain_code(code: Any) -> bool:
    """A code short and plain enough to copy as a valid FHIR `code` (no whitespace)."""
    return isinstance(code, str) and 0 < len(code) <= 40 and code.split() == [code]  # split: at any whitespace


def _order_reference(order: dict[str, Any]) -> str | None:
    rid = order.get("id")
    kind = "Appointment" if order.get("resourceType") == "Appointment" else "ServiceRequest"
    return f"{kind}/{rid}" if isinstance(rid, str) and rid else None


_MARKDOWN = re.compile(r"([\\`*_{}\[\]()<>#+!|~-])")


def _markdown_text(text: str) -> str:
    """EHR text shown literally inside the card's Markdown detail (one line, no markup of its own)."""
    return _MARKDOWN.sub(r"\\\1", " ".join(text.split()))


def _order_name(order: dict[str, Any], unnamed: str) -> str:
    """The order's name as the clinician knows it, at most MAX_ORDER_NAME characters."""
    name = unnamed
    code = order.get("code")
    if order.get("resourceType") == "Appointment":  # an Appointment is named by its service type
        code = next(iter(_as_list(order.get("serviceType"))), None)
    if isinstance(code, dict):
        if isinstance(code.get("text"), str) and code["text"].strip():
            name = code["text"]
        else:
            name = next((c["code"] for c in _as_list(code.get("coding")) if isinstance(c.get("code"), str)), name)
    name = " ".join(name[:MAX_ORDER_NAME * 4].split())
    return name if len(name) <= MAX_ORDER_NAME else name[:MAX_ORDER_NAME - 1].rstrip() + "…"
