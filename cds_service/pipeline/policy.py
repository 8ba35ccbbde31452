"""Policy packs as data: every folder of cards/ is one pack (a payer policy), loaded once and kept immutable;
cards/services.json names the CDS services that judge orders against all of them."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from string import Template
from typing import Any

from cds_service.pipeline import schema
from cds_service.pipeline.schema import PolicyError

__all__ = ["Alternative", "AlsoCovered", "Catalogue", "Policy", "PolicyError", "ServiceConfig", "load_catalogue",
           "load_policies", "load_policy"]

POLICY_FILES = ("policy.json", "detection.json", "alternatives.json", "conditions.json", "detail.md", "page.md")


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


def load_policy(folder: Path) -> Policy:
    """Read and validate one pack folder (policy.json, detection.json, alternatives.json, conditions.json,
    detail.md, page.md; sources.json when present) against the schema (pipeline/schema.py), once.
    Raises PolicyError naming the file, the field and what is wrong."""
    folder = Path(folder)
    missing = [name for name in POLICY_FILES if not (folder / name).is_file()]
    if missing:
        raise PolicyError.of([f"{folder / name}: missing file (every pack has {', '.join(POLICY_FILES)})"
                              for name in missing])
    raw: dict[str, Any] = {}
    parsed: dict[str, Any] = {}
    problems: list[str] = []
    for name, model in (("policy.json", schema.PolicyFile), ("detection.json", schema.DetectionFile),
                        ("alternatives.json", schema.AlternativesFile), ("conditions.json", schema.ConditionsFile)):
        try:  # every file checked, so that one run names every problem
            raw[name] = schema.read_json(folder / name)
            parsed[name] = schema.parse(model, folder / name, raw[name])
        except PolicyError as exc:
            problems += exc.problems
    try:
        detail = (folder / "detail.md").read_text(encoding="utf-8")
        page = (folder / "page.md").read_text(encoding="utf-8")
    except (OSError, ValueError) as exc:
        problems.append(f"{folder}: cannot read detail.md / page.md: {exc}")
    if problems:
        raise PolicyError.of(problems)
    meta: schema.PolicyFile = parsed["policy.json"]
    detection: schema.DetectionFile = parsed["detection.json"]
    alternatives: schema.AlternativesFile = parsed["alternatives.json"]
    conditions: schema.ConditionsFile = parsed["conditions.json"]
    problems = schema.check_pack(folder, meta, detection, alternatives, conditions, detail, page)
    problems += schema.check_sources(folder)
    if problems:
        raise PolicyError.of(problems)
    data = raw["policy.json"]  # the code reads these as mappings; comments ("_...") are left in, as before
    return Policy(
        id=meta.id,
        number=meta.number,
        title=meta.title,
        version=meta.version,
        revision_date=meta.revision_date,
        effective_date=meta.effective_date,
        ruling=meta.ruling,
        payer=data["payer"],
        source=data["source"],
        card=data["card"],
        messages=dict(meta.messages),
        crd=data["crd"],
        override_reasons=tuple(data["override_reasons"]),
        detection=raw["detection.json"],
        conditions=raw["conditions.json"],
        alternatives=tuple(
            Alternative(
                id=a.id,
                label=a.label,
                policy_text=a.policy_text,
                card_text=a.card_text,
                text=a.text,
                codings=tuple(c.model_dump(exclude_none=True) for c in a.codings),
                rule=a.rule,
                reasons_that_fit=tuple(a.reasons_that_fit),
                withheld_when=tuple(a.withheld_when),
            )
            for a in alternatives.orderable
        ),
        also_covered=tuple(AlsoCovered(id=a.id, policy_text=a.policy_text, card_text=a.card_text)
                           for a in alternatives.also_covered),
        history=tuple(meta.history),
        detail_template=Template(detail),
        page_template=Template(page),
    )


@lru_cache(maxsize=8)
def load_policies(cards_dir: Path) -> tuple[Policy, ...]:
    """Every pack under cards/ (each folder holding a policy.json), loaded once per process."""
    folders = sorted(p.parent for p in Path(cards_dir).glob("*/policy.json"))
    if not folders:
        raise PolicyError(f"{cards_dir}: no policy pack (a folder holding a policy.json)")
    policies = tuple(load_policy(folder) for folder in folders)
    ids = [p.id for p in policies]
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise PolicyError(f"{cards_dir}: two packs have the id {', '.join(repeated)}")
    return policies


@lru_cache(maxsize=8)
def load_catalogue(cards_dir: Path) -> Catalogue:
    """cards/services.json and every pack under cards_dir."""
    path = Path(cards_dir) / "services.json"
    if not path.is_file():
        raise PolicyError(f"{path}: missing file (it names the CDS services)")
    meta = schema.validate_services(path)
    packs = load_policies(Path(cards_dir))
    services = tuple(ServiceConfig(s.hook, s.id, s.title, s.description) for s in meta.services)
    crd = {"versions": list(meta.crd.versions), "options": [o.model_dump() for o in meta.crd.options]}
    return Catalogue(services, crd, packs)
