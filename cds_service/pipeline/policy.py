"""Policy packs as data: every folder of cards/ is one pack (a payer policy), loaded once and kept immutable;
cards/services.json names the CDS services that judge orders against all of them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from string import Template
from typing import Any

POLICY_FILES = ("policy.json", "detection.json", "alternatives.json", "conditions.json", "detail.md", "page.md")


class PolicyError(Exception):
    """The cards/ data is missing or malformed: the service must not start with it."""


@dataclass(frozen=True)
class Alternative:
    id: str
    label: str
    policy_text: str
    card_text: str  # the policy's line, faithfully shortened for the card
    text: str
    codings: tuple[dict[str, str], ...]
    rule: str | None = None  # a conditional rule (pipeline/rules.py) that decides whether it is offered
    reasons_that_fit: tuple[str, ...] = ()  # conditions.json value sets whose reasonCode the created order copies
    withheld_when: tuple[str, ...] = ()  # conditions.json contraindication kinds that rule the one-click order out


@dataclass(frozen=True)
class AlsoCovered:
    """A covered alternative the card names but never orders with one click."""

    id: str
    policy_text: str
    card_text: str


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: loaded once, rules compiled once per policy
class Policy:
    id: str
    number: str
    title: str
    version: str
    revision_date: str
    effective_date: str
    ruling: str
    payer: dict[str, Any]
    source: dict[str, Any]
    card: dict[str, Any]
    messages: dict[str, str]
    crd: dict[str, Any]
    override_reasons: tuple[dict[str, str], ...]
    detection: dict[str, Any]
    conditions: dict[str, Any]
    alternatives: tuple[Alternative, ...]
    also_covered: tuple[AlsoCovered, ...]
    history: tuple[str, ...]
    detail_template: Template
    page_template: Template

    @property
    def identity(self) -> dict[str, str]:
        """What travels on every card so the payer can tell which policy version fired."""
        return {
            "id": self.id,
            "number": self.number,
            "payer": self.payer["name"],
            "version": self.version,
            "effectiveDate": self.effective_date,
        }

    def alternative(self, alternative_id: str) -> Alternative | None:
        return next((a for a in self.alternatives if a.id == alternative_id), None)

    @property
    def rule_names(self) -> tuple[str, ...]:
        """The conditional rules (pipeline/rules.py) this pack's alternatives name, each once."""
        return tuple(dict.fromkeys(a.rule for a in self.alternatives if a.rule))

    @property
    def label(self) -> str:
        """How the pack is named to EHRs and people: its payer and number."""
        return f"{self.payer['name']} {self.number}"


@dataclass(frozen=True)
class ServiceConfig:
    """One CDS service of cards/services.json: a hook, the id EHRs registered, neutral words."""

    hook: str
    id: str
    title: str
    description: str  # $packs is filled with the loaded packs


@dataclass(frozen=True, eq=False)
class Catalogue:
    """Everything cards/ holds: the services and every pack."""

    services: tuple[ServiceConfig, ...]
    crd: dict[str, Any]  # versions and configuration options declared by every service
    packs: tuple[Policy, ...]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PolicyError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise PolicyError(f"{path}: expected a JSON object")
    return data


def load_policy(folder: Path) -> Policy:
    """Read one policy folder (policy.json, detection.json, alternatives.json, conditions.json, detail.md)."""
    missing = [name for name in POLICY_FILES if not (folder / name).is_file()]
    if missing:
        raise PolicyError(f"{folder}: missing {', '.join(missing)}")
    meta = _read_json(folder / "policy.json")
    alternatives = _read_json(folder / "alternatives.json")
    try:
        policy = Policy(
            id=meta["id"],
            number=meta["number"],
            title=meta["title"],
            version=meta["version"],
            revision_date=meta["revision_date"],
            effective_date=meta["effective_date"],
            ruling=meta["ruling"],
            payer=meta["payer"],
            source=meta["source"],
            card=meta["card"],
            messages=meta["messages"],
            crd=meta["crd"],
            override_reasons=tuple(meta["override_reasons"]),
            detection=_read_json(folder / "detection.json"),
            conditions=_read_json(folder / "conditions.json"),
            alternatives=tuple(
                Alternative(
                    id=a["id"],
                    label=a["label"],
                    policy_text=a["policy_text"],
                    card_text=a["card_text"],
                    text=a["text"],
                    codings=tuple(a["codings"]),
                    rule=a.get("rule"),
                    reasons_that_fit=tuple(a["reasons_that_fit"]),
                    withheld_when=tuple(a["withheld_when"]),
                )
                for a in alternatives["orderable"]
            ),
            also_covered=tuple(
                AlsoCovered(id=a["id"], policy_text=a["policy_text"], card_text=a["card_text"])
                for a in alternatives["also_covered"]
            ),
            history=tuple(meta["history"]),
            detail_template=Template((folder / "detail.md").read_text(encoding="utf-8")),
            page_template=Template((folder / "page.md").read_text(encoding="utf-8")),
        )
    except (KeyError, TypeError) as exc:
        raise PolicyError(f"{folder}: malformed policy data ({exc!r})") from exc
    from cds_service.pipeline.rules import RULES  # the registry imports this module

    unknown_rules = {a.rule for a in policy.alternatives if a.rule} - set(RULES)
    if unknown_rules:
        raise PolicyError(f"{folder / 'alternatives.json'}: orderable[].rule: unknown rule "
                          f"{', '.join(sorted(unknown_rules))} (known: {', '.join(sorted(RULES))})")
    unknown = {name for a in policy.alternatives for name in a.reasons_that_fit} - set(policy.conditions)
    unknown |= {kind for a in policy.alternatives for kind in a.withheld_when} \
        - set(policy.conditions.get("contraindications", {}))
    if unknown:
        raise PolicyError(f"{folder / 'alternatives.json'}: reasons_that_fit / withheld_when name no value "
                          f"set or contraindication of conditions.json: {', '.join(sorted(unknown))}")
    return policy


@lru_cache(maxsize=8)
def load_policies(cards_dir: Path) -> tuple[Policy, ...]:
    """Every pack under cards/ (each folder holding a policy.json), loaded once per process."""
    folders = sorted(p.parent for p in Path(cards_dir).glob("*/policy.json"))
    if not folders:
        raise PolicyError(f"no policy found under {cards_dir}")
    policies = tuple(load_policy(folder) for folder in folders)
    ids = [p.id for p in policies]
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise PolicyError(f"{cards_dir}: two packs have the id {', '.join(repeated)}")
    return policies


@lru_cache(maxsize=8)
def load_catalogue(cards_dir: Path) -> Catalogue:
    """cards/services.json and every pack under cards_dir."""
    meta = _read_json(Path(cards_dir) / "services.json")
    packs = load_policies(Path(cards_dir))
    try:
        services = tuple(ServiceConfig(s["hook"], s["id"], s["title"], s["description"]) for s in meta["services"])
        crd = {"versions": list(meta["crd"]["versions"]), "options": list(meta["crd"]["options"])}
    except (KeyError, TypeError) as exc:
        raise PolicyError(f"{Path(cards_dir) / 'services.json'}: malformed ({exc!r})") from exc
    return Catalogue(services, crd, packs)
